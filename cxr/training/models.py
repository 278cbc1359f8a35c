"""Model builders: a registry where adding a model is one function and one params.yaml block.

Every builder returns an *uncompiled functional* Keras model taking (S, S, 3) float32 images in
[0, 1] and returning P(pneumonia) from a sigmoid, so Grad-CAM can reach any convolution.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cxr.common.layers import ImagenetCaffePreprocess, IntensityNormalization, StochasticDepth
from cxr.errors import CxrError
from cxr.model_options import OPTIONS
from cxr.runtime import tensorflow

tensorflow()  # quiet TensorFlow import before Keras pulls it in
import keras  # noqa: E402

Builder = Callable[[int, Mapping[str, Any]], Any]
REGISTRY: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Add a builder under ``name``; its options are declared in :mod:`cxr.model_options`.

    Used as a decorator: ``@register("cxrnet")`` above ``def cxrnet(image_size, cfg)``.

    Args:
        name: the registry name, as ``train.models`` and ``train.<model>.architecture`` spell it.

    Returns:
        The decorator, which stores the builder in ``REGISTRY`` and returns it unchanged.

    Raises:
        CxrError: ``name`` has no options class in ``model_options.OPTIONS`` (checked when the
            decorator is applied, at import).
    """
    if name not in OPTIONS:
        raise CxrError(f"model {name!r}: declare its options in cxr/model_options.py first")

    def add(builder: Builder) -> Builder:
        REGISTRY[name] = builder
        return builder

    return add


NORMALIZATIONS = ("none", "standardize", "equalize")


def build_model(
    name: str, image_size: int, cfg: Mapping[str, Any], normalize: str = "none", center_crop: float = 0.0
) -> Any:
    """An uncompiled model of the registry.

    Args:
        name: registry name (smallnet, vgg16, cxrnet, ...), or any name whose ``cfg`` names a
            registered ``architecture`` (two differently seeded cxrnets for an ensemble, say).
        image_size: side of the square input images.
        cfg: the builder's own options (``train.<name>`` keys the trainer does not use).
        normalize: per-image intensity normalisation built into the model's first layers
            (``none``, ``standardize`` or ``equalize``), so every caller of the saved model gets it.
        center_crop: fraction of each side cut away by the model's first layer (0 = none): the
            film's outer band (collimation, background, markers) never reaches the network.

    Returns:
        A functional Keras model: (S, S, 3) float32 in [0, 1] → P(pneumonia), named ``name``.

    Raises:
        CxrError: an unknown architecture, an unknown ``normalize``, or ``center_crop`` outside
            [0, 0.4).
    """
    architecture = str(cfg.get("architecture") or name)
    if architecture not in REGISTRY:
        raise CxrError(
            f"unknown model {architecture!r}: choose one of {', '.join(sorted(REGISTRY))} "
            f"(or set train.{name}.architecture to one of them)"
        )
    if normalize not in NORMALIZATIONS:
        raise CxrError(f"input.normalize={normalize!r}: choose one of {', '.join(NORMALIZATIONS)}")
    if not 0.0 <= center_crop < 0.4:
        raise CxrError(f"input.center_crop={center_crop}: choose a fraction in [0, 0.4)")
    model = REGISTRY[architecture](image_size, {**cfg, "normalize": normalize, "center_crop": center_crop})
    if architecture != name:
        model.name = name  # the saved model and its Grad-CAM titles carry the configured name
    return model


def network_side(image_size: int, cfg: Mapping[str, Any]) -> int:
    """The side of the images the network itself sees: ``image_size`` less the centre crop's bands.

    Args:
        image_size: side of the model's square input images.
        cfg: the builder's options; ``center_crop`` is the fraction cut from each side.

    Returns:
        The cropped side in pixels (``image_size`` without a crop).
    """
    crop = float(cfg.get("center_crop", 0.0))
    return image_size - 2 * round(image_size * crop) if crop > 0 else image_size


def _image_input(image_size: int, cfg: Mapping[str, Any]) -> tuple[Any, Any]:
    """The model's input and what the network sees: centre-cropped and normalised when asked."""
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = inputs
    side = network_side(image_size, cfg)
    if side != image_size:
        x = keras.layers.CenterCrop(side, side, name="center_crop", dtype="float32")(x)
    mode = cfg.get("normalize", "none")
    if mode != "none":
        x = IntensityNormalization(mode, name="normalize", dtype="float32")(x)
    return inputs, x


