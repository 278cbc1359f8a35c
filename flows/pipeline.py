"""The pipeline flow: fetch → prepare → preview → external sets → train (one task per model) → promote
(champion/challenger, per model) → export → ensemble → evaluate → explain → report.

Run it with ``python -m flows.pipeline [-S key=value ...]``. With no ``PREFECT_API_URL`` Prefect
starts a temporary local server for the run; with one, the run is recorded on that server.
:func:`runner_flow` gives the flow with the task runner its settings ask for (threads up to
``orchestration.max_parallel_training``, or a Dask cluster); ``flows.schedule`` serves that same flow.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from prefect import Flow, State, Task, flow, get_run_logger
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

import flows  # noqa: F401  (environment defaults before Prefect is imported)
from cxr.config import DataConfig, load_config
from cxr.data.external_sets import external_sets
from cxr.data.fetch import resolve_source, source_digest
from cxr.errors import CxrError
from cxr.logs import setup_logging
from cxr.stages import inputs_of, settings_of, write_fingerprints
from cxr.training.ensemble import members_of
from tasks.caching import outputs_intact
from tasks.evaluate import ensemble_task, evaluate_task, explain_task, external_task, report_task
from tasks.export import export_task
from tasks.fetch import fetch_task
from tasks.prepare import prepare_task
from tasks.runner import one_line
from tasks.train import preview_task, promote_task, train_task

log = logging.getLogger("flows.pipeline")

# the pipeline flow with a task runner chosen (what Flow.with_options returns; called, it gives pipeline's result)
PipelineFlow = Flow[..., dict[str, Any]]
# every step's task: a ``cxr`` child process, its result a JSON-able summary
StepTask = Task[..., dict[str, Any]]

SAMPLE_REFUSED = (
    "scheduled retraining needs real data: configure Kaggle credentials or `data.source: dir`"
    " (data.source={source} resolves to the embedded demo sample)"
)


def require_real_data(data: DataConfig) -> str:
    """Refuse the embedded demo sample for scheduled retraining; return the concrete source otherwise.

    Args:
        data: the ``data`` section.

    Returns:
        What ``data.source`` resolves to (``kaggle``, ``dir``, ``medmnist``).

    Raises:
        CxrError: it resolves to the sample (``data.source: auto`` with no Kaggle credentials).
    """
    resolved = resolve_source(data)
    if resolved == "sample":
        raise CxrError(SAMPLE_REFUSED.format(source=data.source))
    return resolved


def _verified(task_obj: StepTask, state: State[dict[str, Any]], kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Trust a cached result only if the files it names are intact; otherwise run the task again."""
    result = state.result()
    if state.is_completed() and state.name == "Cached" and not outputs_intact(result):
        state = task_obj.with_options(refresh_cache=True)(**kwargs, return_state=True)
        result = state.result()
    label = f"{task_obj.name}@{kwargs['model']}" if "model" in kwargs else task_obj.name
    log.info("%s: %s", label, state.name)
    return str(state.name), result  # never None: Prefect names a state after its type when it is not given one


def run_verified(task_obj: StepTask, **kwargs: Any) -> tuple[str, dict[str, Any]]:
    """Run a task in the flow's thread; see :func:`_verified`."""
    return _verified(task_obj, task_obj(**kwargs, return_state=True), kwargs)


def sync_dvc_lock(overrides: list[str] | None) -> str:
    """Record in ``dvc.lock`` what this run produced, so ``dvc status`` agrees with the files on disk.

    The steps' code fingerprints are written first (DVC's ``code`` stage). Only when the run used
    ``params.yaml`` as it is: with overrides, the lock would describe
    parameters the outputs were not made with, so it is left alone (and says so).
    """
    if overrides:
        log.warning("dvc.lock not updated: this run used overrides %s; run dvc repro to realign", overrides)
        return "skipped (overrides)"
    if not (Path("dvc.yaml").is_file() and Path(".dvc").is_dir()):
        return "skipped (no DVC project)"
    write_fingerprints()  # what DVC's `code` stage writes, so the lock describes this code too
    proc = subprocess.run([sys.executable, "-m", "dvc", "commit", "--force", "--quiet"], capture_output=True, text=True)
    if proc.returncode != 0:
        log.warning("dvc commit failed: %s", (proc.stderr.strip().splitlines() or ["?"])[-1])
        return "failed"
    return "committed"


