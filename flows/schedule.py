"""Scheduled retraining: serve the pipeline flow on a cron schedule.

    python -m flows.schedule --cron "0 3 * * 1" [--timezone Europe/Paris] [--name weekly]
                             [--dask tcp://host:8786] [-S key=value ...]

The served flow is the one ``python -m flows.pipeline`` runs, with the same task runner: local
threads, at most ``orchestration.max_parallel_training`` models training at once, or the Dask
cluster named by ``--dask``. The cron expression is read in ``--timezone`` (IANA name; default UTC).

Each scheduled run re-checks the data source (``refresh_source``). Tasks are keyed on content,
so a run that finds the data unchanged trains nothing; new data retrains, and every new model
appends a lineage record. Scheduled runs never train on the embedded demo sample: a source that
resolves to it is refused here, before serving, and again by each run. Set ``PREFECT_API_URL`` to
register the deployment on a Prefect server (its UI then shows the runs, each step's log and the
report artifacts); without it a temporary local server is used for as long as this process serves.
"""

from __future__ import annotations

import argparse
import sys
import zoneinfo
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import flows  # noqa: F401  (environment defaults before Prefect is imported)
from cxr.config import load_config
from cxr.errors import CxrError
from cxr.logs import setup_logging
from cxr.safe_text import printable
from flows.pipeline import PipelineFlow, require_real_data, runner_flow

if TYPE_CHECKING:
    from prefect.schedules import Schedule


@dataclass(frozen=True)
class Served:
    """What :func:`main` serves: the runner-configured flow and the arguments of its ``serve`` call."""

    flow: PipelineFlow
    serve_kwargs: dict[str, Any]


def cron_schedule(expression: str, timezone: str) -> Schedule:
    """A Prefect cron schedule read in ``timezone``.

    Args:
        expression: five cron fields, e.g. ``"0 3 * * 1"``.
        timezone: an IANA time-zone name, e.g. ``"Europe/Paris"``.

    Returns:
        The schedule (``prefect.schedules.Cron``).

    Raises:
        CxrError: an unknown time zone or an invalid cron expression (one line each).
    """
    from prefect.schedules import Cron

    if timezone not in zoneinfo.available_timezones():
        raise CxrError(
            f"--timezone {printable(timezone)}: unknown time zone; give an IANA name such as UTC or Europe/Paris"
        )
    try:
        return Cron(expression, timezone=timezone)
    except ValueError:
        raise CxrError(
            f'--cron {printable(expression)}: not a cron expression; give five fields, e.g. "0 3 * * 1" (Mondays 03:00)'
        ) from None


def plan(argv: Sequence[str] | None = None) -> Served:
    """Parse the command line and check everything a scheduled run depends on, before serving.

    Args:
        argv: the command-line arguments (``sys.argv[1:]`` when None).

    Returns:
        The flow to serve and the ``serve`` arguments.

    Raises:
        CxrError: a bad setting, time zone or cron expression, or a source that resolves to the
            embedded demo sample (one line each).
    """
    parser = argparse.ArgumentParser(prog="python -m flows.schedule", description=__doc__.splitlines()[0])
    parser.add_argument("--cron", required=True, help='cron schedule, e.g. "0 3 * * 1" (Mondays 03:00)')
    parser.add_argument("--timezone", default="UTC", help="IANA time zone the cron schedule is read in (default: UTC)")
    parser.add_argument(
        "--name", default="scheduled-retraining", help="deployment name (default: scheduled-retraining)"
    )
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="override a parameter")
    parser.add_argument("--dask", metavar="ADDRESS", help="run the tasks on this Dask scheduler (tcp://host:8786)")
    args = parser.parse_args(argv)
    schedule = cron_schedule(args.cron, args.timezone)
    config = load_config(args.params, args.set)  # a bad setting would otherwise fail every scheduled run
    require_real_data(config.data)
    return Served(
        flow=runner_flow(config.as_params(), args.dask),
        serve_kwargs={
            "name": args.name,
            "schedules": [schedule],
            "parameters": {
                "params_path": args.params,
                "overrides": args.set,
                "refresh_source": True,
                "scheduled": True,
            },
            "description": "Chest X-ray pipeline: refetch, and retrain only what changed",
            "tags": ["cxr", "retraining"],
        },
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the pipeline on its schedule until interrupted; 1 after a one-line error."""
    setup_logging()
    try:
        served = plan(argv)
    except CxrError as exc:
        print(f"cxr: error: {exc}", file=sys.stderr)
        return 1
    served.flow.serve(**served.serve_kwargs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
