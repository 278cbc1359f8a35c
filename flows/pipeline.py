"""The pipeline flow: fetch → prepare (later: train → evaluate → explain → report).

Run it with ``python -m flows.pipeline [-S key=value ...]``. With no ``PREFECT_API_URL`` Prefect
starts a temporary local server for the run; with one, the run is recorded on that server.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from prefect import flow

import flows  # noqa: F401  (environment defaults before Prefect is imported)
from cxr.errors import CxrError
from cxr.fetch import source_digest
from cxr.logs import setup_logging
from cxr.params import load_params, section
from tasks.caching import outputs_intact
from tasks.fetch import fetch_task
from tasks.prepare import prepare_task

log = logging.getLogger("flows.pipeline")


def run_verified(task_obj: Any, **kwargs: Any) -> tuple[str, dict[str, Any]]:
    """Run a task; if its cached result names files that changed or vanished, run it again."""
    state = task_obj(**kwargs, return_state=True)
    result = state.result()
    if state.is_completed() and state.name == "Cached" and not outputs_intact(result):
        state = task_obj.with_options(refresh_cache=True)(**kwargs, return_state=True)
        result = state.result()
    log.info("%s: %s", task_obj.name, state.name)
    return state.name, result


@flow(name="cxr-pipeline", log_prints=False)
def pipeline(params_path: str = "params.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """Run every step; flow parameters (``overrides``) win over ``params.yaml``."""
    params = load_params(params_path, overrides or [])
    data = section(params, "data")
    states: dict[str, str] = {}
    states["fetch"], fetched = run_verified(fetch_task, data=data, source_digest=source_digest(data))
    states["prepare"], prepared = run_verified(
        prepare_task, raw_dir=fetched["raw"], split_params=section(params, "split"),
        prepare_params=params.get("prepare") or {},
    )
    return {"states": states, "fetch": fetched, "prepare": prepared}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        result = pipeline(params_path=args.params, overrides=args.set)
    except CxrError as exc:
        print(f"cxr: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result["states"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
