"""The tf.data input pipeline (replaces ImageDataGenerator.flow_from_dataframe).

``splits.csv`` rows → decode (JPEG/PNG/BMP, grayscale or RGB) → resize to ``image_size``
(``squash`` like the notebook, or ``pad`` to keep the aspect ratio) → 3 channels, uint8. Decoded
images are cached once per split as a uint8 ``.npy`` (memory-mapped; keyed by the split's content
hashes and the preprocessing settings), so later epochs and later runs never decode a JPEG
again. Batches are gathered from the cache, augmented on uint8 (training only), then scaled to
[0, 1] float32.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from cxr.common.images import ImageLimits, ImageRefused, check_image, probe
from cxr.common.preprocessing import decode_image
from cxr.config import InputConfig
from cxr.errors import DataError
from cxr.files import TABLE_FILE, require_regular, write_bytes_atomic
from cxr.provenance.hashing import sha256_file
from cxr.runtime import DECODER_LINE, decoder_messages, native_stderr, pass_on, tensorflow
from cxr.safe_text import printable
from cxr.training.augment import augment_batch

log = logging.getLogger(__name__)

_CACHE_VERSION = "2"  # bump when decode_image changes what it produces
# split content key → {path: sha256 recorded by prepare}: read_split fills it, load_images checks against it
_EXPECTED_SHA256: dict[str, dict[str, str]] = {}
_INPUT_THREADS = 2  # parallel batches in the training input pipeline (gather, augment, scale)


def read_split(splits_csv: str | Path, split: str) -> tuple[list[str], np.ndarray, str]:
    """(paths, float32 labels, content key) of one split of ``splits.csv``.

    Args:
        splits_csv: the split file written by ``prepare``.
        split: ``train``, ``val`` or ``test``.

    Returns:
        The image paths, their labels as float32 (0 normal, 1 pneumonia), and a digest of the
        split's paths, hashes and labels (part of the decoded-image cache key).
    """
    import pandas as pd  # here, not at import: cxr predict and cxr serve load this module and never read a split

    require_regular(splits_csv, "split table", TABLE_FILE)  # not a device or FIFO, and bounded
    frame = pd.read_csv(splits_csv, keep_default_na=False, dtype={"patient_id": str})
    missing = {"path", "label", "split"} - set(frame.columns)
    if missing:
        raise DataError(f"{splits_csv}: missing columns {sorted(missing)}; rerun prepare")
    from cxr.data.pairing import check_pair  # refuses splits cut from another manifest.csv than the one beside it

    check_pair(splits_csv, frame)
    part = frame[frame["split"] == split]
    if part.empty:
        raise DataError(f"{splits_csv}: the {split} split is empty")
    digest = hashlib.sha256()
    for row in part[["path", "sha256" if "sha256" in part else "path", "label"]].itertuples(index=False):
        digest.update(("\t".join(map(str, row)) + "\n").encode())
    key = digest.hexdigest()
    if "sha256" in part:  # what load_images checks each file against before it decodes one
        _EXPECTED_SHA256[key] = dict(zip(part["path"].tolist(), part["sha256"].astype(str).tolist(), strict=True))
    return part["path"].tolist(), part["label"].to_numpy(np.float32), key


def check_decodable(paths: list[str], limits: ImageLimits) -> None:
    """Refuse, before any decoding, a file over a decode cap or no longer a JPEG/PNG/BMP image.

    ``prepare`` admitted every file of ``splits.csv`` under the same caps; a file that fails here
    changed since, and decoding it could exhaust memory (a 3 GB file, a 23000² PNG bomb). Costs a
    ``stat`` and a header read per file.

    Args:
        paths: the split's image files.
        limits: the caps (``input.max_image_pixels`` / ``max_image_bytes``).

    Raises:
        DataError: one line naming the first such file and the fix (rerun prepare).
    """
    for path in paths:
        try:
            check_image(path, limits)
        except ImageRefused as exc:
            raise DataError(f"{printable(path)}: {exc}; it changed since prepare: rerun prepare") from None
        except OSError as exc:
            raise DataError(
                f"{printable(path)}: unreadable ({exc.strerror or type(exc).__name__}); rerun prepare"
            ) from None


def _culprit(paths: list[str], start: int, limits: ImageLimits) -> str | None:
    """The first file from ``start`` on that Pillow cannot decode, with its reason (after a failed batch)."""
    for path in paths[start:]:
        info = probe(path, limits)
        if "error" in info:
            return f"{printable(path)}: {info['error']}"
    return None


def check_against_split(paths: list[str], expected: dict[str, str] | None) -> None:
    """Refuse a file whose bytes are not the ones prepare recorded in ``splits.csv`` (one line, the first).

    A valid image copied over another after prepare would otherwise be decoded under the old file's
    label and trained on, while the card and lineage still name the old manifest.

    Raises:
        DataError: the first file whose sha256 differs, and the fix (rerun prepare).
    """
    if not expected:
        return
    for path in paths:
        recorded = expected.get(path)
        if recorded is None:
            continue
        try:
            actual = sha256_file(path)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise DataError(f"{printable(path)}: unreadable ({reason}); rerun prepare") from None
        if actual != recorded:
            raise DataError(
                f"{printable(path)}: changed since prepare: rerun prepare (dvc repro prepare) before training on "
                f"it (its sha256 is {actual[:12]}, splits.csv records {printable(recorded[:12])})"
            )


def _decode_all(paths: list[str], cfg: InputConfig, out: np.ndarray, content_key: str = "") -> None:
    limits = ImageLimits.of(cfg)
    check_decodable(paths, limits)  # size and header caps first: cheap, and no 3 GB file is hashed
    check_against_split(paths, _EXPECTED_SHA256.get(content_key))
    tf = tensorflow()
    ds = (
        tf.data.Dataset.from_tensor_slices(paths)
        .map(
            lambda p: decode_image(p, cfg.image_size, cfg.resize, cfg.interpolation),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        .batch(64)
        .prefetch(2)
    )
    start = 0
    try:
        # libjpeg's complaints about a damaged file go to fd 2 from TensorFlow's threads: captured,
        # and named in the one-line error instead
        with native_stderr(quiet_on=(tf.errors.OpError,)) as noise:
            for batch in ds:
                out[start : start + len(batch)] = batch.numpy()
                start += len(batch)
    except tf.errors.OpError as exc:
        reason = "; ".join(decoder_messages(noise)) or exc.message.splitlines()[0]
        culprit = _culprit(paths, start, limits) or f"an image of this split ({reason})"
        raise DataError(f"could not decode {culprit}; it changed since prepare: rerun prepare") from exc
    for line in decoder_messages(noise):
        log.warning("decoded despite a damaged image: %s", line)
    pass_on(noise, drop=DECODER_LINE)


def load_images(paths: list[str], content_key: str, cfg: InputConfig, split: str) -> np.ndarray:
    """Decoded (N, S, S, 3) uint8 images of a split, from the cache when it is warm.

    Args:
        paths: the split's image files.
        content_key: the split's digest from :func:`read_split`.
        cfg: the preprocessing (image size, resize, interpolation) and the cache mode and folder.
        split: the split's name (cache file names and log lines).

    Returns:
        The images: memory-mapped from the ``.npy`` cache with ``cache: disk``, in memory otherwise.
    """
    shape = (len(paths), cfg.image_size, cfg.image_size, 3)
    if cfg.cache == "memory" or cfg.cache == "none":
        images = np.empty(shape, np.uint8)
        _decode_all(paths, cfg, images, content_key)
        return images
    key = hashlib.sha256(
        f"{_CACHE_VERSION}|{content_key}|{cfg.image_size}|{cfg.resize}|{cfg.interpolation}".encode()
    ).hexdigest()[:20]
    path = Path(cfg.cache_dir) / f"{split}-{cfg.image_size}px-{key}.npy"
    if path.is_file():
        problem = _cache_problem(path, shape)
        if problem is None:
            log.info("%s: %d images from cache %s", split, len(paths), path)
            return np.load(path, mmap_mode="r")
        log.warning("%s: cache %s %s: decoding the split again", split, printable(path), problem)
        path.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    started = time.perf_counter()
    images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
    try:
        _decode_all(paths, cfg, images, content_key)
        images.flush()
        del images
        write_bytes_atomic(_digest_file(path), (sha256_file(tmp) + "\n").encode())
        os.replace(tmp, path)  # only a complete cache is ever visible
    finally:
        tmp.unlink(missing_ok=True)
    log.info("%s: decoded %d images in %.1f s into cache %s", split, len(paths), time.perf_counter() - started, path)
    return np.load(path, mmap_mode="r")


def _digest_file(cache: Path) -> Path:
    return cache.with_name(cache.name + ".sha256")


def _cache_problem(cache: Path, shape: tuple[int, ...]) -> str | None:
    """Why a decoded-image cache cannot be used (None: it can): no recorded digest, unreadable,
    another shape, or bytes that are not the ones written (a truncated or overwritten file)."""
    digest_file = _digest_file(cache)
    if not digest_file.is_file():
        return "has no recorded digest"
    try:
        images = np.load(cache, mmap_mode="r")
    except (OSError, ValueError, EOFError) as exc:
        return f"is unreadable ({printable(str(exc).splitlines()[0][:80]) if str(exc) else type(exc).__name__})"
    if images.shape != shape:
        return f"holds {images.shape}, not {shape}"
    del images
    if digest_file.read_text(encoding="utf-8", errors="replace").strip() != sha256_file(cache):
        return "does not match its recorded sha256 (truncated or overwritten)"
    return None


def make_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    cfg: InputConfig,
    *,
    shuffle: bool,
    augment: bool,
    seed: int,
    drop_remainder: bool = False,
    mixup: float = 0.0,
) -> Any:
    """Batches of ([0, 1] float32 images, float32 labels) from a decoded uint8 array.

    Args:
        images: (N, S, S, 3) uint8 images, e.g. from :func:`load_images`.
        labels: N labels.
        cfg: batch size, image size and augmentation settings.
        shuffle: reshuffle the images every epoch.
        augment: apply ``cfg.augment`` (training only).
        seed: the seed of the shuffle and of the augmentation.
        drop_remainder: drop a last, smaller batch.
        mixup: mixup's alpha (0 = off; training only): each batch blended with a shuffled copy of
            itself, images and labels with the same weight (:func:`mixup_batch`).

    Returns:
        A ``tf.data.Dataset`` of (images, labels) batches.
    """
    tf = tensorflow()
    n, size = len(images), cfg.image_size
    labels = np.asarray(labels, np.float32)

    def gather(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(images[index]), labels[index]

    ds = tf.data.Dataset.range(n)
    if shuffle:
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(cfg.batch_size, drop_remainder=drop_remainder)
    ds = ds.map(
        lambda i: tf.numpy_function(gather, [i], [tf.uint8, tf.float32], stateful=False),
        num_parallel_calls=_INPUT_THREADS,
        deterministic=True,
    )
    ds = ds.map(lambda x, y: (tf.ensure_shape(x, [None, size, size, 3]), tf.ensure_shape(y, [None])))
    if augment:
        ds = _augmented(ds, cfg, seed)
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32) / 255.0, y), num_parallel_calls=_INPUT_THREADS, deterministic=True)
    if mixup > 0:
        seeds = tf.data.Dataset.random(seed=seed + 7919, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda xy, s: mixup_batch(xy[0], xy[1], mixup, s), num_parallel_calls=_INPUT_THREADS, deterministic=True
        )
    return _on_few_threads(ds.prefetch(tf.data.AUTOTUNE))


def mixup_batch(images: Any, labels: Any, alpha: float, seed: Any) -> tuple[Any, Any]:
    """Mixup (Zhang et al. 2018): blend each image with another of its batch, and its label alike.

    Each example i gets a weight λᵢ ~ Beta(α, α) and a partner p(i) from a random permutation of
    the batch: xᵢ ← λᵢ·xᵢ + (1 − λᵢ)·x_p(i), yᵢ ← λᵢ·yᵢ + (1 − λᵢ)·y_p(i). A pneumonia film
    blended with a normal one is a soft target, which discourages over-confident decisions on
    features a few films share (markers, exposure). Stateless: the same seed gives the same batch.

    Args:
        images: (B, S, S, C) float32 in [0, 1].
        labels: (B,) float32 in [0, 1].
        alpha: the Beta distribution's parameter, > 0.
        seed: a pair of integers (a tensor inside ``tf.data``).

    Returns:
        The blended (images, labels), same shapes and dtypes.
    """
    tf = tensorflow()
    seed = tf.cast(seed, tf.int64)
    n = tf.shape(labels)[0]
    g1 = tf.random.stateless_gamma([n], seed=seed, alpha=alpha)
    g2 = tf.random.stateless_gamma([n], seed=seed + tf.constant([0, 1], tf.int64), alpha=alpha)
    lam = g1 / tf.maximum(g1 + g2, 1e-12)
    order = tf.argsort(tf.random.stateless_uniform([n], seed=seed + tf.constant([0, 2], tf.int64)))
    mixed = lam[:, None, None, None] * images + (1.0 - lam[:, None, None, None]) * tf.gather(images, order)
    return mixed, lam * labels + (1.0 - lam) * tf.gather(labels, order)


def _augmented(ds: Any, cfg: InputConfig, seed: int) -> Any:
    """uint8 batches augmented by ``cfg.augment``, each with its own pair of seeds (reproducible per ``seed``)."""
    tf = tensorflow()
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    return tf.data.Dataset.zip((ds, seeds)).map(
        lambda xy, s: (augment_batch(xy[0], s, cfg.augment), xy[1]),
        num_parallel_calls=_INPUT_THREADS,
        deterministic=True,
    )


def _on_few_threads(ds: Any) -> Any:
    """Input work stays on few threads so it does not compete with the model's kernels for the cores.

    With AUTOTUNE parallelism, SmallNet training with augmentation swung between 93 and 156 images/s
    on 2 cores (measured); a warm epoch needs only a fraction of one core.
    """
    options = tensorflow().data.Options()
    options.threading.max_intra_op_parallelism = 1
    return ds.with_options(options)
