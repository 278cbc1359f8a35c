"""Scale-out: the flow's training tasks on a real Dask cluster (two worker processes)."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from tests.factories import REPO_ROOT, kermany_layout

pytestmark = pytest.mark.slow


def test_two_models_train_concurrently_on_a_local_dask_cluster(make_dataset, tmp_path, monkeypatch):
    from dask.distributed import Client, LocalCluster
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline_with_runner

    source = make_dataset(kermany_layout(n_patients=12), root=tmp_path / "xrays")
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(REPO_ROOT / "params.yaml", work / "params.yaml")
    monkeypatch.chdir(work)
    overrides = [
        "data.source=dir",
        f"data.dir={source}",
        "prepare.min_images_per_class=1",
        "train.models=[smallnet, cxrnet]",
        "ensemble.members=[]",
        "train.smallnet.epochs=2",
        "train.cxrnet.epochs=2",
        "train.common.steps_per_epoch=3",
        "train.common.tensorboard=false",
        "train.common.health.on_collapse=warn",
        "input.image_size=32",
        "input.batch_size=8",
        "evaluate.bootstrap=50",
        "evaluate.gradcam_per_outcome=1",
        "export.formats=[]",
    ]
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
        prefect_test_harness(server_startup_timeout=120),
        temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: str(tmp_path / "results")}),
    ):
        result = pipeline_with_runner(dask_address=cluster.scheduler_address)(overrides=overrides)
        workers = {w["id"] for w in client.scheduler_info()["workers"].values()}
    assert result["states"]["train@smallnet"] == "Completed" and result["states"]["train@cxrnet"] == "Completed"
    assert len(workers) == 2
    cards = {m: json.loads(Path(f"models/{m}.card.json").read_text()) for m in ("smallnet", "cxrnet")}
    assert all(c["epochs_run"] == 2 for c in cards.values())
    # the two trainings overlapped in time: each started before the other finished
    spans = {}
    for name, card in cards.items():
        end = datetime.fromisoformat(card["created"])
        spans[name] = (end - timedelta(seconds=card["timings"]["total_seconds"] + 1), end)
    (a_start, a_end), (b_start, b_end) = spans.values()
    assert a_start < b_end and b_start < a_end, spans
    assert all(c["run"]["driver"] == "prefect" for c in cards.values())
    assert Path("reports/report.html").is_file()