@flow(name="cxr-pipeline", log_prints=False)
def pipeline(
    params_path: str = "params.yaml",
    overrides: list[str] | None = None,
    refresh_source: bool = False,
    scheduled: bool = False,
) -> dict[str, Any]:
    """Run every step; flow parameters (``overrides``) win over ``params.yaml``.

    ``refresh_source`` re-fetches even when the fetch task is cached (scheduled runs: a new Kaggle
    version or new files then flow through; unchanged data leaves every later task cached).
    ``scheduled`` (set by ``flows.schedule``'s deployment) refuses a data source that resolves to the
    embedded demo sample, before any task.

    Models train as separate tasks (each in its own process) and concurrently up to
    ``orchestration.max_parallel_training``; a failed model fails the run only after the others
    finished and kept their results.
    """
    config = load_config(params_path, overrides or [])  # strict: a bad setting stops here, before any task
    if scheduled:
        require_real_data(config.data)
    params = config.as_params()
    get_run_logger().info("task runner: %s", describe_runner())
    states: dict[str, str] = {}

    def settings(stage: str, item: str | None = None) -> dict[str, Any]:
        return settings_of(stage, params, item)

    def inputs(stage: str, item: str | None = None, key: str | None = None) -> list[str]:
        return inputs_of(stage, params, item, key)

    fetch = fetch_task.with_options(refresh_cache=True) if refresh_source else fetch_task
    states["fetch"], fetched = run_verified(
        fetch, settings=settings("fetch"), inputs=inputs("fetch"), source_digest=source_digest(config.data)
    )
    states["prepare"], prepared = run_verified(prepare_task, raw_dir=fetched["raw"], settings=settings("prepare"))
    states["preview"], _ = run_verified(
        preview_task, inputs=inputs("preview"), params_path=params_path, settings=settings("preview")
    )
    for set_name, folder in external_sets(config.evaluate).items():  # before promotion: a set may be its reference
        states[f"external@{set_name}"], _ = run_verified(
            external_task,
            name=set_name,
            inputs=inputs("external", folder, set_name),
            settings=settings("external", folder),
        )
    trained, failures = _train_all(params, params_path, settings, inputs, states)
    models = {}
    for model in trained:  # champion/challenger, one model at a time (cxr promote)
        states[f"promote@{model}"], models[model] = run_verified(
            promote_task,
            model=model,
            inputs=inputs("promote", model),
            params_path=params_path,
            settings=settings("promote", model),
        )
        get_run_logger().info("%s", models[model]["line"])
    if failures:  # after the models that trained were decided on, so they are kept
        raise CxrError("training failed for " + "; ".join(failures) + " (other models were kept)")
    names = list(models)
    scored_names = list(names)
    states["export"], _ = run_verified(
        export_task, inputs=inputs("export"), params_path=params_path, settings=settings("export")
    )
    states["ensemble"], _ = run_verified(
        ensemble_task, inputs=inputs("ensemble"), params_path=params_path, settings=settings("ensemble")
    )
    if members_of(config):
        scored_names.append("ensemble")
    states["evaluate"], _ = run_verified(
        evaluate_task,
        models=scored_names,
        inputs=inputs("evaluate"),
        params_path=params_path,
        settings=settings("evaluate"),
    )
    states["explain"], _ = run_verified(
        explain_task, models=names, inputs=inputs("explain"), params_path=params_path, settings=settings("explain")
    )
    states["report"], reported = run_verified(
        report_task, models=scored_names, inputs=inputs("report"), settings=settings("report")
    )
    states["dvc.lock"] = sync_dvc_lock(overrides)
    return {"states": states, "fetch": fetched, "prepare": prepared, "models": models, "report": reported}