def _output(x: Any) -> Any:
    # float32 output under mixed precision: a bf16 sigmoid rounds P(pneumonia) to 3 digits
    return keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="pneumonia")(x)


@register("smallnet")
def smallnet(image_size: int, cfg: Mapping[str, Any]) -> Any:
    """The notebook's SmallNet, layer for layer: 3×Conv(32) + Dense(32).

    Three 3×3 ReLU convolutions (the first two followed by 2×2 max pooling), Flatten, Dense(32):
    2.79 M parameters at 224 px, 2.77 M of them in that last Dense.

    Args:
        image_size: side of the square input images.
        cfg: ``normalize`` and ``center_crop`` (from :func:`build_model`); SmallNet has no options.

    Returns:
        The uncompiled functional model ``smallnet``.
    """
    from keras import layers

    inputs, x = _image_input(image_size, cfg)
    x = layers.Conv2D(32, 3, activation="relu", name="conv1")(x)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(32, 3, activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Conv2D(32, 3, activation="relu", name="conv3")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(32, activation="relu", name="dense")(x)
    return keras.Model(inputs, _output(x), name="smallnet")


def _imagenet_error(exc: BaseException) -> CxrError:
    return CxrError(
        f"could not download the ImageNet weights for VGG16 ({type(exc).__name__}): put "
        "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 in ~/.keras/models/, or set "
        "train.vgg16.weights to a local .h5/.keras weights file, or to none (random init)"
    )


@register("vgg16")
def vgg16(image_size: int, cfg: Mapping[str, Any]) -> Any:
    """Frozen VGG16 base + the notebook's head: Flatten, Dense 4096, Dense 1072, Dropout 0.2.

    Args:
        image_size: side of the square input images; also the base's input size.
        cfg: ``weights`` (``imagenet``, downloaded by Keras; ``none``, random; or a local weights
            file), ``imagenet_preprocessing`` (scale to [0, 255], RGB→BGR, subtract the ImageNet
            means, as the ImageNet weights expect; skipped when ``normalize`` is not ``none``),
            ``dropout``, and ``normalize`` / ``center_crop`` from :func:`build_model`.

    Returns:
        The uncompiled functional model ``vgg16`` (base frozen, head trainable).

    Raises:
        CxrError: the ImageNet weights cannot be downloaded, a weights file is not found, or the
            images the base sees (after ``center_crop``) are smaller than VGG16's 32 pixels.
    """
    from keras import layers

    weights = str(cfg.get("weights", "imagenet") or "none")
    base_weights = "imagenet" if weights == "imagenet" else None
    side = network_side(image_size, cfg)  # the base sees the centre-cropped image
    if side < 32:
        raise CxrError(
            f"vgg16: input.image_size={image_size} with input.center_crop={cfg.get('center_crop', 0.0)} leaves "
            f"{side} px; VGG16 needs at least 32 px: raise input.image_size or lower input.center_crop"
        )
    try:
        base = keras.applications.VGG16(include_top=False, weights=base_weights, input_shape=(side, side, 3))
    except Exception as exc:  # urllib/HTTP/SSL errors surface as several types
        if base_weights == "imagenet":
            raise _imagenet_error(exc) from exc
        raise
    if weights not in ("imagenet", "none"):
        path = Path(weights)
        if not path.is_file():
            raise CxrError(f"train.vgg16.weights={weights}: file not found (or use imagenet / none)")
        base.load_weights(path)
    base.trainable = False
    inputs, x = _image_input(image_size, cfg)
    if cfg.get("imagenet_preprocessing", True) and cfg.get("normalize", "none") == "none":
        # VGG16's ImageNet weights expect BGR, mean-subtracted [0, 255] input; the notebook fed
        # [0, 1] RGB (imagenet_preprocessing: false reproduces that).
        x = layers.Rescaling(255.0, name="to_0_255")(x)
        x = ImagenetCaffePreprocess(name="imagenet_preprocess")(x)
    x = base(x, training=False)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(4096, activation="relu", name="fc1")(x)
    x = layers.Dense(1072, activation="relu", name="fc2")(x)
    x = layers.Dropout(float(cfg.get("dropout", 0.2)), name="dropout")(x)
    return keras.Model(inputs, _output(x), name="vgg16")


def _conv_block(x: Any, filters: int, name: str) -> Any:
    from keras import layers

    for i in (1, 2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{i}")(x)
        x = layers.BatchNormalization(name=f"{name}_bn{i}")(x)
        x = layers.ReLU(name=f"{name}_relu{i}")(x)
    return x


@register("cxrnet")
def cxrnet(image_size: int, cfg: Mapping[str, Any]) -> Any:
    """A compact radiograph classifier: BN conv blocks, global pooling, ~0.59 M parameters.

    A strided stem brings 224 px to 56 px cheaply; four double-conv blocks (32–64–128–128
    filters, batch-normalised) see the whole chest; global average pooling replaces the huge
    Flatten→Dense of SmallNet (2.77 M of its 2.79 M weights), which is where it memorises
    burned-in markers and image borders.

    Args:
        image_size: side of the square input images.
        cfg: ``widths`` (the filters of the four blocks; the stem has half the first),
            ``dropout`` before the output, and ``normalize`` / ``center_crop`` from
            :func:`build_model`.

    Returns:
        The uncompiled functional model ``cxrnet``.
    """
    from keras import layers

    widths = [int(w) for w in cfg.get("widths", [32, 64, 128, 128])]
    inputs, x = _image_input(image_size, cfg)
    x = layers.Conv2D(widths[0] // 2, 5, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    x = layers.MaxPooling2D(2, name="stem_pool")(x)
    for i, width in enumerate(widths):
        x = _conv_block(x, width, f"block{i + 1}")
        if i < len(widths) - 1:
            x = layers.MaxPooling2D(2, name=f"pool{i + 1}")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(float(cfg.get("dropout", 0.3)), name="dropout")(x)
    return keras.Model(inputs, _output(x), name="cxrnet")


def _residual_block(x: Any, filters: int, stride: int, drop: float, name: str) -> Any:
    """A basic residual block: two BN 3×3 convolutions, a projection shortcut when the shape changes."""
    from keras import layers

    shortcut = x
    y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv1")(x)
    y = layers.BatchNormalization(name=f"{name}_bn1")(y)
    y = layers.ReLU(name=f"{name}_relu1")(y)
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
    y = layers.BatchNormalization(name=f"{name}_bn2")(y)
    if drop > 0:
        y = StochasticDepth(drop, name=f"{name}_drop_path")(y)
    if stride != 1 or shortcut.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False, name=f"{name}_proj")(shortcut)
        shortcut = layers.BatchNormalization(name=f"{name}_proj_bn")(shortcut)
    return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([shortcut, y]))


@register("resnet")
def resnet(image_size: int, cfg: Mapping[str, Any]) -> Any:
    """A small residual network trained from scratch (He et al. 2016), with stochastic depth.

    A strided stem and max-pool bring the film to a quarter of its side; four stages of basic
    residual blocks (``widths`` filters, ``blocks`` blocks each; stages 2–4 halve the side) and
    global average pooling follow. Batch normalisation throughout; the residual branches are
    dropped for whole examples with a rate rising linearly to ``drop_path``.

    Args:
        image_size: side of the square input images.
        cfg: ``widths``, ``blocks``, ``dropout``, ``drop_path`` (:class:`cxr.model_options.ResNetOptions`),
            and ``normalize`` / ``center_crop`` from :func:`build_model`.

    Returns:
        The uncompiled functional model ``resnet``.
    """
    from keras import layers

    widths = [int(w) for w in cfg.get("widths", [32, 64, 128, 256])]
    blocks = [int(b) for b in cfg.get("blocks", [1, 1, 1, 1])]
    total, done = sum(blocks), 0
    inputs, x = _image_input(image_size, cfg)
    x = layers.Conv2D(widths[0], 5, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    x = layers.MaxPooling2D(2, name="stem_pool")(x)
    for stage, (width, count) in enumerate(zip(widths, blocks, strict=True)):
        for block in range(count):
            stride = 2 if stage > 0 and block == 0 else 1
            drop = float(cfg.get("drop_path", 0.1)) * done / max(total - 1, 1)
            x = _residual_block(x, width, stride, drop, f"stage{stage + 1}_block{block + 1}")
            done += 1
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(float(cfg.get("dropout", 0.3)), name="dropout")(x)
    return keras.Model(inputs, _output(x), name="resnet")
