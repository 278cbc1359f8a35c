"""Training end to end on a tiny learnable synthetic set: outputs, card, determinism, resume, health."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.utils.class_weight import compute_class_weight

from cxr.config import parse_params
from cxr.errors import CxrError, DataError
from cxr.provenance.hashing import sha256_file
from cxr.training.health import HealthConfig, assess
from cxr.training.train import TrainingRejected, class_weights, train
from tests.factories import IMAGE_SIZE, REPO_ROOT, prepared_project, train_smallnet

EPOCHS = 4
COLLAPSING_LR = 10.0  # verified: smallnet collapses to a constant output at this rate for any seed


def make_params(**train_common: Any) -> dict[str, Any]:
    """The repository's params.yaml, shrunk to seconds on a CPU; ``train_common`` overrides train.common."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    # the synthetic classes differ only in brightness, which histogram equalisation removes by design
    params["input"].update(image_size=IMAGE_SIZE, batch_size=8, cache="disk", cache_dir="data/cache", normalize="none")
    common = params["train"]["common"]
    # On this trivially separable set val AUC reaches 1.0 in the first epoch, and a val_auc monitor
    # keeps the *first* epoch of the tie (an uncalibrated model that predicts one class at 0.5), so
    # the runs select on val_loss, which keeps improving.
    common.update(
        tensorboard=False,
        precision="float32",
        monitor="val_loss",
        monitor_mode="min",
        steps_per_epoch=None,
        validation_steps=None,
        # four short epochs: plain Adam as the collapse checks were verified with, and no
        # weight average (it would still sit near the initial weights)
        optimizer="adam",
        weight_decay=0.0,
        label_smoothing=0.0,
        ema=False,
    )
    common.update(copy.deepcopy(train_common))
    params["train"]["smallnet"].update(epochs=EPOCHS, learning_rate=0.001, continue_epochs=0)
    return params


def set_model(params: dict[str, Any], **smallnet: Any) -> dict[str, Any]:
    params = copy.deepcopy(params)
    params["train"]["smallnet"].update(smallnet)
    return params


@pytest.fixture(scope="module")
def base_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder with ``data/raw`` (dark NORMAL, bright PNEUMONIA images) and a real
    ``data/prepared/splits.csv`` (no model yet)."""
    return prepared_project(tmp_path_factory.mktemp("base_project"), make_params(), n_patients=20, hostile=False)


@pytest.fixture(scope="module")
def trained_project(base_project: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """``base_project`` plus one healthy smallnet run with ``make_params()``."""
    root = tmp_path_factory.mktemp("trained_project") / "p"
    shutil.copytree(base_project, root)
    return root, train_smallnet(root, make_params())


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Copy a module-level project into this test's tmp_path and chdir there."""

    def use(source: Path) -> Path:
        root = tmp_path / "project"
        shutil.copytree(source, root)
        monkeypatch.chdir(root)
        return root

    yield use


def weights_of(path: Path) -> list[np.ndarray]:
    import keras

    return keras.saving.load_model(path, safe_mode=True).get_weights()


# --- class weights -----------------------------------------------------------------------------


@pytest.mark.parametrize("counts", [(30, 70), (50, 50), (7, 93)])
def test_balanced_class_weights_match_sklearn(counts):
    labels = np.array([0] * counts[0] + [1] * counts[1], dtype=np.float32)
    weights = class_weights(labels, "balanced")
    expected = compute_class_weight("balanced", classes=np.array([0, 1]), y=labels.astype(int))
    assert set(weights) == {0, 1}
    assert weights[0] == pytest.approx(expected[0]) == pytest.approx(len(labels) / (2 * counts[0]))
    assert weights[1] == pytest.approx(expected[1]) == pytest.approx(len(labels) / (2 * counts[1]))


def test_class_weights_none_and_missing_class():
    labels = np.array([0, 1, 1, 1], dtype=np.float32)
    assert class_weights(labels, "none") is None
    with pytest.raises(DataError, match="lacks a class"):
        class_weights(np.ones(10, dtype=np.float32), "balanced")
    with pytest.raises(DataError, match="lacks a class"):
        class_weights(np.zeros(10, dtype=np.float32), "balanced")


# --- health verdicts ---------------------------------------------------------------------------

LABELS = np.array([0, 1] * 20)
HEALTHY_HISTORY = {"loss": [0.6, 0.4], "val_loss": [0.6, 0.5]}


def test_assess_healthy_model():
    rng = np.random.default_rng(0)
    probabilities = np.clip(LABELS * 0.6 + 0.2 + rng.normal(0, 0.05, len(LABELS)), 0, 1)
    health = assess(LABELS, probabilities, HEALTHY_HISTORY, HealthConfig())
    assert health.status == "healthy"
    assert health.problems == []
    assert health.metrics["auc"] == 1.0