def _train_all(
    params: dict[str, Any],
    params_path: str,
    settings: Callable[[str, str], dict[str, Any]],
    inputs: Callable[[str, str], list[str]],
    states: dict[str, str],
) -> tuple[dict[str, Any], list[str]]:
    """One training task per model, concurrently; (the trained versions, a reason per failed model).

    A failed model fails the run only after the others finished and were promoted or not."""
    jobs = {}
    for model in params["train"]["models"]:
        kwargs = {
            "model": model,
            "inputs": inputs("train", model),
            "params_path": params_path,
            "settings": settings("train", model),
        }
        jobs[model] = (kwargs, train_task.submit(**kwargs, return_state=False))
    models: dict[str, Any] = {}
    failures = []
    for model, (kwargs, future) in jobs.items():
        future.wait()
        state = future.state
        if state.is_failed():
            error = state.result(raise_on_failure=False)
            reason = one_line(error) if isinstance(error, BaseException) else str(state.message)
            failures.append(f"{model}: {reason}")
            states[f"train@{model}"] = "Failed"
            log.error("train@%s failed: %s", model, reason)
            continue
        states[f"train@{model}"], models[model] = _verified(train_task, state, kwargs)
    return models, failures


def pipeline_with_runner(max_parallel: int = 1, dask_address: str | None = None) -> PipelineFlow:
    """The flow with its task runner: local threads (``max_parallel``) or an existing Dask cluster.

    On Dask, each training task (a ``cxr train`` child process) runs on a cluster worker; workers
    must see the same repository checkout (a shared file system or the same path on every host).
    """
    runner: TaskRunner[Any]
    if dask_address:
        from prefect_dask import DaskTaskRunner

        runner = DaskTaskRunner(address=dask_address)
    else:
        runner = ThreadPoolTaskRunner(max_workers=max(1, max_parallel))
    # Prefect's with_options declares a TaskRunner of the base PrefectFuture; its runners are TaskRunners of
    # their own future type, an invariant parameter, so none matches as declared (Prefect casts it internally)
    return pipeline.with_options(task_runner=runner)  # type: ignore[arg-type]


def runner_flow(params: Mapping[str, Any], dask_address: str | None = None) -> PipelineFlow:
    """The flow as ``params`` asks to run it: what ``flows.pipeline`` runs and ``flows.schedule`` serves.

    Args:
        params: the parameters (``load_params``); ``orchestration.max_parallel_training`` bounds the
            models trained at once on local threads.
        dask_address: a Dask scheduler to run the tasks on instead.

    Returns:
        The flow, configured with its task runner.
    """
    return pipeline_with_runner(params["orchestration"]["max_parallel_training"], dask_address)


def describe_runner(runner: object = None) -> str:
    """The task runner in words (the current flow run's when ``runner`` is None), for the run's log."""
    if runner is None:
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
        runner = ctx.task_runner if ctx else None
    address = getattr(runner, "address", None)
    if address:
        return f"Dask cluster at {address}"
    workers = getattr(runner, "_max_workers", None)
    if isinstance(runner, ThreadPoolTaskRunner) and isinstance(workers, int):
        return f"threads, at most {workers} task(s) at once" if workers < sys.maxsize else "threads, unbounded"
    return type(runner).__name__


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--dask", metavar="ADDRESS", help="run tasks on this Dask scheduler (tcp://host:8786)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        params = load_config(args.params, args.set).as_params()
        result = runner_flow(params, args.dask)(params_path=args.params, overrides=args.set)
    except CxrError as exc:
        print(f"cxr: error: {one_line(exc)}", file=sys.stderr)
        return 1
    print(json.dumps(result["states"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
