"""`dvc repro` on a fresh copy of the repository with the shared 224-px set (real DVC)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, SHARED_DATA

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SHARED_DATA / "chest_xray_224").is_dir(), reason="shared 224-px data absent"),
]


def _run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.fixture
def fresh_clone(tmp_path: Path) -> Path:
    """The repository's tracked files (as a clone would have them), in a new git repository."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO_ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    clone = tmp_path / "clone"
    for rel in filter(None, files):
        if (REPO_ROOT / rel).is_file() and not rel.startswith("dvc.lock"):
            (clone / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / rel, clone / rel)
    _run(["git", "init", "-q"], clone)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], clone)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "clone"], clone)
    return clone


def _set_params(clone: Path, **changes: object) -> None:
    params = yaml.safe_load((clone / "params.yaml").read_text())
    for key, value in changes.items():
        *parents, name = key.split("__")
        node = params
        for part in parents:
            node = node[part]
        node[name] = value
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_repro_builds_the_dataset_then_does_nothing(fresh_clone):
    _set_params(fresh_clone, data__source="dir", data__dir=str(SHARED_DATA / "chest_xray_224"))
    out = _run(["dvc", "repro", "prepare"], fresh_clone)
    assert "Running stage 'fetch'" in out and "Running stage 'prepare'" in out
    splits = (fresh_clone / "data/prepared/splits.csv").read_text().splitlines()
    assert len(splits) == 1 + 5216 and splits[0].startswith("path,")
    quality = json.loads((fresh_clone / "reports/data_quality.json").read_text())
    assert quality["images_usable"] == 5216
    assert quality["splits"]["patient"]["leakage"]["clean"] is True
    assert quality["splits"]["seed"]["leakage"]["patients_shared"]["train-test"] > 0
    assert (fresh_clone / "reports/plots/class_distribution.png").is_file()

    again = _run(["dvc", "repro", "prepare"], fresh_clone)
    assert "Running stage" not in again

    # a split parameter reruns prepare only
    _set_params(fresh_clone, split__seed=7)
    changed = _run(["dvc", "repro", "prepare"], fresh_clone)
    assert "Running stage 'prepare'" in changed and "Running stage 'fetch'" not in changed


def test_repro_trains_each_model_and_retrains_only_the_changed_one(fresh_clone):
    _set_params(fresh_clone, data__source="dir", data__dir=str(SHARED_DATA / "chest_xray_224"),
                train__common__steps_per_epoch=4, train__common__tensorboard=False,
                train__common__health__on_collapse="warn",
                train__smallnet__epochs=1, train__cxrnet__epochs=1)
    out = _run(["dvc", "repro"], fresh_clone)
    for stage in ("fetch", "prepare", "preview", "train@smallnet", "train@cxrnet"):
        assert f"Running stage '{stage}'" in out
    for model in ("smallnet", "cxrnet"):
        card = json.loads((fresh_clone / f"models/{model}.card.json").read_text())
        assert card["epochs_run"] == 1 and card["data"]["train_images"] > 3000
        assert (fresh_clone / f"reports/train/{model}/metrics.json").is_file()
    metrics = _run(["dvc", "metrics", "show", "--json"], fresh_clone)
    assert "reports/train/smallnet/metrics.json" in metrics
    assert "Running stage" not in _run(["dvc", "repro"], fresh_clone)
    assert "up to date" in _run(["dvc", "status"], fresh_clone)

    _set_params(fresh_clone, train__smallnet__learning_rate=0.0005)
    changed = _run(["dvc", "repro"], fresh_clone)
    assert "Running stage 'train@smallnet'" in changed
    for stage in ("fetch", "prepare", "preview", "train@cxrnet"):
        assert f"Running stage '{stage}'" not in changed
