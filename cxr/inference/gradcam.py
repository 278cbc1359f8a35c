"""Grad-CAM for any of our Keras 3 models, functional or Sequential, nested bases included.

Keras 3 cannot build ``Model(model.inputs, [layer.output, model.output])`` for a Sequential model
that was never called, nor reach a layer inside a nested base (VGG16). Instead the model's layers
are run one after another under a GradientTape, and the tape watches the chosen convolution's
output wherever it sits (our models are chains: each layer feeds the next).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cxr.errors import CxrError
from cxr.runtime import tensorflow

tensorflow()
import keras  # noqa: E402

_CONV_TYPES = (keras.layers.Conv2D, keras.layers.SeparableConv2D, keras.layers.DepthwiseConv2D)


def _is_conv(layer: Any) -> bool:
    return isinstance(layer, _CONV_TYPES)


def _walk(model: Any) -> list[tuple[Any, Any]]:
    """(outer layer, inner layer) pairs in execution order; inner is the layer itself if not nested."""
    pairs = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            pairs += [(layer, inner) for inner in layer.layers]
        else:
            pairs.append((layer, layer))
    return pairs


def last_conv_layer(model: Any) -> str:
    """Name of the last convolution, searching nested models too.

    Args:
        model: a Keras model; nested models (a VGG16 base) are searched one level deep.

    Returns:
        The name of the last Conv2D, SeparableConv2D or DepthwiseConv2D layer in execution order.

    Raises:
        CxrError: the model has no convolution.
    """
    convs = [inner.name for _, inner in _walk(model) if _is_conv(inner)]
    if not convs:
        raise CxrError(f"model {model.name} has no convolution layer for Grad-CAM")
    return convs[-1]


def _run_chain(layers: list[Any], x: Any, target: str, tape: Any) -> tuple[Any, Any]:
    conv_out = None
    for layer in layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.Model):
            sub_out, x = _run_chain(layer.layers, x, target, tape)
            conv_out = sub_out if sub_out is not None else conv_out
            continue
        x = layer(x, training=False)
        if layer.name == target:
            tape.watch(x)
            conv_out = x
    return conv_out, x


def gradcam(model: Any, images: np.ndarray, layer_name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Heat maps in [0, 1] at the images' size, and P(pneumonia), for a batch of [0, 1] images.

    Grad-CAM of the sigmoid output: the chosen layer's channels are weighted by the spatial mean of
    the gradient of P(pneumonia), summed, passed through ReLU, resized (bilinear) to the images'
    size and divided by each map's maximum; a map with no positive evidence stays all zero.

    Args:
        model: one of our chain-shaped Keras models (functional or Sequential, nested bases
            included).
        images: (N, H, W, 3) float32 in [0, 1], at the model's input size.
        layer_name: the convolution to explain; None takes :func:`last_conv_layer`.

    Returns:
        (N, H, W) heat maps in [0, 1], and (N,) float32 P(pneumonia).

    Raises:
        CxrError: the model has no such layer (or no convolution at all), or the layer is not on
            the model's main path.
    """
    tf = tensorflow()
    target = layer_name or last_conv_layer(model)
    if target not in {inner.name for _, inner in _walk(model)}:
        raise CxrError(f"model {model.name} has no layer {target!r}")
    x = tf.convert_to_tensor(images, dtype=tf.float32)
    with tf.GradientTape() as tape:
        conv_out, output = _run_chain(model.layers, x, target, tape)
        score = tf.cast(output[:, 0], tf.float32)
    if conv_out is None:
        raise CxrError(f"layer {target!r} is not on the model's main path")
    grads = tape.gradient(score, conv_out)
    conv_out = tf.cast(conv_out, tf.float32)
    weights = tf.reduce_mean(tf.cast(grads, tf.float32), axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * conv_out, axis=-1))[..., None]
    cam = tf.image.resize(cam, images.shape[1:3], method="bilinear")[..., 0].numpy()
    peak = cam.reshape(len(cam), -1).max(axis=1).reshape(-1, 1, 1)
    cam = np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0)
    return cam, score.numpy()


def border_fraction(cam: np.ndarray, margin: float = 0.125) -> float:
    """Share of a heat map's mass in the outer ``margin`` band of the image (markers, labels, edges).

    Uniform heat gives 1 − (1 − 2·margin)² (0.4375 for 12.5 %); more than that means the model
    looks at the border more than at the central field where the lungs are.

    Args:
        cam: (H, W) non-negative heat map.
        margin: the band's width on each side, as a fraction of the height / width.

    Returns:
        The band's share of the total heat, in [0, 1]; NaN for a map with no heat.
    """
    h, w = cam.shape
    dy, dx = round(h * margin), round(w * margin)
    total = float(cam.sum())
    if total <= 0:
        return float("nan")
    inner = float(cam[dy : h - dy, dx : w - dx].sum())
    return (total - inner) / total


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a jet-coloured heat map over an image (both [0, 1]); interpolant 0.5 as the notebook.

    Args:
        image: (H, W, 3) or (H, W) image in [0, 1].
        cam: (H, W) heat map in [0, 1].
        alpha: the heat map's weight; the image gets 1 − alpha.

    Returns:
        (H, W, 3) RGB float image in [0, 1].
    """
    import matplotlib

    colours = matplotlib.colormaps["jet"](cam)[..., :3]
    base = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=-1)
    return np.clip((1 - alpha) * base + alpha * colours, 0, 1)
