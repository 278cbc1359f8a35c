"""The tf.data input pipeline: augmentation ranges and geometry, decoding, the uint8 cache, batching."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cxr.training.input_pipeline
from cxr.common.preprocessing import decode_image, resize_image
from cxr.config import InputConfig
from cxr.errors import CxrError, DataError
from cxr.runtime import tensorflow
from cxr.training.augment import AugmentConfig, affine_params, augment_batch
from cxr.training.input_pipeline import load_images, make_dataset
from tests.factories import write_image

tf = tensorflow()

# every range named: the shipped defaults also zoom and change intensity
ONLY_MOTION = dict(
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
NOTEBOOK = AugmentConfig(**ONLY_MOTION, rotation_deg=5, width_shift=0.1, height_shift=0.1, fill_mode="nearest")
NO_MOTION = AugmentConfig(**ONLY_MOTION, rotation_deg=0, width_shift=0, height_shift=0, fill_mode="nearest")


def _params(n: int, seed: tuple[int, int], cfg: AugmentConfig = NOTEBOOK) -> tuple[np.ndarray, ...]:
    return tuple(t.numpy() for t in affine_params(n, np.array(seed, np.int64), cfg))


# --- affine_params -----------------------------------------------------------------------------


def test_affine_params_stay_in_the_configured_ranges_and_fill_them():
    angle, dx, dy = _params(4000, (1, 2))
    r = math.radians(5)
    assert angle.shape == dx.shape == dy.shape == (4000,)
    for values, bound in ((angle, r), (dx, 0.1), (dy, 0.1)):
        assert np.all(np.abs(values) <= bound + 1e-7)
        assert values.min() < -0.97 * bound and values.max() > 0.97 * bound  # reaches both ends
        assert abs(values.mean()) < 0.05 * bound
    # dx and dy are independent draws, not the same numbers
    assert abs(np.corrcoef(dx, dy)[0, 1]) < 0.1
    assert abs(np.corrcoef(angle, dx)[0, 1]) < 0.1

    wide = AugmentConfig(**ONLY_MOTION, rotation_deg=20, width_shift=0.3, height_shift=0.05)
    angle, dx, dy = _params(4000, (1, 2), wide)
    assert np.abs(angle).max() <= math.radians(20) + 1e-7 and np.abs(angle).max() > math.radians(19)
    assert np.abs(dx).max() <= 0.3 + 1e-7 and np.abs(dx).max() > 0.29
    assert np.abs(dy).max() <= 0.05 + 1e-7 and np.abs(dy).max() > 0.0485


def test_affine_params_are_a_function_of_the_seed():
    first = _params(64, (7, 11))
    again = _params(64, (7, 11))
    other = _params(64, (7, 12))
    for a, b, c in zip(first, again, other, strict=True):
        np.testing.assert_array_equal(a, b)
        assert not np.allclose(a, c)


def test_zero_ranges_give_zero_transforms():
    angle, dx, dy = _params(16, (3, 4), NO_MOTION)
    assert not angle.any() and not dx.any() and not dy.any()


# --- augment_batch -----------------------------------------------------------------------------


def _centroid(image: np.ndarray) -> tuple[float, float]:
    weights = image.astype(np.float64)
    rows, cols = np.indices(weights.shape)
    total = weights.sum()
    return float((cols * weights).sum() / total), float((rows * weights).sum() / total)


@pytest.mark.parametrize("seed", [(0, 1), (5, 9), (12, 3), (40, 41)])
def test_translation_moves_a_bright_pixel_by_the_sampled_shift(seed):
    height, width = 48, 64
    images = np.zeros((3, height, width, 1), np.uint8)
    y0, x0 = 24, 32
    images[:, y0, x0, 0] = 255
    cfg = AugmentConfig(**ONLY_MOTION, rotation_deg=0, width_shift=0.1, height_shift=0.1, fill_mode="constant")
    out = augment_batch(tf.constant(images), tf.constant(seed, tf.int64), cfg).numpy()
    angle, dx, dy = _params(3, seed, cfg)
    assert out.shape == images.shape and out.dtype == np.uint8
    assert not angle.any()
    for i in range(3):
        expected_x, expected_y = x0 + dx[i] * width, y0 + dy[i] * height
        cx, cy = _centroid(out[i, :, :, 0])
        assert abs(cx - expected_x) <= 1.0, (i, cx, expected_x)
        assert abs(cy - expected_y) <= 1.0, (i, cy, expected_y)
        peak_y, peak_x = np.unravel_index(np.argmax(out[i, :, :, 0]), (height, width))
        assert abs(peak_x - expected_x) <= 1.0 and abs(peak_y - expected_y) <= 1.0
        # direction: a positive shift moves the content right / down
        if abs(dx[i] * width) > 1.5:
            assert np.sign(cx - x0) == np.sign(dx[i])
        if abs(dy[i] * height) > 1.5:
            assert np.sign(cy - y0) == np.sign(dy[i])


def test_rotation_turns_about_the_centre():
    size = 65
    images = np.zeros((1, size, size, 3), np.uint8)
    centre = (size - 1) / 2
    images[0, int(centre), int(centre) + 24, :] = 255  # 24 px right of the centre
    cfg = AugmentConfig(**ONLY_MOTION, rotation_deg=5, width_shift=0, height_shift=0, fill_mode="constant")
    seed = (2, 3)
    out = augment_batch(tf.constant(images), tf.constant(seed, tf.int64), cfg).numpy()
    (angle,), _, _ = _params(1, seed, cfg)
    cx, cy = _centroid(out[0, :, :, 0])
    assert math.hypot(cx - centre, cy - centre) == pytest.approx(24, abs=1.0)  # same distance
    turned = math.atan2(cy - centre, cx - centre)  # in image coordinates (y down)
    assert abs(turned) <= math.radians(5) + 0.03
    # ImageDataGenerator's convention: the matrix maps output pixels to the input pixels they sample
    assert turned == pytest.approx(-angle, abs=0.03)
    assert abs(angle) > 0.03  # the check above is informative for this seed


def test_zero_ranges_return_the_batch_unchanged():
    images = np.random.default_rng(0).integers(0, 256, (4, 20, 24, 3), dtype=np.uint8)
    out = augment_batch(tf.constant(images), tf.constant([1, 2], tf.int64), NO_MOTION).numpy()
    np.testing.assert_array_equal(out, images)


def test_nearest_fill_leaves_no_black_border():
    images = np.full((8, 32, 32, 3), 137, np.uint8)
    seed = tf.constant([9, 9], tf.int64)
    out = augment_batch(tf.constant(images), seed, NOTEBOOK).numpy()
    assert (out == 137).all()
    # the same transforms with constant fill do leave a black border: the check can fail
    constant = AugmentConfig(**ONLY_MOTION, rotation_deg=5, width_shift=0.1, height_shift=0.1, fill_mode="constant")
    assert (augment_batch(tf.constant(images), seed, constant).numpy() == 0).any()


def test_augment_batch_is_reproducible_and_rejects_unknown_fill():
    images = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    a = augment_batch(tf.constant(images), tf.constant([1, 2], tf.int64), NOTEBOOK).numpy()
    b = augment_batch(tf.constant(images), tf.constant([1, 2], tf.int64), NOTEBOOK).numpy()
    c = augment_batch(tf.constant(images), tf.constant([1, 3], tf.int64), NOTEBOOK).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, images)
    with pytest.raises(ValueError, match="fill_mode"):
        augment_batch(tf.constant(images), tf.constant([1, 2], tf.int64), AugmentConfig(fill_mode="mirror"))


# --- decode and resize -------------------------------------------------------------------------


def test_grayscale_jpeg_decodes_to_three_identical_channels(tmp_path):
    path = write_image(tmp_path / "gray.jpeg", seed=1, size=(40, 32), mode="L", fmt="JPEG")
    image = decode_image(tf.constant(str(path)), 24).numpy()
    assert image.shape == (24, 24, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[..., 0], image[..., 1])
    np.testing.assert_array_equal(image[..., 0], image[..., 2])
    assert image.std() > 10  # the content survived


def test_png_and_rgb_decode(tmp_path):
    gray = write_image(tmp_path / "gray.png", seed=2, size=(30, 50), mode="L", fmt="PNG")
    rgb = write_image(tmp_path / "rgb.png", seed=3, size=(30, 50), mode="RGB", fmt="PNG")
    assert decode_image(tf.constant(str(gray)), 16).shape == (16, 16, 3)
    out = decode_image(tf.constant(str(rgb)), 16).numpy()
    assert out.shape == (16, 16, 3)
    assert not np.array_equal(out[..., 0], out[..., 1])  # colour kept, not collapsed to gray


def test_an_image_at_the_target_size_is_returned_unchanged(tmp_path):
    pixels = np.random.default_rng(4).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    path = tmp_path / "exact.png"
    Image.fromarray(pixels, mode="RGB").save(path)
    for resize in ("squash", "pad"):
        for interpolation in ("bilinear", "area", "bicubic", "nearest"):
            out = decode_image(tf.constant(str(path)), 32, resize, interpolation).numpy()
            assert out.tobytes() == pixels.tobytes(), (resize, interpolation)
    assert resize_image(tf.constant(pixels), 32).numpy().tobytes() == pixels.tobytes()


def test_pad_keeps_the_aspect_ratio_and_squash_fills_the_square():
    wide = np.full((20, 40, 3), 200, np.uint8)  # H=20, W=40
    padded = resize_image(tf.constant(wide), 32, "pad").numpy()
    assert padded.shape == (32, 32, 3)
    assert (padded[:8] == 0).all() and (padded[24:] == 0).all()  # letterbox rows
    assert (padded[8:24] == 200).all()  # the picture, scaled to 32×16
    tall = np.full((40, 20, 3), 200, np.uint8)
    padded = resize_image(tf.constant(tall), 32, "pad").numpy()
    assert (padded[:, :8] == 0).all() and (padded[:, 24:] == 0).all()  # letterbox columns
    assert (padded[:, 8:24] == 200).all()
    squashed = resize_image(tf.constant(wide), 32, "squash").numpy()
    assert squashed.shape == (32, 32, 3)
    assert (squashed == 200).all()


@pytest.mark.parametrize("interpolation", ["bilinear", "area", "bicubic"])
def test_resize_downsamples_with_antialiasing(interpolation):
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::4] = 255  # 1-in-4 stripes: plain bilinear sampling at 4× reduction sees only black
    out = resize_image(tf.constant(stripes), 16, "squash", interpolation).numpy()
    assert out.shape == (16, 16, 3)
    assert np.abs(out[:, 1:-1].astype(int) - 64).max() <= 3  # the mean gray, away from the edge columns


@pytest.mark.parametrize("resize", ["squash", "pad"])
def test_nearest_interpolation_resizes(tmp_path, resize):
    path = write_image(tmp_path / "im.png", seed=5, size=(40, 32), fmt="PNG")
    image = decode_image(tf.constant(str(path)), 16, resize, "nearest").numpy()
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    source = np.asarray(Image.open(path).convert("RGB"))
    assert set(np.unique(image[4:12, 4:12])) <= set(np.unique(source))  # nearest copies source values


def test_input_config_rejects_unknown_choices():
    assert (
        InputConfig.from_params({"image_size": 48, "augment": {"augment_validation": True}}).augment_validation is True
    )
    for key, value in (("resize", "crop"), ("interpolation", "lanczos"), ("cache", "redis")):
        with pytest.raises(CxrError, match=f"input.{key}="):
            InputConfig.from_params({key: value})


# --- the decoded-image cache -------------------------------------------------------------------


def _images(tmp_path: Path, n: int = 6) -> list[str]:
    return [str(write_image(tmp_path / "img" / f"im{i}.jpeg", seed=i, size=(40, 30), fmt="JPEG")) for i in range(n)]


def _cache_entries(cache: Path) -> list[str]:
    """The cache files; each must have its recorded sha256 beside it (and nothing else may be there)."""
    names = sorted(p.name for p in cache.iterdir()) if cache.exists() else []
    caches = [n for n in names if not n.endswith(".sha256")]
    assert names == sorted([*caches, *(f"{n}.sha256" for n in caches)]), names
    return caches


def test_cache_is_written_once_and_reused(tmp_path, monkeypatch):
    paths = _images(tmp_path)
    cache = tmp_path / "cache"
    cfg = InputConfig(image_size=32, cache="disk", cache_dir=str(cache))
    first = np.array(load_images(paths, "key-a", cfg, "train"))
    assert first.shape == (6, 32, 32, 3) and first.dtype == np.uint8
    files = _cache_entries(cache)
    assert len(files) == 1 and files[0].startswith("train-32px-") and files[0].endswith(".npy")
    mtime = (cache / files[0]).stat().st_mtime_ns
    expected = np.stack([decode_image(tf.constant(p), 32).numpy() for p in paths])
    np.testing.assert_array_equal(first, expected)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the cache is warm")

    monkeypatch.setattr(cxr.training.input_pipeline, "_decode_all", no_decoding)
    second = load_images(paths, "key-a", cfg, "train")
    np.testing.assert_array_equal(np.asarray(second), first)
    assert _cache_entries(cache) == files
    assert (cache / files[0]).stat().st_mtime_ns == mtime


def test_cache_key_follows_content_and_preprocessing(tmp_path):
    paths = _images(tmp_path)
    cache = tmp_path / "cache"
    cfg = InputConfig(image_size=32, cache="disk", cache_dir=str(cache))
    load_images(paths, "key-a", cfg, "train")
    load_images(paths, "key-a", InputConfig(image_size=48, cache="disk", cache_dir=str(cache)), "train")
    assert len(_cache_entries(cache)) == 2
    load_images(paths, "key-b", cfg, "train")  # the split's content changed
    assert len(_cache_entries(cache)) == 3
    load_images(paths, "key-a", InputConfig(image_size=32, resize="pad", cache="disk", cache_dir=str(cache)), "train")
    assert len(_cache_entries(cache)) == 4
    load_images(paths, "key-a", cfg, "val")
    assert len(_cache_entries(cache)) == 5
    load_images(paths, "key-a", cfg, "train")  # nothing new for a repeated request
    assert len(_cache_entries(cache)) == 5


def test_cache_key_of_a_real_split_changes_with_its_content(tmp_path):
    rows = ["path,label,split,sha256", "a.jpeg,0,train,aaa", "b.jpeg,1,train,bbb", "c.jpeg,1,val,ccc"]
    splits = tmp_path / "splits.csv"
    splits.write_text("\n".join(rows) + "\n")
    paths, labels, key = cxr.training.input_pipeline.read_split(splits, "train")
    assert paths == ["a.jpeg", "b.jpeg"] and labels.tolist() == [0.0, 1.0]
    splits.write_text("\n".join([*rows[:2], "b.jpeg,1,train,bbb2", rows[3]]) + "\n")  # same name, new bytes
    assert cxr.training.input_pipeline.read_split(splits, "train")[2] != key
    splits.write_text("\n".join(rows) + "\n")
    assert cxr.training.input_pipeline.read_split(splits, "train")[2] == key
    assert cxr.training.input_pipeline.read_split(splits, "val")[2] != key


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, DataError])
def test_an_interrupted_cache_write_leaves_nothing_behind(tmp_path, monkeypatch, interruption):
    paths = _images(tmp_path)
    cache = tmp_path / "cache"
    cfg = InputConfig(image_size=32, cache="disk", cache_dir=str(cache))
    real = cxr.training.input_pipeline._decode_all

    def half_then_fail(paths, cfg, out, content_key=""):
        out[: len(paths) // 2] = 7
        raise interruption("stopped half way")  # Ctrl-C or an unreadable image mid-split

    monkeypatch.setattr(cxr.training.input_pipeline, "_decode_all", half_then_fail)
    with pytest.raises(interruption):
        load_images(paths, "key-a", cfg, "train")
    assert _cache_entries(cache) == []  # neither a partial .npy nor its temporary file

    monkeypatch.setattr(cxr.training.input_pipeline, "_decode_all", real)
    images = load_images(paths, "key-a", cfg, "train")
    assert not (np.asarray(images) == 7).all(axis=(1, 2, 3)).any()
    assert len(_cache_entries(cache)) == 1


@pytest.mark.parametrize("mode", ["memory", "none"])
def test_memory_and_no_cache_write_nothing(tmp_path, mode):
    paths = _images(tmp_path, 3)
    cache = tmp_path / "cache"
    images = load_images(paths, "k", InputConfig(image_size=32, cache=mode, cache_dir=str(cache)), "train")
    assert images.shape == (3, 32, 32, 3)
    assert not cache.exists()


# --- make_dataset ------------------------------------------------------------------------------

N, S = 20, 32
CFG = InputConfig(image_size=S, batch_size=8, augment=NOTEBOOK)


@pytest.fixture(scope="module")
def arrays() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N, S, S, 3), dtype=np.uint8)
    labels = (np.arange(N) % 2).astype(np.float32)
    return images, labels


def _epoch(ds) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(x.numpy(), y.numpy()) for x, y in ds]


def test_batches_are_unit_range_float32_with_the_right_shapes(arrays):
    images, labels = arrays
    batches = _epoch(make_dataset(images, labels, CFG, shuffle=True, augment=True, seed=1))
    assert [len(y) for _, y in batches] == [8, 8, 4]
    for x, y in batches:
        assert x.dtype == np.float32 and y.dtype == np.float32
        assert x.shape == (len(y), S, S, 3)
        assert x.min() >= 0.0 and x.max() <= 1.0
    assert sorted(np.concatenate([y for _, y in batches]).tolist()) == sorted(labels.tolist())
    dropped = _epoch(make_dataset(images, labels, CFG, shuffle=True, augment=False, seed=1, drop_remainder=True))
    assert [len(y) for _, y in dropped] == [8, 8]


def test_without_augmentation_the_images_are_only_scaled(arrays):
    images, labels = arrays
    batches = _epoch(make_dataset(images, labels, CFG, shuffle=False, augment=False, seed=1))
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    np.testing.assert_array_equal(y, labels)
    np.testing.assert_allclose(x, images.astype(np.float32) / 255.0, rtol=0, atol=1e-7)


def test_augmentation_only_when_asked(arrays):
    images, labels = arrays
    batches = _epoch(make_dataset(images, labels, CFG, shuffle=False, augment=True, seed=1))
    x = np.concatenate([b[0] for b in batches])
    changed = [not np.allclose(x[i], images[i] / 255.0, atol=1e-6) for i in range(N)]
    assert all(changed)
    # the label order is untouched by augmentation
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), labels)


def test_same_seed_same_first_epoch_and_other_seed_differs(arrays):
    images, labels = arrays
    first = _epoch(make_dataset(images, labels, CFG, shuffle=True, augment=True, seed=3))
    again = _epoch(make_dataset(images, labels, CFG, shuffle=True, augment=True, seed=3))
    other = _epoch(make_dataset(images, labels, CFG, shuffle=True, augment=True, seed=4))
    for (xa, ya), (xb, yb) in zip(first, again, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(first[0][0], other[0][0])


def test_training_epochs_are_reshuffled_and_reaugmented(arrays):
    images, _ = arrays
    index = np.arange(N, dtype=np.float32)  # labels that name each image
    shuffled = make_dataset(images, index, CFG, shuffle=True, augment=False, seed=3)
    order_one = np.concatenate([y for _, y in _epoch(shuffled)])
    order_two = np.concatenate([y for _, y in _epoch(shuffled)])
    assert sorted(order_one.tolist()) == sorted(order_two.tolist()) == index.tolist()
    assert not np.array_equal(order_one, order_two)

    augmented = make_dataset(images, index, CFG, shuffle=False, augment=True, seed=3)
    one, two = _epoch(augmented), _epoch(augmented)
    np.testing.assert_array_equal(one[0][1], two[0][1])
    assert not np.array_equal(one[0][0], two[0][0])  # new transforms each epoch, same images


def test_validation_dataset_is_identical_on_every_pass(arrays):
    images, labels = arrays
    ds = make_dataset(images, labels, CFG, shuffle=False, augment=False, seed=0)
    one, two = _epoch(ds), _epoch(ds)
    for (xa, ya), (xb, yb) in zip(one, two, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    np.testing.assert_array_equal(np.concatenate([y for _, y in one]), labels)