def test_assess_constant_output_is_collapsed():
    health = assess(LABELS, np.full(len(LABELS), 0.73), HEALTHY_HISTORY, HealthConfig())
    assert health.status == "collapsed"
    assert any(p.startswith("constant predictions") for p in health.problems)
    assert "predicts PNEUMONIA for every validation image" in health.problems


def test_assess_nan_history_or_predictions_is_collapsed():
    rng = np.random.default_rng(1)
    good = np.clip(LABELS * 0.6 + 0.2 + rng.normal(0, 0.05, len(LABELS)), 0, 1)
    health = assess(LABELS, good, {"loss": [0.6, float("nan")], "val_loss": [0.5, 0.4]}, HealthConfig())
    assert health.status == "collapsed"
    assert "loss or predictions became NaN" in health.problems
    nan_probs = good.copy()
    nan_probs[3] = np.nan
    health = assess(LABELS, nan_probs, HEALTHY_HISTORY, HealthConfig())
    assert health.status == "collapsed"
    assert "loss or predictions became NaN" in health.problems


def test_assess_single_class_predictions_and_low_auc_are_degenerate():
    rng = np.random.default_rng(2)
    # varied, informative scores but all below the 0.5 threshold
    all_normal = 0.1 + 0.3 * LABELS + rng.uniform(0, 0.05, len(LABELS))
    health = assess(LABELS, all_normal, HEALTHY_HISTORY, HealthConfig())
    assert health.status == "degenerate"
    assert health.problems == ["predicts NORMAL for every validation image"]

    # varied scores on both sides of the threshold, but close to random ranking
    noise = rng.uniform(0, 1, len(LABELS))
    health = assess(LABELS, noise, HEALTHY_HISTORY, HealthConfig(min_val_auc=0.99))
    assert health.status == "degenerate"
    assert len(health.problems) == 1 and health.problems[0].startswith("validation AUC ")
    assert "< 0.99" in health.problems[0]


def test_health_config_rejects_unknown_action():
    with pytest.raises(ValueError, match="on_collapse"):
        HealthConfig(on_collapse="ignore")


# --- end to end --------------------------------------------------------------------------------


def test_train_writes_model_card_and_reports(trained_project):
    import keras

    root, card = trained_project
    model_path = root / "models/smallnet.keras"
    card_path = root / "models/smallnet.card.json"
    assert model_path.is_file() and card_path.is_file()
    saved = json.loads(card_path.read_text())
    assert saved == json.loads(json.dumps(card))  # the returned card is the one written
    # the card, written last, names the bytes of every report shipped with the model
    assert saved["reports"]["sha256"] == {
        name: sha256_file(root / "reports/train/smallnet" / name) for name in saved["reports"]["sha256"]
    }
    assert set(saved["reports"]["sha256"]) == {
        "history.csv",
        "summary.txt",
        "architecture.png",
        "curves.png",
        "metrics.json",
    }
    assert saved["model"] == "smallnet"
    assert saved["model_sha256"] == sha256_file(model_path)
    assert saved["data"]["splits_sha256"] == sha256_file(root / "data/prepared/splits.csv")
    assert saved["data"]["manifest_sha256"] == sha256_file(root / "data/prepared/manifest.csv")
    splits = pd.read_csv(root / "data/prepared/splits.csv")
    assert saved["data"]["train_images"] == int((splits["split"] == "train").sum())
    assert saved["data"]["val_images"] == int((splits["split"] == "val").sum())
    assert saved["epochs_run"] == EPOCHS
    assert saved["initial_epoch"] == 0
    assert 1 <= saved["best_epoch"] <= EPOCHS
    assert saved["validation"]["auc"] >= 0.6
    assert saved["health"] == {"status": "healthy", "problems": []}
    assert saved["resumed_interrupted_run"] is False
    assert saved["continued_from"] is None
    assert saved["precision_policy"] == "float32"
    assert saved["input"]["preprocessing"]["image_size"] == IMAGE_SIZE

    reports = root / "reports/train/smallnet"
    for name in ("history.csv", "metrics.json", "curves.png", "architecture.png", "summary.txt"):
        assert (reports / name).is_file(), name
        assert (reports / name).stat().st_size > 0, name
    history = pd.read_csv(reports / "history.csv")
    assert history["epoch"].tolist() == list(range(EPOCHS))
    assert {"loss", "val_loss", "val_auc"} <= set(history.columns)
    metrics = json.loads((reports / "metrics.json").read_text())
    assert metrics["health"] == "healthy"
    assert metrics["epochs_run"] == EPOCHS
    assert "conv3" in (reports / "summary.txt").read_text()
    assert not (root / "models/.work/smallnet").exists()  # scratch checkpoints are cleaned up
    assert not list((root / "models/.backup").rglob("*.h5"))

    model = keras.saving.load_model(model_path, safe_mode=True)
    assert model.name == "smallnet"
    assert saved["parameters"]["total"] == model.count_params()
    noise = np.random.default_rng(5).normal(0, 25, (8, IMAGE_SIZE, IMAGE_SIZE, 1))
    dark = np.repeat(np.clip(40 + noise, 0, 255), 3, axis=-1).astype(np.float32) / 255
    bright = np.repeat(np.clip(210 + noise, 0, 255), 3, axis=-1).astype(np.float32) / 255
    assert model.predict(dark, verbose=0).max() < 0.5 < model.predict(bright, verbose=0).min()


