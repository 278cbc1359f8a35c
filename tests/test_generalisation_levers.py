"""The levers of the generalising recipe: geometric and intensity augmentation, per-image intensity
normalisation inside the model, and the optimiser options (AdamW, label smoothing, EMA)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cxr.common.layers import IntensityNormalization
from cxr.errors import CxrError
from cxr.runtime import tensorflow
from cxr.training.augment import AugmentConfig, affine_matrix, augment_batch
from cxr.training.input_pipeline import InputConfig
from cxr.training.models import build_model
from cxr.training.train import TrainConfig, compile_model

tf = tensorflow()
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
# every range named and off (the shipped defaults rotate, zoom and change intensity)
STILL = dict(
    rotation_deg=0,
    width_shift=0,
    height_shift=0,
    fill_mode="constant",
    zoom=0,
    shear_deg=0,
    horizontal_flip=False,
    brightness=0,
    contrast=0,
    gamma=0,
    blur_sigma=0,
    noise_std=0,
    jpeg_quality=0,
)


def _still(**changes: object) -> AugmentConfig:
    return AugmentConfig(**{**STILL, **changes})


def _run(images: np.ndarray, cfg: AugmentConfig, seed: tuple[int, int] = (1, 2)) -> np.ndarray:
    return augment_batch(tf.constant(images), tf.constant(seed, tf.int64), cfg).numpy()


def _centroid(image: np.ndarray) -> tuple[float, float]:
    w = image.astype(np.float64)
    rows, cols = np.indices(w.shape)
    return float((cols * w).sum() / w.sum()), float((rows * w).sum() / w.sum())


def test_affine_matrix_composes_zoom_shear_flip_about_the_centre():
    identity = affine_matrix(0, 0, 0, 1.0, 0.0, False, 9, 11)
    np.testing.assert_allclose(identity, [[1, 0, 0], [0, 1, 0]], atol=1e-12)
    zoomed = affine_matrix(0, 0, 0, 2.0, 0.0, False, 9, 11)  # magnify: sample half the distance out
    centre = np.array([5.0, 4.0, 1.0])
    np.testing.assert_allclose(zoomed @ centre, centre[:2])
    np.testing.assert_allclose(zoomed @ np.array([9.0, 4.0, 1.0]), [7.0, 4.0])
    flipped = affine_matrix(0, 0, 0, 1.0, 0.0, True, 9, 11)
    np.testing.assert_allclose(flipped @ np.array([0.0, 2.0, 1.0]), [10.0, 2.0])
    sheared = affine_matrix(0, 0, 0, 1.0, math.radians(10), False, 9, 11)
    np.testing.assert_allclose(sheared @ centre, centre[:2], atol=1e-12)  # the centre stays put


def test_horizontal_flip_mirrors_about_half_the_images():
    images = np.zeros((64, 16, 16, 1), np.uint8)
    images[:, 8, 2, 0] = 255
    out = _run(images, _still(horizontal_flip=True))
    mirrored = [int(np.argmax(o[8, :, 0])) == 13 for o in out]
    kept = [int(np.argmax(o[8, :, 0])) == 2 for o in out]
    assert all(a or b for a, b in zip(mirrored, kept, strict=True))
    assert 16 <= sum(mirrored) <= 48


def test_zoom_moves_content_away_from_or_towards_the_centre_within_range():
    size, offset = 65, 20
    images = np.zeros((32, size, size, 1), np.uint8)
    images[:, 32, 32 + offset, 0] = 255
    out = _run(images, _still(zoom=0.2))
    distances = [_centroid(o[:, :, 0])[0] - 32 for o in out if o.any()]
    assert len(distances) >= 30
    assert min(distances) >= offset * 0.8 - 1.0 and max(distances) <= offset * 1.2 + 1.0
    assert max(distances) - min(distances) > 3  # not one fixed scale


def test_intensity_augmentation_changes_pixels_within_bounds_and_is_reproducible():
    rng = np.random.default_rng(0)
    images = rng.integers(40, 200, (8, 32, 32, 3), dtype=np.uint8)
    cfg = _still(brightness=0.1, contrast=0.3, gamma=0.3, blur_sigma=1.0, noise_std=0.03, jpeg_quality=60)
    a, b, c = _run(images, cfg), _run(images, cfg), _run(images, cfg, (1, 3))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, images)
    assert a.dtype == np.uint8 and a.shape == images.shape
    means = a.reshape(8, -1).mean(axis=1) - images.reshape(8, -1).mean(axis=1)
    assert np.abs(means).max() < 0.45 * 255  # brightness ±10 %, gamma ±30 %: bounded shifts
    only_brightness = _run(images, _still(brightness=0.1))
    shift = only_brightness.astype(int) - images.astype(int)
    for i in range(8):  # one constant shift per image (no clipping in this range)
        assert shift[i].max() - shift[i].min() <= 1 and abs(shift[i].mean()) <= 0.1 * 255 + 1


@pytest.mark.parametrize(
    ("field", "value"), [("zoom", 1.0), ("contrast", 1.5), ("gamma", -0.1), ("jpeg_quality", 99), ("noise_std", -1)]
)
def test_out_of_range_augmentation_is_refused_in_one_line(field, value):
    with pytest.raises(CxrError, match=rf"input\.augment\.{field}={float(value):g}(\.0)?: must be"):
        InputConfig.from_params({"augment": {field: value}})


def test_unknown_augmentation_key_names_the_known_ones():
    with pytest.raises(CxrError, match="known keys: rotation_deg"):
        InputConfig.from_params({"augment": {"rotation": 5}})


def test_standardize_gives_each_image_zero_mean_and_unit_std():
    rng = np.random.default_rng(1)
    x = np.stack([rng.uniform(0.1, 0.3, (16, 16, 3)), rng.uniform(0.5, 0.9, (16, 16, 3))]).astype(np.float32)
    out = IntensityNormalization("standardize")(x).numpy()
    np.testing.assert_allclose(out.reshape(2, -1).mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(out.reshape(2, -1).std(axis=1), 1, atol=1e-3)


def test_equalize_flattens_the_histogram_and_keeps_the_order_of_grey_levels():
    rng = np.random.default_rng(2)
    grey = rng.beta(5, 2, (2, 32, 32)).astype(np.float32)  # skewed towards bright
    x = np.repeat(grey[..., None], 3, axis=-1)
    out = IntensityNormalization("equalize")(x).numpy()
    assert out.min() >= 0 and out.max() <= 1 and np.allclose(out[..., 0], out[..., 2])
    for i in range(2):
        flat_in, flat_out = grey[i].ravel(), out[i, ..., 0].ravel()
        order = np.argsort(flat_in, kind="stable")
        assert np.all(np.diff(flat_out[order]) >= -1e-6)  # monotone
        assert abs(np.median(flat_out) - 0.5) < 0.05 and abs(np.median(flat_in) - 0.5) > 0.15


@pytest.mark.parametrize("mode", ["standardize", "equalize"])
def test_a_model_with_normalisation_saves_and_loads_in_safe_mode(tmp_path, mode):
    import keras

    model = build_model("cxrnet", 32, {"widths": [8, 8, 8, 8]}, normalize=mode)
    assert model.get_layer("normalize").mode == mode
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = np.random.default_rng(3).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded(x, training=False), model(x, training=False), atol=1e-6)
    with pytest.raises(CxrError, match=r"input\.normalize"):
        build_model("cxrnet", 32, {}, normalize="clahe")


def test_optimiser_options_reach_keras():
    cfg = TrainConfig.from_params(
        {"common": {"optimizer": "adamw", "weight_decay": 1e-4, "label_smoothing": 0.1, "ema": True}}, "cxrnet"
    )
    model = build_model("cxrnet", 32, {"widths": [8, 8, 8, 8]})
    compile_model(model, 1e-3, cfg.optimizer, cfg.weight_decay, cfg.label_smoothing, cfg.ema)
    assert type(model.optimizer).__name__ == "AdamW" and model.optimizer.use_ema
    assert model.optimizer.weight_decay == pytest.approx(1e-4)
    assert model.loss.label_smoothing == pytest.approx(0.1)
    for bad, message in (
        ({"optimizer": "sgd"}, "optimizer"),
        ({"label_smoothing": 0.7}, "label_smoothing"),
        ({"weight_decay": -1}, "weight_decay"),
    ):
        with pytest.raises(CxrError, match=message):
            TrainConfig.from_params({"common": bad}, "cxrnet")


def test_center_crop_keeps_the_film_border_away_from_the_network():
    model = build_model("cxrnet", 40, {"widths": [8, 8, 8, 8]}, center_crop=0.1)
    assert tuple(model.get_layer("center_crop").output.shape[1:3]) == (32, 32)
    x = np.random.default_rng(4).uniform(0, 1, (1, 40, 40, 3)).astype(np.float32)
    bordered = x.copy()
    bordered[:, :4], bordered[:, -4:], bordered[:, :, :4], bordered[:, :, -4:] = 1.0, 0.0, 1.0, 0.0
    np.testing.assert_allclose(model(bordered, training=False), model(x, training=False), atol=1e-6)
    assert InputConfig.from_params({"center_crop": 0.1}).preprocessing()["center_crop"] == 0.1
    with pytest.raises(CxrError, match=r"input\.center_crop"):
        build_model("cxrnet", 40, {}, center_crop=0.45)


def test_a_second_configuration_of_one_architecture_trains_under_its_own_name():
    cfg = TrainConfig.from_params(
        {"common": {}, "cxrnet_b": {"architecture": "cxrnet", "seed": 7, "widths": [8, 8, 8, 8]}}, "cxrnet_b"
    )
    assert cfg.seed == 7 and cfg.model == {"architecture": "cxrnet", "widths": [8, 8, 8, 8], "dropout": 0.3}
    model = build_model("cxrnet_b", 32, cfg.model)
    assert model.name == "cxrnet_b" and model.get_layer("block4_conv2").filters == 8
    with pytest.raises(CxrError, match=r"set train\.nasnet\.architecture"):
        build_model("nasnet", 32, {})
