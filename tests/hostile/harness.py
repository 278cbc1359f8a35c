"""Drive the real ``cxr`` command in a subprocess on a hostile input, and check how it ended.

Every case of the hostile corpus (``tests/hostile/test_*.py``) runs ``python -m cxr ...`` in its own
process, so the exit status, stderr, peak memory and the files left on disk are what a user would see.
The helpers here are plain functions; test modules import them from ``tests.hostile.harness``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

# Names a step may give its scratch files; none may survive a run, failed or not.
TEMP_MARKERS = (".tmp-", ".tmp.", ".partial", ".incomplete", ".lock-stale")


@dataclass(frozen=True)
class Outcome:
    """How one ``cxr`` run ended."""

    args: tuple[str, ...]
    rc: int
    out: str
    err: str
    peak_rss_mb: float

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("cxr: error:")]

    def describe(self) -> str:
        return f"cxr {' '.join(self.args)} → rc {self.rc}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


def _limit_file_size(limit: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def run_cxr(
    args: Iterable[str | os.PathLike[str]],
    cwd: Path,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
    stdin: bytes | None = None,
    unprivileged: bool = False,
    file_size_limit: int | None = None,
) -> Outcome:
    """Run ``python -m cxr ARGS`` in ``cwd`` and measure its peak resident memory.

    The environment is this process's, without the TensorFlow log-level setting the test session
    sets, so stderr is what a user's shell would show; ``env`` adds or replaces variables.
    ``unprivileged`` runs it as an ordinary user even when the tests run as root (see
    :func:`unprivileged_prefix`), so file modes bind it; call ``unprivileged_prefix()`` first to skip
    where that is impossible. ``file_size_limit`` caps every file the run writes (``RLIMIT_FSIZE``, in
    bytes): a write past it fails as a full disk's would (EFBIG; Python ignores SIGXFSZ).
    """
    args = tuple(str(a) for a in args)
    full_env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "CXR_DEBUG")}
    full_env.update({"CXR_NO_PROGRESS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    full_env.update(env or {})
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        prefix = unprivileged_prefix() if unprivileged else []
        if prefix is None:
            raise RuntimeError("cannot run as an ordinary user here: check unprivileged_prefix() first")
        proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "cxr", *args],
            cwd=cwd,
            env=full_env,
            stdout=out,
            stderr=err,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            preexec_fn=None if file_size_limit is None else functools.partial(_limit_file_size, file_size_limit),
        )
        if stdin is not None:
            assert proc.stdin is not None
            proc.stdin.write(stdin)
            proc.stdin.close()
        try:
            _, status, peak_kb = _wait4(proc, timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Outcome(
            args=args,
            rc=proc.returncode,
            out=out.read().decode(errors="replace"),
            err=err.read().decode(errors="replace"),
            peak_rss_mb=peak_kb / 1024,
        )


@functools.cache
def unprivileged_prefix() -> list[str] | None:
    """The command prefix that runs a child as an ordinary user, whom ``chmod`` binds.

    ``[]`` when the tests already run as an ordinary user. As root (CI containers), a new user
    namespace mapping root to uid 1000 (``unshare --user``): the child then holds no capability over
    the files, so a read-only folder refuses it as it would refuse any user. None where neither works
    (no ``unshare``, or user namespaces disabled): the caller skips.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return []
    prefix = ["unshare", "--user", "--map-user=1000", "--map-group=1000"]
    try:
        probe = subprocess.run([*prefix, "id", "-u"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return prefix if probe.returncode == 0 and probe.stdout.strip() == "1000" else None


def _hwm_kb(pid: int) -> int:
    """The process's own peak resident set (``VmHWM``, kB), 0 when it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _wait4(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, int, int]:
    """Wait for ``proc``; → (pid, wait status, peak RSS in kB).

    The peak is the child's ``VmHWM`` polled while it runs: ``ru_maxrss`` would be wrong here, because
    Linux carries the *parent's* high-water mark across fork and exec, so a child of a pytest process
    that holds TensorFlow would read over a gigabyte before doing anything. Falls back to ``ru_maxrss``
    where ``/proc`` is not available.
    """
    import time

    deadline = time.monotonic() + timeout
    peak = 0
    while True:
        peak = max(peak, _hwm_kb(proc.pid))
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            return pid, status, peak or usage.ru_maxrss
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(proc.args, timeout)
        time.sleep(0.02)


def assert_refused(outcome: Outcome, *names: str, rc: int = 1) -> str:
    """The run failed with ``rc``, no traceback, and exactly one ``cxr: error:`` line naming ``names``.

    Returns:
        The error line.
    """
    text = outcome.describe()
    assert outcome.rc == rc, text
    assert "Traceback" not in outcome.err + outcome.out, text
    lines = outcome.error_lines
    assert len(lines) == 1, text
    for name in names:
        assert name in lines[0], f"{name!r} not named in the error line\n{text}"
    return lines[0]


def assert_no_traceback(outcome: Outcome) -> None:
    assert "Traceback" not in outcome.err + outcome.out, outcome.describe()


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` → its sha256 (links → their target), to compare before and after a run."""
    found: dict[str, str] = {}
    if not root.exists():
        return found
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = "link:" + os.readlink(path)
            else:
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def leftovers(root: Path) -> list[str]:
    """Scratch files and folders a run left under ``root`` (names carrying a ``TEMP_MARKERS`` marker)."""
    left = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in (".venv", ".git", ".dvc")]
        for name in dirnames + filenames:
            if any(marker in name for marker in TEMP_MARKERS):
                left.append(str(Path(dirpath, name).relative_to(root)))
    return sorted(left)


@contextlib.contextmanager
def running_server(root: Path, *options: str, startup_s: float = 180) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``python -m cxr serve --port 0 OPTIONS`` in ``root``: (base URL, process) once ``/health``
    answers 200; terminated on exit. Its output goes to ``root/serve.log`` (the caller checks it)."""
    import httpx

    log_path = root / "serve.log"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "TF_CPP_MIN_LOG_LEVEL": "2"}
    env["CXR_NO_PROGRESS"] = "1"
    with open(log_path, "wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cxr", "serve", "--port", "0", *options],
            cwd=root,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline, url = time.monotonic() + startup_s, None
        while time.monotonic() < deadline:
            assert proc.poll() is None, (
                f"cxr serve exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}"
            )
            if url is None:
                found = re.search(r"on (http://127\.0\.0\.1:\d+)", log_path.read_text(errors="replace"))
                url = found.group(1) if found else None
            if url is not None:
                try:
                    if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
            time.sleep(0.3)
        else:
            raise AssertionError(f"cxr serve did not answer /health within {startup_s} s:\n{log_path.read_text()}")
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