def test_train_without_splits_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="run the prepare step first"):
        train("smallnet", parse_params(make_params()))


def test_training_is_deterministic(trained_project, base_project, project):
    root, card = trained_project
    reference = weights_of(root / "models/smallnet.keras")

    project(base_project)
    again = train("smallnet", parse_params(make_params()))
    assert again["health"]["status"] == "healthy"
    repeated = weights_of(Path("models/smallnet.keras"))
    assert len(repeated) == len(reference)
    for a, b in zip(reference, repeated, strict=True):
        np.testing.assert_array_equal(a, b)
    assert again["validation"] == card["validation"]

    train("smallnet", parse_params(make_params(seed=7)))
    other = weights_of(Path("models/smallnet.keras"))
    assert any(not np.array_equal(a, b) for a, b in zip(reference, other, strict=True))


def test_continue_epochs_trains_on_from_the_saved_model(trained_project, project):
    root, first = trained_project
    project(root)
    card = train("smallnet", parse_params(set_model(make_params(), continue_epochs=2)))
    assert card["initial_epoch"] == EPOCHS
    assert card["epochs_run"] == EPOCHS + 2
    assert card["continued_from"] == first["model_sha256"]
    assert card["model_sha256"] == sha256_file("models/smallnet.keras") != first["model_sha256"]
    history = pd.read_csv("reports/train/smallnet/history.csv")
    assert history["epoch"].tolist() == list(range(EPOCHS + 2))  # the first run's rows are kept


def test_continue_epochs_refuses_a_tampered_model(trained_project, project):
    root, _ = trained_project
    project(root)
    with open("models/smallnet.keras", "ab") as handle:
        handle.write(b"tampered")
    before = Path("models/smallnet.card.json").read_bytes()
    with pytest.raises(CxrError, match="does not match its card"):
        train("smallnet", parse_params(set_model(make_params(), continue_epochs=2)))
    assert Path("models/smallnet.card.json").read_bytes() == before


def test_continue_epochs_without_a_saved_model(base_project, project):
    project(base_project)
    with pytest.raises(CxrError, match=r"no saved models/smallnet\.keras"):
        train("smallnet", parse_params(set_model(make_params(), continue_epochs=2)))


def _reports(root: Path = Path(".")) -> dict[str, bytes]:
    folder = root / "reports/train/smallnet"
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_collapse_with_fail_keeps_the_previous_model(trained_project, project):
    root, _ = trained_project
    project(root)
    model_before = Path("models/smallnet.keras").read_bytes()
    card_before = Path("models/smallnet.card.json").read_bytes()
    reports_before = _reports()
    params = set_model(make_params(health={"on_collapse": "fail"}), learning_rate=COLLAPSING_LR)
    with pytest.raises(TrainingRejected, match=r"smallnet: model is (collapsed|degenerate)") as info:
        train("smallnet", parse_params(params))
    assert "models/.rejected" in str(info.value)
    assert Path("models/smallnet.keras").read_bytes() == model_before
    assert Path("models/smallnet.card.json").read_bytes() == card_before
    # the shipped model's history, curves, metrics and summary are its own, not the rejected run's
    assert _reports() == reports_before
    rejected_history = pd.read_csv("models/.rejected/smallnet.reports/history.csv")
    assert rejected_history["epoch"].tolist() == list(range(EPOCHS))
    assert not list(Path("reports/train").glob(".smallnet.tmp-*"))  # no staging folder left behind
    rejected_card = json.loads(Path("models/.rejected/smallnet.card.json").read_text())
    assert rejected_card["health"]["status"] in {"collapsed", "degenerate"}
    assert rejected_card["health"]["problems"]
    assert rejected_card["model_sha256"] == sha256_file("models/.rejected/smallnet.keras")
    assert rejected_card["model_file"] == "models/.rejected/smallnet.keras"


