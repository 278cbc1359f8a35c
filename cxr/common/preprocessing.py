"""The image contract shared by training, inference and serving: a file becomes (S, S, 3) uint8.

Decoding (with libjpeg's DCT-domain downscale for large JPEGs) and the resize rule (``squash`` like
the notebook, or ``pad`` to keep the aspect ratio) live here, below every step that feeds a model,
so the training cache, ``cxr predict``, ``cxr serve`` and evaluation prepare a film identically.
"""

from __future__ import annotations

import functools
from typing import Any

from cxr.runtime import tensorflow


def decode_image(path: Any, image_size: int, resize: str = "squash", interpolation: str = "bilinear") -> Any:
    """File path (string tensor) → (S, S, 3) uint8 tensor."""
    tf = tensorflow()
    data = tf.io.read_file(path)
    is_jpeg = tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff")
    image = tf.cond(
        is_jpeg,
        lambda: _decode_jpeg_reduced(data, image_size),
        lambda: tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8),
    )
    image.set_shape([None, None, 3])
    return resize_image(image, image_size, resize, interpolation)


@functools.lru_cache(maxsize=8)
def traced_decoder(image_size: int, resize: str = "squash", interpolation: str = "bilinear") -> Any:
    """:func:`decode_image` traced once into a TensorFlow graph, for one file at a time.

    Called eagerly, its thirty-odd ops cost about 3 ms of Python dispatch per image (224-px JPEG to
    160 px on this 2-core VM); traced, the same ops run from one call. The training pipeline does
    not need it (``tf.data`` traces its map function already); ``cxr predict`` and ``cxr serve`` do.
    """
    tf = tensorflow()

    @tf.function(input_signature=[tf.TensorSpec((), tf.string)])
    def decode(path: Any) -> Any:
        return decode_image(path, image_size, resize, interpolation)

    return decode


def _decode_jpeg_reduced(data: Any, image_size: int) -> Any:
    """Decode a JPEG at 1/2, 1/4 or 1/8 scale when it stays at least ``image_size`` on its short side.

    libjpeg scales in the DCT domain (an area average), so a 2000-px radiograph bound for 224 px
    decodes several times faster, and the final resize has less to do.
    """
    tf = tensorflow()
    shape = tf.image.extract_jpeg_shape(data)
    short = tf.minimum(shape[0], shape[1])
    ratio_index = tf.reduce_sum(tf.cast(short // tf.constant([2, 4, 8]) >= image_size, tf.int32))
    branches = [lambda r=r: tf.io.decode_jpeg(data, channels=3, ratio=r) for r in (1, 2, 4, 8)]
    return tf.switch_case(ratio_index, branches)


def resize_image(image: Any, image_size: int, resize: str = "squash", interpolation: str = "bilinear") -> Any:
    """(H, W, 3) uint8 → (S, S, 3) uint8, squashed or letter-boxed (zero padding)."""
    tf = tensorflow()
    size = (image_size, image_size)

    def resized(antialias: bool) -> Any:
        if resize == "pad":
            out = tf.image.resize_with_pad(image, image_size, image_size, method=interpolation, antialias=antialias)
        else:
            out = tf.image.resize(image, size, method=interpolation, antialias=antialias)
        out = tf.cast(out, tf.float32)  # nearest keeps uint8; clip and round in float either way
        return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)

    shape = tf.shape(image)
    # Anti-aliasing matters when shrinking by more than 2×; below that plain interpolation is
    # alias-free enough and several times cheaper (JPEGs arrive pre-shrunk by the DCT decode).
    big = tf.greater(tf.minimum(shape[0], shape[1]), 2 * image_size)
    use_aa = interpolation != "nearest"
    already = tf.logical_and(tf.equal(shape[0], image_size), tf.equal(shape[1], image_size))
    out = tf.cond(
        already,
        lambda: image,  # most of the shared set is already 224 px
        lambda: tf.cond(big, lambda: resized(use_aa), lambda: resized(False)),
    )
    out.set_shape([image_size, image_size, 3])
    return out
