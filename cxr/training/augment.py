"""Training-time augmentation: the notebook's ImageDataGenerator motion, plus the levers that make a
model hold up on films from outside its training folder.

Geometry (rotation about the centre, zoom, shear, translation, optional horizontal flip) is one
random affine transform per image, resampled once (bilinear, as ImageDataGenerator's ``order=1``)
on uint8: one resampling pass blurs the image once and is half the work of chaining Keras'
random layers. Intensity changes (brightness, contrast, gamma, blur, noise, JPEG re-compression)
follow on the same image. With every range at zero the batch comes back unchanged.

Randomness is stateless: TensorFlow's stateless RNG draws every per-image parameter from the batch
seed, so the same seed gives the same batch.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from cxr.config import AugmentConfig
from cxr.runtime import tensorflow

__all__ = ["AugmentConfig", "affine_matrix", "affine_params", "augment_batch"]

_EXTRA_DRAWS = 9  # uniforms per image beyond (angle, dx, dy): see _augment_numpy


def affine_params(batch: Any, seed: Any, cfg: AugmentConfig) -> tuple[Any, Any, Any]:
    """Per-image (angle in radians, x shift fraction, y shift fraction), uniform in the ranges.

    Args:
        batch: the number of images (an int or a scalar tensor).
        seed: the batch's stateless seed, a pair of integers; the three draws use derived seeds.
        cfg: the ranges: ``rotation_deg`` (±degrees), ``width_shift`` and ``height_shift`` (± that
            fraction of the width / height).

    Returns:
        Three (batch,) float32 tensors: angle, x shift and y shift.
    """
    tf = tensorflow()
    seed = tf.cast(seed, tf.int64)
    r = math.radians(cfg.rotation_deg)
    w, h = cfg.width_shift, cfg.height_shift
    angle = tf.random.stateless_uniform([batch], seed=seed, minval=-r, maxval=r)
    dx = tf.random.stateless_uniform([batch], seed=seed + tf.constant([0, 1], tf.int64), minval=-w, maxval=w)
    dy = tf.random.stateless_uniform([batch], seed=seed + tf.constant([0, 2], tf.int64), minval=-h, maxval=h)
    return angle, dx, dy


_BORDERS = {"nearest": 1, "constant": 0, "reflect": 4, "wrap": 3}  # cv2.BORDER_* values


def affine_matrix(
    angle: float, dx: float, dy: float, zoom: float, shear: float, flip: bool, height: int, width: int
) -> np.ndarray:
    """2×3 matrix mapping an output pixel to the input pixel it samples (ImageDataGenerator's way).

    ``p_in = R(angle) · Shear(shear) · (p_out − c) / zoom + c − (dx·W, dy·H)``, mirrored in x when
    ``flip``; c is the image centre.

    Args:
        angle: rotation in radians.
        dx, dy: shift as a fraction of the width / height (positive moves the content right / down).
        zoom: scale factor; above 1 magnifies.
        shear: shear angle in radians.
        flip: mirror left–right.
        height, width: the image size in pixels.

    Returns:
        (2, 3) float64 matrix for OpenCV's ``warpAffine`` with ``WARP_INVERSE_MAP``, in (x, y)
        pixel coordinates.
    """
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    cos, sin = math.cos(angle), math.sin(angle)
    rot = np.array([[cos, -sin], [sin, cos]])
    shear_m = np.array([[1.0, -math.sin(shear)], [0.0, math.cos(shear)]])
    a = rot @ shear_m / zoom
    centre = np.array([cx, cy])
    offset = centre - a @ centre - np.array([dx * width, dy * height])
    mat = np.hstack([a, offset[:, None]])
    if flip:  # sample the mirrored input column
        mat[0] = -mat[0]
        mat[0, 2] += width - 1
    return mat


def _intensity(image: np.ndarray, u: np.ndarray, cfg: AugmentConfig) -> np.ndarray:
    import cv2

    x: np.ndarray = image.astype(np.float32) / 255.0
    if cfg.gamma:
        x = np.power(x, 1.0 + cfg.gamma * (2 * u[3] - 1))
    if cfg.contrast:
        mean = float(x.mean())
        x = (x - mean) * (1.0 + cfg.contrast * (2 * u[4] - 1)) + mean
    if cfg.brightness:
        x = x + cfg.brightness * (2 * u[5] - 1)
    if cfg.blur_sigma and u[6] < 0.5:
        sigma = cfg.blur_sigma * u[6] * 2
        if sigma >= 0.3:
            x = cv2.GaussianBlur(x, (0, 0), sigma).reshape(x.shape)
    if cfg.noise_std:
        rng = np.random.default_rng(int(u[7] * 2**31))
        x = x + rng.standard_normal(x.shape, dtype=np.float32) * (cfg.noise_std * u[7])
    out: np.ndarray = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    if cfg.jpeg_quality and u[8] < 0.5:
        quality = int(np.rint(cfg.jpeg_quality + (95 - cfg.jpeg_quality) * u[8] * 2))
        ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, quality])
        decoded = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if ok else None
        if decoded is not None:  # like a failed encode: the image goes on without the JPEG round trip
            out = decoded.reshape(out.shape)
    return out


def _augment_numpy(
    images: np.ndarray, angle: np.ndarray, dx: np.ndarray, dy: np.ndarray, u: np.ndarray, cfg: AugmentConfig
) -> np.ndarray:
    """Warp then change intensities; ``u`` holds the per-image uniforms in [0, 1):
    0 zoom, 1 shear, 2 flip, 3 gamma, 4 contrast, 5 brightness, 6 blur, 7 noise, 8 JPEG."""
    import cv2

    # One thread per call: tf.data already runs batches in parallel, and OpenCV's own pool would
    # fight TensorFlow's training threads for the same cores (measured: halves training speed).
    cv2.setNumThreads(1)
    out = np.empty_like(images)
    height, width = images.shape[1:3]
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP  # matrices map output → input pixels
    intensity = any((cfg.brightness, cfg.contrast, cfg.gamma, cfg.blur_sigma, cfg.noise_std, cfg.jpeg_quality))
    shear = math.radians(cfg.shear_deg)
    for i in range(len(images)):
        mat = affine_matrix(
            float(angle[i]),
            float(dx[i]),
            float(dy[i]),
            1.0 + cfg.zoom * (2 * u[i, 0] - 1),
            shear * (2 * u[i, 1] - 1),
            bool(cfg.horizontal_flip and u[i, 2] < 0.5),
            height,
            width,
        )
        warped = cv2.warpAffine(images[i], mat, (width, height), flags=flags, borderMode=_BORDERS[cfg.fill_mode])
        warped = warped.reshape(out[i].shape)  # cv2 drops a trailing axis of size 1
        out[i] = _intensity(warped, u[i], cfg) if intensity else warped
    return out


def augment_batch(images: Any, seed: Any, cfg: AugmentConfig) -> Any:
    """Randomly transform a (B, H, W, C) uint8 batch; same seed, same result.

    The random parameters come from TensorFlow's stateless RNG; the resampling is OpenCV's
    ``warpAffine`` (SIMD, releases the GIL), several times faster on CPU than TensorFlow's
    ImageProjectiveTransformV3 for uint8 images.

    Args:
        images: (B, H, W, C) uint8 tensor, as the input pipeline decodes it.
        seed: the batch's stateless seed, a pair of integers (a tensor inside ``tf.data``).
        cfg: the augmentation ranges (``input.augment``); all zero returns ``images`` as given.

    Returns:
        (B, H, W, C) uint8 tensor of the same static shape: each image warped once (rotation, zoom,
        shear, shift, optional flip; pixels from outside filled by ``cfg.fill_mode``), then
        changed in intensity when any intensity range is set.
    """
    tf = tensorflow()
    if cfg.is_identity:
        return images
    angle, dx, dy = affine_params(tf.shape(images)[0], seed, cfg)
    u = tf.random.stateless_uniform(
        [tf.shape(images)[0], _EXTRA_DRAWS], seed=tf.cast(seed, tf.int64) + tf.constant([0, 3], tf.int64)
    )
    out = tf.numpy_function(
        lambda x, a, b, c, v: _augment_numpy(x, a, b, c, v, cfg),
        [images, angle, dx, dy, u],
        images.dtype,
        stateful=False,
    )
    return tf.ensure_shape(out, images.shape)
