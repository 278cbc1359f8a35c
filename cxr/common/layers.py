"""The custom Keras layers inside saved models, registered under the package name ``cxr``.

They live below training and inference alike: training builds models with them, and loading a
saved ``.keras`` file (predict, serve, evaluate, the ensemble) needs them registered. The
registered names (``cxr>IntensityNormalization``) do not depend on this module's path.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cxr.runtime import tensorflow

tensorflow()  # quiet TensorFlow import before Keras pulls it in
import keras  # noqa: E402


@keras.saving.register_keras_serializable(package="cxr")
class IntensityNormalization(keras.layers.Layer):
    """Per-image intensity normalisation of [0, 1] images, inside the model.

    Films from another scanner or exposure differ in brightness and contrast before they differ in
    anatomy; normalising each image removes that difference for training and inference alike.

    - ``standardize``: zero mean, unit standard deviation per image (all channels together).
    - ``equalize``: histogram equalisation per image (256 grey levels, computed on the channel
      mean), output in [0, 1].
    """

    def __init__(self, mode: str = "standardize", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if mode not in ("standardize", "equalize"):
            raise ValueError(f"IntensityNormalization mode {mode!r}: choose standardize or equalize")
        self.mode = mode

    def call(self, inputs: Any) -> Any:
        tf = tensorflow()
        x = tf.cast(inputs, tf.float32)
        if self.mode == "standardize":
            mean, var = tf.nn.moments(x, axes=[1, 2, 3], keepdims=True)
            return tf.cast((x - mean) / tf.sqrt(var + 1e-6), inputs.dtype)
        grey = tf.reduce_mean(x, axis=-1)  # (B, H, W)
        batch = tf.shape(grey)[0]
        levels = tf.cast(tf.clip_by_value(tf.round(grey * 255.0), 0, 255), tf.int32)
        offsets = tf.range(batch)[:, None, None] * 256
        hist = tf.math.bincount(
            tf.reshape(levels + offsets, [-1]), minlength=256 * batch, maxlength=256 * batch, dtype=tf.float32
        )
        cdf = tf.cumsum(tf.reshape(hist, [batch, 256]), axis=1)
        # the largest float32, not infinity: the same minimum (some level always has pixels), and an
        # exported ONNX graph computes inf arithmetic into NaN (cxr/inference/export.py)
        never = tf.fill(tf.shape(cdf), float(np.finfo(np.float32).max))
        cdf_min = tf.reduce_min(tf.where(cdf > 0, cdf, never), axis=1, keepdims=True)
        total = cdf[:, -1:]
        lut = tf.clip_by_value((cdf - cdf_min) / tf.maximum(total - cdf_min, 1.0), 0.0, 1.0)
        out = tf.gather(lut, levels, batch_dims=1)  # (B, H, W)
        return tf.cast(tf.repeat(out[..., None], tf.shape(x)[-1], axis=-1), inputs.dtype)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="cxr")
class ImagenetCaffePreprocess(keras.layers.Layer):
    """[0, 255] RGB → BGR minus the ImageNet channel means, as VGG16's ImageNet weights expect.

    A named layer rather than a Lambda, so saved models load with ``safe_mode=True``.
    """

    MEAN_BGR = (103.939, 116.779, 123.68)

    def call(self, inputs: Any) -> Any:
        bgr = keras.ops.flip(inputs, axis=-1)
        return bgr - keras.ops.convert_to_tensor(self.MEAN_BGR, dtype=bgr.dtype)


@keras.saving.register_keras_serializable(package="cxr")
class StochasticDepth(keras.layers.Layer):
    """Drop a residual branch for whole examples while training (Huang et al. 2016), scaled so its
    expectation is unchanged; the identity at inference. ``rate`` is the probability of dropping."""

    def __init__(self, rate: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"StochasticDepth rate {rate}: must be in [0, 1)")
        self.rate = float(rate)
        self.seed = keras.random.SeedGenerator(1337)

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        if not training or self.rate == 0.0:
            return inputs
        keep = 1.0 - self.rate
        shape = (keras.ops.shape(inputs)[0], 1, 1, 1)
        mask = keras.ops.floor(keep + keras.random.uniform(shape, seed=self.seed, dtype=inputs.dtype))
        return inputs / keep * mask

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "rate": self.rate}
