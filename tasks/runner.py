"""Run one ``cxr`` step in a child process, as the Prefect tasks do.

A child process gives each TensorFlow step its own runtime (seeds, precision policy, memory), lets
several models train at once, and runs exactly the code path ``dvc repro`` runs. The flow's run id
travels to the child, which records it in the model card and the lineage log.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from cxr.errors import CxrError
from cxr.stages import as_overrides


def run_cxr(
    args: Sequence[str],
    params_path: str,
    settings: Mapping[str, Any] | None = None,
    extra_overrides: Sequence[str] = (),
) -> str:
    """Run ``python -m cxr ARGS --params PATH -S key=value...`` and return its stdout.

    Args:
        args: the subcommand and its arguments, e.g. ``["train", "--model", "smallnet"]``.
        params_path: the parameters file the child reads.
        settings: the stage's settings (``cxr.stages.settings_of``), passed as ``-S`` overrides so the
            child uses exactly the values the task's cache key was computed from.
        extra_overrides: further ``key=value`` overrides.

    Returns:
        The child's standard output.

    Raises:
        CxrError: the child failed; the message is its last line of stderr.
    """
    command = [sys.executable, "-m", "cxr", *args, "--params", params_path]
    for item in [*as_overrides(settings or {}), *extra_overrides]:
        command += ["-S", item]
    env = {**os.environ, "CXR_NO_PROGRESS": "1"}
    env.update(_flow_run_env())
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise CxrError(f"cxr {' '.join(args)} failed: {last}")
    return proc.stdout


def _flow_run_env() -> dict[str, str]:
    from prefect.runtime import flow_run

    if not flow_run.id:
        return {}
    return {"CXR_PREFECT_FLOW_RUN": str(flow_run.id), "CXR_PREFECT_FLOW_RUN_NAME": str(flow_run.name)}
