"""The Prefect flow, on the real Prefect engine (and a real Dask cluster): content-keyed caching of every
step; how a task runs a `cxr` step (its log lines passed on at their level, a failure summarised in one
line)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

import flows  # noqa: F401  (the flows' Prefect defaults, e.g. no telemetry, before Prefect reads its settings)
from tests.factories import REPO_ROOT, kermany_layout, write_image

SMALL_TRAINING = [
    "train.models=[smallnet]",
    "ensemble.members=[]",
    "train.smallnet.epochs=1",
    "train.common.steps_per_epoch=2",
    "train.common.tensorboard=false",
    "train.common.health.on_collapse=warn",
    "input.image_size=32",
    "input.batch_size=8",
    "evaluate.bootstrap=50",
    "evaluate.gradcam_per_outcome=1",
    # the export task runs `cxr export` like the DVC stage; the ONNX export through the pipeline is
    # tests/test_dvc_pipeline.py::test_repro_trains_each_model_then_reruns_exactly_what_a_change_touches
    "export.formats=[]",
]
# the tasks of the flow in test_a_second_run_is_cached_and_each_change_reruns_only_what_it_touches
TASKS = [
    "fetch",
    "prepare",
    "preview",
    "train@smallnet",
    "train@cxrnet",
    "promote@smallnet",
    "promote@cxrnet",
    "external@site_b",
    "export",
    "ensemble",
    "evaluate",
    "explain",
    "report",
]


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory):
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect-results")
    with (
        prefect_test_harness(server_startup_timeout=120),
        temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: str(storage)}),
    ):
        yield


@pytest.mark.slow
def test_a_second_run_is_cached_and_each_change_reruns_only_what_it_touches(
    prefect_env, make_dataset, tmp_path, monkeypatch
):
    """Two models, their ensemble and an outside set in the flow, the first run on a real Dask cluster (two
    worker processes: the two trainings run at once); a second run on local threads is all cache hits (what
    the cluster's tasks cached is what a local run looks up); then one change of the data at a time. (One
    flow: each change costs a run, not a first run and a second one.)"""
    import json
    from datetime import datetime, timedelta

    from dask.distributed import Client, LocalCluster

    from flows.pipeline import pipeline, pipeline_with_runner

    src = make_dataset(kermany_layout(n_patients=15), root=tmp_path / "xrays")
    site = make_dataset(
        {
            "NORMAL": [f"IM-{900 + i:04d}-0001.jpeg" for i in range(5)],
            "PNEUMONIA": [f"person{900 + i}_virus_{i}.jpeg" for i in range(5)],
        },
        root=tmp_path / "site",
    )
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    args = [
        "data.source=dir",
        f"data.dir={src}",
        "prepare.min_images_per_class=1",
        *SMALL_TRAINING,
        "train.models=[smallnet, cxrnet]",
        "train.cxrnet.epochs=1",
        "ensemble.members=[smallnet, cxrnet]",
        f"evaluate.external={json.dumps({'site_b': str(site)})}",
    ]

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        first = pipeline_with_runner(dask_address=cluster.scheduler_address)(overrides=args)
        workers = {w["id"] for w in client.scheduler_info()["workers"].values()}
    assert set(first["states"].values()) <= {"Completed", "skipped (overrides)"}
    assert len(workers) == 2
    cards = {m: json.loads(Path(f"models/{m}.card.json").read_text()) for m in ("smallnet", "cxrnet")}
    assert all(c["run"]["driver"] == "prefect" and c["epochs_run"] == 1 for c in cards.values())
    # the two trainings overlapped in time: each started before the other finished
    spans = []
    for card in cards.values():
        end = datetime.fromisoformat(card["created"])
        spans.append((end - timedelta(seconds=card["timings"]["total_seconds"] + 1), end))
    (a_start, a_end), (b_start, b_end) = spans
    assert a_start < b_end and b_start < a_end, spans
    assert sorted(k for k in first["states"] if k != "dvc.lock") == sorted(TASKS)
    assert Path("data/prepared/splits.csv").is_file()
    metrics = json.loads(Path("reports/metrics.json").read_text())
    assert set(metrics["external"]["site_b"]["models"]) == {"smallnet", "cxrnet", "ensemble"}

    second = pipeline(overrides=args)
    assert {k: v for k, v in second["states"].items() if k != "dvc.lock"} == dict.fromkeys(TASKS, "Cached")
    assert second["prepare"] == first["prepare"]

    # (which steps a parameter reruns is decided on the steps' cache keys, the same decision as DVC's:
    # tests/test_stages.py checks both drivers' decisions; this flow checks that the keys are honoured)

    # a new image at the outside site: index and scoring rerun, training and the ensemble stay cached; and a
    # deleted output is never trusted: its task runs again (it writes the same split, so nothing after it
    # reruns for it)
    write_image(site / "NORMAL" / "IM-0999-0001.jpeg", seed=4242)
    os.remove("data/prepared/splits.csv")
    third = pipeline(overrides=args)
    ran = {k for k, v in third["states"].items() if v == "Completed"}
    assert {"prepare", "external@site_b", "evaluate", "report"} <= ran
    assert not ran & {"fetch", "preview", "train@smallnet", "train@cxrnet", "ensemble"}
    assert json.loads(Path("reports/metrics.json").read_text())["external"]["site_b"]["n"] == 11
    assert third["states"]["fetch"] == "Cached" and Path("data/prepared/splits.csv").is_file()

    # new data in the source folder: fetch, prepare and everything downstream of the split rerun
    write_image(src / "train/NORMAL/IM-0999-0001.jpeg", seed=999)
    fourth = pipeline(overrides=args)
    assert fourth["states"]["fetch"] == "Completed" and fourth["states"]["prepare"] == "Completed"
    assert fourth["states"]["train@smallnet"] == "Completed" and fourth["states"]["train@cxrnet"] == "Completed"


@pytest.mark.slow
def test_a_failing_model_fails_the_run_but_keeps_the_others(prefect_env, make_dataset, tmp_path, monkeypatch):
    from cxr.errors import CxrError
    from flows.pipeline import pipeline

    src = make_dataset(kermany_layout(n_patients=12), root=tmp_path / "xrays")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    args = [
        "data.source=dir",
        f"data.dir={src}",
        "prepare.min_images_per_class=1",
        # a valid configuration whose training fails at run time: nothing saved to continue from
        "train.models=[smallnet, orphan]",
        "train.orphan.architecture=smallnet",
        "train.orphan.continue_epochs=1",
        "ensemble.members=[]",
        "train.smallnet.epochs=1",
        "train.common.steps_per_epoch=2",
        "train.common.tensorboard=false",
        "train.common.health.on_collapse=warn",
        "input.image_size=32",
        "input.batch_size=8",
    ]
    with pytest.raises(CxrError, match=r"training failed for orphan: .*no saved models/orphan\.keras"):
        pipeline(overrides=args)
    card = Path("models/smallnet.card.json")
    assert card.is_file() and Path("models/smallnet.keras").is_file()  # the healthy model was kept


@pytest.mark.slow
def test_a_flow_parameter_naming_an_unknown_model_fails_before_any_task(prefect_env, tmp_path, monkeypatch):
    from cxr.config import ConfigError
    from flows.pipeline import pipeline

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    with pytest.raises(ConfigError, match=r"train\.nosuchnet: unknown model 'nosuchnet'"):
        pipeline(overrides=["train.models=[smallnet, nosuchnet]"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing fetched, nothing written


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_step_s_log_lines_keep_their_level_and_a_failure_is_summarised_in_one_line(tmp_path, monkeypatch):
    from tasks.runner import StepFailed, forward, one_line, run_cxr

    sink = logging.getLogger("test.forward")
    sink.propagate, sink.level = False, logging.DEBUG
    collected = _Collect()
    sink.addHandler(collected)
    for line in [
        "12:03:44 INFO    cxr.training.train: smallnet epoch 1/3 4s loss=0.6931",
        "12:03:45 WARNING cxr.training.health: smallnet: predictions collapsed",
        "cxr: error: data.dir=/x: not found",
        "Traceback (most recent call last):",
        "E0000 00:00:1795936100.488661   15247 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)",
    ]:
        forward(sink, line)
    assert [(r.levelname, r.getMessage()) for r in collected.records] == [
        ("INFO", "cxr.training.train: smallnet epoch 1/3 4s loss=0.6931"),
        ("WARNING", "cxr.training.health: smallnet: predictions collapsed"),
        ("ERROR", "cxr: error: data.dir=/x: not found"),
        ("WARNING", "Traceback (most recent call last):"),
        (
            "DEBUG",
            "E0000 00:00:1795936100.488661   15247 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)",
        ),
    ]

    # a real child that fails: outside a Prefect run its lines go to the tasks.runner logger
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    runner_log = logging.getLogger("tasks.runner")
    seen = _Collect()
    runner_log.addHandler(seen)
    try:
        with pytest.raises(StepFailed) as failed:
            run_cxr(["fetch"], "params.yaml", extra_overrides=["data.source=dir", f"data.dir={tmp_path / 'nowhere'}"])
    finally:
        runner_log.removeHandler(seen)
    summary = one_line(failed.value)
    assert summary.startswith("cxr fetch failed (exit 1): ") and "nowhere" in summary and "\n" not in summary
    assert str(failed.value).splitlines()[0] == summary and failed.value.tail
    assert any(r.levelname == "ERROR" and "nowhere" in r.getMessage() for r in seen.records), seen.records


@pytest.mark.slow
def test_a_scheduled_run_refuses_the_embedded_demo_sample_before_any_task(prefect_env, tmp_path, monkeypatch):
    from cxr.errors import CxrError
    from flows.pipeline import pipeline

    for var in ("KAGGLE_API_TOKEN", "KAGGLE_API_V1_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no-kaggle"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    with pytest.raises(CxrError, match=r"^scheduled retraining needs real data: configure Kaggle credentials"):
        pipeline(overrides=["data.source=auto"], refresh_source=True, scheduled=True)
    assert not (tmp_path / "data").exists()  # nothing fetched
