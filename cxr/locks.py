"""One run at a time per step and workspace: an advisory ``flock`` on a lock file beside the outputs.

``cxr fetch`` holds ``data/.fetch.lock`` (beside ``data/raw`` and ``data/fetch.json``) while it
builds and swaps the tree; ``cxr prepare`` holds ``data/prepared/.prepare.lock`` (beside
``manifest.csv`` and ``splits.csv``) and, since it reads ``data/raw``, the fetch lock too, so a fetch
never swaps the tree under a running prepare (that read guard is skipped where ``data/`` is
read-only: no fetch can write there either). A second run waits up to ``CXR_LOCK_WAIT_S`` seconds (default 10) for
the holder to finish, then stops with one line naming it (pid, host, command, start time).

The lock file holds the holder's description as one JSON line. The holder removes it when it ends;
the kernel drops the lock itself when the process dies, even on ``kill -9``, in which case the file
stays behind (under the same, stable name) and the next run takes it over. A waiter that gets the
lock on a file its holder has just removed notices (the path no longer names the file it locked)
and starts over, so two runs never both believe they hold the lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from cxr.errors import CxrError
from cxr.safe_text import printable

log = logging.getLogger(__name__)

WAIT_ENV = "CXR_LOCK_WAIT_S"
DEFAULT_WAIT_S = 10.0
_POLL_S = 0.1


class LockBusy(CxrError):
    """Another run holds the lock of the step's outputs."""


def lock_path(folder: str | Path, step: str) -> Path:
    """The lock file of ``step`` in ``folder``, the folder holding its outputs.

    Args:
        folder: ``data`` (fetch: ``data/raw`` and ``data/fetch.json``), ``data/prepared`` (prepare).
        step: the step's name (``fetch``, ``prepare``).

    Returns:
        ``<folder>/.<step>.lock``, e.g. ``data/.fetch.lock``.
    """
    return Path(folder) / f".{step}.lock"


def wait_seconds() -> float:
    """How long a run waits for a held lock: ``CXR_LOCK_WAIT_S`` (seconds, ≥ 0), default 10.

    Raises:
        CxrError: the variable is set to something other than a non-negative number.
    """
    text = os.environ.get(WAIT_ENV, "").strip()
    if not text:
        return DEFAULT_WAIT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise CxrError(f"{WAIT_ENV}={printable(text)!r}: expected seconds to wait for a busy step (a number ≥ 0)")
    return value


def _command() -> str:
    args = list(sys.argv)
    if args and Path(args[0]).name in ("__main__.py", "cxr"):
        args[0] = "cxr"
    return printable(" ".join(args))[:200]


def _holder(step: str) -> dict[str, object]:
    return {
        "step": step,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": _command(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def describe_holder(path: Path) -> str:
    """Who holds the lock at ``path``, on one line, from what the holder wrote into it.

    Args:
        path: the lock file.

    Returns:
        ``"cxr fetch (pid 123 on host, since 2026-…)"``, or ``"another run"`` while the holder has not
        written its description yet.
    """
    try:
        info = json.loads(path.read_text(errors="replace") or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another run"
    command = str(info.get("command") or "")
    if not command.startswith("cxr"):  # a script or a notebook: its own name says little
        command = f"a {info.get('step')} run ({command})" if command else f"a {info.get('step')} run"
    return printable(f"{command} (pid {info.get('pid')} on {info.get('host')}, since {info.get('started')})")


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            # name the folder, not our lock file: it is the folder that must become writable
            raise OSError(exc.errno, exc.strerror, str(path.parent)) from exc
        raise


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino)


def _acquire(path: Path, step: str, what: str, wait_s: float) -> int | None:
    """The locked descriptor of ``path``; None where the file system cannot lock (NFS without locks)."""
    deadline = time.monotonic() + wait_s
    announced = False
    while True:
        fd = _open(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() >= deadline:
                raise LockBusy(
                    f"{printable(what)} is in use by {describe_holder(path)}; waited {wait_s:g} s: let it "
                    f"finish and rerun, or set {WAIT_ENV}=<seconds> to wait longer (lock file {printable(path)})"
                ) from None
            if not announced:
                log.info("waiting up to %g s for %s, held by %s", wait_s, printable(what), describe_holder(path))
                announced = True
            time.sleep(_POLL_S)
            continue
        except OSError as exc:  # ENOLCK / EOPNOTSUPP: a file system without locks
            os.close(fd)
            log.warning("cannot lock %s (%s): running %s without a lock", printable(path), exc.strerror, step)
            return None
        if _same_file(fd, path):
            return fd
        os.close(fd)  # the holder removed the file as we got it: lock the new one


@contextlib.contextmanager
def step_lock(
    path: str | Path, step: str, what: str | Path, wait_s: float | None = None, *, read_guard: bool = False
) -> Iterator[None]:
    """Hold the lock file ``path`` for the ``with`` block; wait for, or stop at, another holder.

    Args:
        path: the lock file (see :func:`lock_path`); its folder is created.
        step: the step taking it (``fetch``, ``prepare``), recorded for a waiting run to name.
        what: the outputs it guards, named in the error (``data/raw``).
        wait_s: seconds to wait for a holder (default: :func:`wait_seconds`).
        read_guard: the lock only keeps the step's *input* from being replaced while it is read (prepare
            taking the fetch lock): where its folder is read-only, no run of ours can replace that input
            either, so the block runs without it instead of failing.

    Raises:
        LockBusy: another run still holds it after ``wait_s`` seconds; the line names the holder.
        OSError: the folder is not writable (the error names the folder).
    """
    path = Path(path)
    wait_s = wait_seconds() if wait_s is None else wait_s
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path, step, str(what), wait_s)
    except OSError as exc:
        if not (read_guard and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)):
            raise
        log.debug("%s is read-only: reading %s without the lock", printable(path.parent), printable(what))
        fd = None
    if fd is None:
        yield
        return
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_holder(step), sort_keys=True) + "\n").encode(), 0)
        yield
    finally:
        # Removed while still held: a run waiting on this file then finds it gone and starts over.
        with contextlib.suppress(OSError):
            if _same_file(fd, path):
                path.unlink()
        os.close(fd)
