"""Scheduled retraining: serve the pipeline flow on a cron schedule.

    python -m flows.schedule --cron "0 3 * * 1" [--name weekly] [-S key=value ...]

Each scheduled run re-checks the data source (``refresh_source``). Tasks are keyed on content,
so a run that finds the data unchanged trains nothing; new data retrains, and every new model
appends a lineage record. Set ``PREFECT_API_URL`` to register the deployment on a Prefect server
(its UI then shows the runs and the report artifacts); without it a temporary local server is
used for as long as this process serves.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import flows  # noqa: F401  (environment defaults before Prefect is imported)
from cxr.config import load_config
from cxr.errors import CxrError
from cxr.logs import setup_logging
from flows.pipeline import pipeline


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.schedule", description=__doc__.splitlines()[0])
    parser.add_argument("--cron", required=True, help='cron schedule, e.g. "0 3 * * 1" (Mondays 03:00)')
    parser.add_argument("--name", default="scheduled-retraining", help="deployment name")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--timezone", default="UTC")
    args = parser.parse_args(argv)
    setup_logging()
    try:  # a bad setting would otherwise fail every scheduled run; refuse it before serving
        load_config(args.params, args.set)
    except CxrError as exc:
        print(f"cxr: error: {exc}", file=sys.stderr)
        return 1
    pipeline.serve(
        name=args.name,
        cron=args.cron,
        parameters={"params_path": args.params, "overrides": args.set, "refresh_source": True},
        description="Chest X-ray pipeline: refetch, and retrain only what changed",
        tags=["cxr", "retraining"],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
