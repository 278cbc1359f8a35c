"""The levers tried for ranking (issue 15): mixup, the cosine schedule with warm-up, a fixed budget
(``checkpoint: last``), on tiny synthetic data; and one short real training run that uses all three."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxr.runtime import tensorflow
from cxr.training.input_pipeline import InputConfig, make_dataset, mixup_batch
from cxr.training.train import TrainConfig, _best_epoch, learning_rate_schedule
from tests.factories import chdir, prepared_project, small_params

tf = tensorflow()
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def _flat_batch(n: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Images whose every pixel equals their label, so a blend of images is the blend of labels."""
    labels = np.linspace(0.0, 1.0, n).astype(np.float32)
    images = np.broadcast_to(labels[:, None, None, None], (n, 4, 4, 3)).astype(np.float32).copy()
    return images, labels


def test_mixup_blends_images_and_labels_with_the_same_weight() -> None:
    images, labels = _flat_batch()
    mixed, soft = (t.numpy() for t in mixup_batch(tf.constant(images), tf.constant(labels), 0.4, tf.constant([3, 4])))
    assert mixed.shape == images.shape and soft.shape == labels.shape
    np.testing.assert_allclose(mixed.mean(axis=(1, 2, 3)), soft, atol=1e-6)  # λ·x + (1−λ)·x_p ⇔ λ·y + (1−λ)·y_p
    assert np.ptp(mixed, axis=(1, 2, 3)).max() < 1e-6  # each blended image is still flat: whole images blended
    assert not np.allclose(soft, labels)  # something was blended
    assert soft.min() >= 0.0 and soft.max() <= 1.0
    again = mixup_batch(tf.constant(images), tf.constant(labels), 0.4, tf.constant([3, 4]))[1].numpy()
    np.testing.assert_array_equal(again, soft)  # stateless: the same seed, the same batch
    other = mixup_batch(tf.constant(images), tf.constant(labels), 0.4, tf.constant([5, 6]))[1].numpy()
    assert not np.allclose(other, soft)


def test_a_small_alpha_barely_blends() -> None:
    images, labels = _flat_batch(64)
    soft = mixup_batch(tf.constant(images), tf.constant(labels), 0.01, tf.constant([1, 2]))[1].numpy()
    # Beta(0.01, 0.01) puts λ at 0 or 1 almost always: each target is one film's own label, not a blend
    nearest = np.abs(soft[:, None] - labels[None, :]).min(axis=1)
    assert np.median(nearest) < 1e-3


def test_the_training_dataset_applies_mixup_only_when_asked() -> None:
    images = (np.arange(16)[:, None, None, None] * 16 * np.ones((16, 32, 32, 3))).astype(np.uint8)
    labels = np.array([0, 1] * 8)
    cfg = InputConfig(image_size=32, batch_size=16, cache="memory")
    plain = next(iter(make_dataset(images, labels, cfg, shuffle=False, augment=False, seed=0)))[1].numpy()
    assert set(plain.tolist()) == {0.0, 1.0}
    mixed = next(iter(make_dataset(images, labels, cfg, shuffle=False, augment=True, seed=0, mixup=0.4)))[1].numpy()
    assert ((mixed > 0.0) & (mixed < 1.0)).any()


def test_the_cosine_schedule_warms_up_then_decays_to_zero() -> None:
    cfg = TrainConfig(learning_rate=0.01, schedule="cosine", warmup_epochs=1, epochs=4)
    schedule = learning_rate_schedule(cfg, total_epochs=4, steps_per_epoch=10)
    rates = np.array([float(schedule(step)) for step in range(41)])
    assert rates[0] == pytest.approx(0.0, abs=1e-9)
    assert np.all(np.diff(rates[:11]) > 0)  # linear warm-up over the first epoch
    assert rates[10] == pytest.approx(0.01, rel=1e-4) and rates.max() == pytest.approx(0.01, rel=1e-4)
    assert np.all(np.diff(rates[10:]) <= 1e-9)  # then only down
    assert rates[25] == pytest.approx(0.005, rel=1e-3)  # half-way through the decay: half the peak
    assert rates[40] == pytest.approx(0.0, abs=1e-9)
    no_warmup = learning_rate_schedule(TrainConfig(learning_rate=0.01, schedule="cosine"), 4, 10)
    assert float(no_warmup(0)) == pytest.approx(0.01)
    assert learning_rate_schedule(TrainConfig(learning_rate=0.01), 4, 10) == 0.01  # plateau: a plain number


def test_a_fixed_budget_ships_the_last_epoch() -> None:
    history = {"epoch": [1, 2, 3], "val_auc": [0.9, 0.99, 0.95]}
    assert _best_epoch(history, TrainConfig()) == 2
    assert _best_epoch(history, TrainConfig(checkpoint="last")) == 3


@pytest.mark.parametrize(("key", "value"), [("schedule", "linear"), ("checkpoint", "first"), ("mixup", 2.0)])
def test_bad_lever_settings_are_refused_in_one_line(key: str, value: object) -> None:
    from cxr.errors import CxrError

    with pytest.raises(CxrError) as err:
        TrainConfig.from_params({"common": {key: value}}, "smallnet")
    assert key in str(err.value) and "\n" not in str(err.value)


def test_a_short_run_with_every_lever_trains_and_records_them(tmp_path: Path) -> None:
    from cxr.config import parse_params
    from cxr.training.train import train

    params = small_params()
    params["train"]["common"].update(schedule="cosine", warmup_epochs=1, checkpoint="last", mixup=0.2)
    params["train"]["common"]["early_stopping"] = {"enabled": False}
    root = prepared_project(tmp_path / "p", params, hostile=False)
    with chdir(root):
        card = train("smallnet", parse_params(params))
        history = (root / "reports/train/smallnet/history.csv").read_text().splitlines()
    assert card["best_epoch"] == card["epochs_run"] == 3  # the fixed budget's last epoch shipped
    assert card["train_config"]["schedule"] == "cosine" and card["train_config"]["mixup"] == 0.2
    rates = [float(row.split(",")[history[0].split(",").index("learning_rate")]) for row in history[1:]]
    assert rates[0] > rates[-1]  # the learning rate followed the schedule down