def test_collapse_with_fail_and_no_previous_model(base_project, project):
    project(base_project)
    params = set_model(make_params(health={"on_collapse": "fail"}), learning_rate=COLLAPSING_LR)
    with pytest.raises(TrainingRejected):
        train("smallnet", parse_params(params))
    assert not Path("models/smallnet.keras").exists()
    assert not Path("models/smallnet.card.json").exists()
    assert Path("models/.rejected/smallnet.keras").is_file()


def test_an_unreachable_health_threshold_rejects_a_good_model(base_project, project):
    project(base_project)
    # a probability's std cannot reach 0.5 (half exactly 0, half exactly 1), so every model fails this check;
    # min_val_auc cannot be set above 1 any more (the strict config refuses it), and a good model reaches 1.0 here
    params = make_params(health={"on_collapse": "fail", "min_prediction_std": 0.5})
    with pytest.raises(TrainingRejected, match=r"collapsed: constant predictions \(std [0-9.]+ < 0\.5\)"):
        train("smallnet", parse_params(params))
    assert not Path("models/smallnet.keras").exists()


def test_collapse_with_warn_keeps_the_flagged_model(base_project, project):
    import keras

    project(base_project)
    params = set_model(make_params(health={"on_collapse": "warn"}), learning_rate=COLLAPSING_LR)
    card = train("smallnet", parse_params(params))
    assert card["health"]["status"] in {"collapsed", "degenerate"}
    assert card["health"]["problems"]
    saved = json.loads(Path("models/smallnet.card.json").read_text())
    assert saved["health"]["status"] != "healthy"
    assert saved["model_sha256"] == sha256_file("models/smallnet.keras")
    assert json.loads(Path("reports/train/smallnet/metrics.json").read_text())["health"] != "healthy"
    keras.saving.load_model("models/smallnet.keras", safe_mode=True)


# --- resume after a kill -----------------------------------------------------------------------


def _cli(overrides: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "cxr", "train", "--model", "smallnet"]
    for item in overrides:
        cmd += ["-S", item]
    return cmd


def _history_rows(path: Path) -> int:
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return 0
    return max(len(lines) - 1, 0)


@pytest.mark.slow
def test_resume_after_a_kill(base_project, project):
    root = project(base_project)
    epochs = 12
    overrides = [
        f"train.smallnet.epochs={epochs}",
        "train.common.early_stopping.enabled=false",
        "input.cache_dir=data/cache",
        "train.common.tensorboard=false",
    ]
    env = {**os.environ, "CXR_NO_PROGRESS": "1", "PYTHONPATH": str(REPO_ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    history = root / "reports/train/smallnet/history.csv"  # the shipped model's, written when it ships
    backup = root / "models/.backup/smallnet"

    def run_history() -> Path:  # the running run's own history, kept beside its backup for a resume
        found = sorted((root / "models/.work/smallnet").glob("history-*.csv"))
        return found[0] if found else root / "models/.work/smallnet/history-none.csv"

    proc = subprocess.Popen(_cli(overrides), cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while _history_rows(run_history()) < 2:
            assert proc.poll() is None, f"training ended early: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no epoch finished within 120 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    rows_at_kill = _history_rows(run_history())
    history_at_kill = run_history().read_text()
    assert 2 <= rows_at_kill < epochs
    assert list(backup.rglob("latest.weights.h5")), "no backup left by the killed run"
    assert not (root / "models/smallnet.keras").exists()
    assert not history.exists()  # nothing shipped yet: no history of a model that does not exist

    done = subprocess.run(_cli(overrides), cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming an interrupted run" in done.stderr
    # the rerun trains only the epochs the killed run had not finished (EpochLine logs them 1-based)
    # A kill between an epoch's history row and its backup makes the rerun redo that one epoch.
    rerun_epochs = [int(m) for m in re.findall(rf"smallnet epoch (\d+)/{epochs} ", done.stderr)]
    first = rerun_epochs[0]
    assert first in (rows_at_kill, rows_at_kill + 1) and first > 1
    assert rerun_epochs == list(range(first, epochs + 1))
    kept_rows = "".join(history_at_kill.splitlines(keepends=True)[:first])  # header + epochs before `first`
    assert history.read_text().startswith(kept_rows)  # the killed run's completed rows are kept
    frame = pd.read_csv(history)
    assert frame["epoch"].tolist() == list(range(epochs))  # each epoch once, resumed ones appended
    card = json.loads((root / "models/smallnet.card.json").read_text())
    assert card["resumed_interrupted_run"] is True
    assert card["epochs_run"] == epochs
    assert card["model_sha256"] == sha256_file(root / "models/smallnet.keras")
    assert not [p for p in backup.rglob("*") if p.is_file()], "the backup outlived a finished run"
    assert not (backup / card["run_key"]).exists()
