"""Run one ``cxr`` step in a child process, as the Prefect tasks do, and stream its log into the task's.

A child process gives each TensorFlow step its own runtime (seeds, precision policy, memory), lets
several models train at once, and runs exactly the code path ``dvc repro`` runs. The flow's run id
travels to the child, which records it in the model card and the lineage log.

The child logs to stderr, one line per event (``HH:MM:SS LEVEL   name: message``, :mod:`cxr.logs`).
Each line is passed on to the Prefect task run's logger as it arrives, at the child's level, so
epochs, metrics and a failure's full error show in the Prefect UI while the step runs. The child's
stdout (a subcommand's JSON result) is read concurrently and kept apart.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from cxr.errors import CxrError
from cxr.safe_text import printable
from cxr.stages import as_overrides

TAIL_LINES = 20  # the child's last log lines carried by the error when it fails

# the child's log line, as cxr.logs formats it: "12:03:44 WARNING cxr.training.train: message"
_LINE = re.compile(r"^\d\d:\d\d:\d\d (?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL) +(?P<name>[\w.]+): (?P<message>.*)$")
_LEVELS = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
}
# TensorFlow's C++ runtime (absl) logs "E0000 00:00:1795936100.488661   15247 cuda_platform.cc:52] ..."
_RUNTIME_LINE = re.compile(r"^(?P<level>[IWEF])\d{4} [\d:.]+ +\d+ [\w./-]+:\d+\] ")
_ERROR_PREFIX = "cxr: error: "

log = logging.getLogger("tasks.runner")


class StepFailed(CxrError):
    """A ``cxr`` child process failed.

    ``summary`` is one line (the command, its exit status and the child's own error line); ``tail``
    holds the child's last log lines. ``str()`` gives the summary, then the tail, one line each.
    """

    def __init__(self, summary: str, tail: Sequence[str] = ()) -> None:
        super().__init__(summary, tuple(tail))
        self.summary = summary
        self.tail = tuple(tail)

    def __str__(self) -> str:
        if not self.tail:
            return self.summary
        return "\n".join([self.summary, "last lines of its log:", *(f"  {line}" for line in self.tail)])


def one_line(exc: BaseException) -> str:
    """The one-line form of an error: a :class:`StepFailed`'s summary, any other error's message."""
    return exc.summary if isinstance(exc, StepFailed) else str(exc)


def run_cxr(
    args: Sequence[str],
    params_path: str,
    settings: Mapping[str, Any] | None = None,
    extra_overrides: Sequence[str] = (),
) -> str:
    """Run ``python -m cxr ARGS --params PATH -S key=value...``; stream its log; return its stdout.

    Args:
        args: the subcommand and its arguments, e.g. ``["train", "--model", "smallnet"]``.
        params_path: the parameters file the child reads.
        settings: the stage's settings (``cxr.stages.settings_of``), passed as ``-S`` overrides so the
            child uses exactly the values the task's cache key was computed from.
        extra_overrides: further ``key=value`` overrides.

    Returns:
        The child's standard output.

    Raises:
        StepFailed: the child failed; the message is one line (the child's ``cxr: error:`` line, or
            its last line) followed by its last log lines.
    """
    command = [sys.executable, "-m", "cxr", *args, "--params", params_path]
    for item in [*as_overrides(settings or {}), *extra_overrides]:
        command += ["-S", item]
    env = {**os.environ, "CXR_NO_PROGRESS": "1"}
    env.update(_flow_run_env())
    logger = _run_logger()
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    error_line = None
    stdout: list[str] = []
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="backslashreplace",
        env=env,
    )
    try:
        child_out, child_err = proc.stdout, proc.stderr
        assert child_out is not None and child_err is not None  # both opened as PIPE
        # stdout on a thread, stderr here: neither pipe can fill up and stall the child
        reader = threading.Thread(target=lambda: stdout.append(child_out.read()), daemon=True)
        reader.start()
        for raw in child_err:
            line = printable(raw.rstrip("\r\n"))
            if not line.strip():
                continue
            tail.append(line)
            if line.startswith(_ERROR_PREFIX):
                error_line = line[len(_ERROR_PREFIX) :]
            forward(logger, line)
        returncode = proc.wait()
        reader.join()
    finally:
        if proc.poll() is None:  # the task was interrupted: do not leave the child running
            proc.kill()
            proc.wait()
    if returncode != 0:
        reason = error_line or (tail[-1] if tail else "(no output)")
        raise StepFailed(f"cxr {printable(' '.join(args))} failed (exit {returncode}): {reason}", tail)
    return "".join(stdout)


def forward(logger: logging.Logger | logging.LoggerAdapter, line: str) -> None:
    """Log one line of the child's stderr at its own level.

    A line in :mod:`cxr.logs`' format keeps its level and logger name (the time stamp is dropped:
    the receiving logger adds its own). The CLI's ``cxr: error:`` line is an ERROR. TensorFlow's C++
    runtime chatter (on a machine without a GPU, a "failed call to cuInit" error at every start) is
    DEBUG, a fatal one CRITICAL. Any other line (a library's warning, a traceback) is a WARNING.
    """
    match = _LINE.match(line)
    if match:
        logger.log(_LEVELS[match["level"]], "%s: %s", match["name"], match["message"])
    elif runtime := _RUNTIME_LINE.match(line):
        logger.log(logging.CRITICAL if runtime["level"] == "F" else logging.DEBUG, "%s", line)
    elif line.startswith(_ERROR_PREFIX):
        logger.error("%s", line)
    else:
        logger.warning("%s", line)


def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect task (or flow) run's logger, whose records reach the Prefect API; ours outside a run."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return log


def _flow_run_env() -> dict[str, str]:
    from prefect.runtime import flow_run

    if not flow_run.id:
        return {}
    return {"CXR_PREFECT_FLOW_RUN": str(flow_run.id), "CXR_PREFECT_FLOW_RUN_NAME": str(flow_run.name)}
