"""Load a trained model with its card, and score images exactly as the model was trained.

The preprocessing (image size, resize mode, interpolation, scaling) is read from the model card,
never re-typed, and the decoding is the training pipeline's own function; DICOM files go through
:mod:`cxr.inference.dicom` and then the same resize.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cxr.errors import CxrError, DataError
from cxr.inference.dicom import is_dicom, read_dicom
from cxr.provenance.hashing import sha256_file
from cxr.runtime import tensorflow
from cxr.training.input_pipeline import InputConfig, decode_image, resize_image
from cxr.workspace import HERE

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: Any
    card: dict[str, Any]
    input: InputConfig
    path: Path
    verified: bool  # the file's sha256 matches its card

    def cached_input(self, cache_dir: str) -> InputConfig:
        """The model's own preprocessing, reading and filling the pipeline's decoded-image cache.

        Args:
            cache_dir: the decoded-image cache folder (``input.cache_dir``).

        Returns:
            A copy of the model's input settings with ``cache="disk"`` in ``cache_dir``.
        """
        return replace(self.input, cache="disk", cache_dir=cache_dir)


ENSEMBLE = "ensemble"


def model_file(name: str | Path, models_dir: str | Path = HERE.models) -> Path:
    """``models/<name>.keras`` for a model name (``ensemble/ensemble.keras`` for the ensemble); a
    path ending in ``.keras`` as given.

    Args:
        name: a model name, or a path ending in ``.keras``.
        models_dir: the models folder; the ensemble's folder is its sibling.

    Returns:
        The model file's path (not checked to exist).
    """
    if str(name).endswith(".keras"):
        return Path(name)
    if str(name) == ENSEMBLE:
        return Path(models_dir).parent / ENSEMBLE / f"{ENSEMBLE}.keras"
    return Path(models_dir) / f"{name}.keras"


def shipped_threshold(lm: LoadedModel, eval_dir: str | Path = HERE.eval) -> tuple[float, str]:
    """The model's decision threshold and where it came from.

    In order: the operating point ``evaluate`` recorded for exactly this model file (it follows
    ``evaluate.threshold_source``), the card's operating point (chosen on the validation split at
    training time: the highest threshold keeping ``train.<model>.target_sensitivity``, or Youden's
    J without one), else 0.5.

    Args:
        lm: the loaded model; its card's ``model_sha256`` must match the recorded operating point's.
        eval_dir: where ``evaluate`` wrote ``<name>/operating_point.json``.

    Returns:
        The threshold on P(pneumonia), and a phrase naming its rule and source file (for output
        and logs).
    """
    record = Path(eval_dir) / lm.path.name.removesuffix(".keras") / "operating_point.json"
    if record.is_file():
        try:
            point = json.loads(record.read_text())
        except ValueError:
            point = {}
        if point.get("model_sha256") and point.get("model_sha256") == lm.card.get("model_sha256"):
            return float(point["threshold"]), f"{point.get('rule', 'evaluate')} ({record.as_posix()})"
    point = lm.card.get("operating_point") or {}
    if isinstance(point.get("threshold"), int | float):
        return float(point["threshold"]), f"{point.get('rule', 'model card')} (model card)"
    return 0.5, "default 0.5 (no operating point in the card)"


def card_path_for(model_path: Path) -> Path:
    """The model card beside a model file.

    Args:
        model_path: ``<dir>/<name>.keras``.

    Returns:
        ``<dir>/<name>.card.json``.
    """
    return model_path.with_name(model_path.name.removesuffix(".keras") + ".card.json")


def load(model_path: str | Path) -> LoadedModel:
    """Load ``<name>.keras`` (safe mode) and its ``<name>.card.json``.

    The preprocessing (image size, resize mode, interpolation) comes from the card, never from
    ``params.yaml``, so the model sees images as it did in training. A file whose sha256 differs
    from the card's is still loaded, with a warning, and marked unverified.

    Args:
        model_path: the ``.keras`` file; its card must sit beside it.

    Returns:
        The model, its card, its input settings (``cache="memory"``), its path and whether its
        bytes match the card.

    Raises:
        CxrError: the model file or its card is missing, or Keras cannot load the model.
    """
    model_path = Path(model_path)
    if not model_path.is_file():
        raise CxrError(f"{model_path}: model file not found")
    card_file = card_path_for(model_path)
    if not card_file.is_file():
        raise CxrError(f"{card_file}: model card not found; the preprocessing of {model_path.name} is unknown")
    card = json.loads(card_file.read_text())
    verified = card.get("model_sha256") == sha256_file(model_path)
    if not verified:
        log.warning("%s does not match the sha256 in its card: results are unverified", model_path)
    tensorflow()
    import keras

    import cxr.training.models  # noqa: F401  (registers the custom layers for deserialisation)

    try:
        model = keras.saving.load_model(model_path, safe_mode=True)
    except Exception as exc:
        raise CxrError(f"{model_path}: cannot load ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
    pre = card.get("input", {}).get("preprocessing", {})
    cfg = InputConfig(
        image_size=int(pre.get("image_size", 224)),
        resize=pre.get("resize", "squash"),
        interpolation=pre.get("interpolation", "bilinear"),
        cache="memory",
    )
    return LoadedModel(model, card, cfg, model_path, verified)


def load_image(path: str | Path, cfg: InputConfig) -> np.ndarray:
    """One file → (S, S, 3) uint8 as the model saw its training images; DataError if unreadable.

    JPEG, PNG and BMP files are decoded by the training pipeline's own function; DICOM files
    (by marker or ``.dcm`` suffix) through :func:`cxr.inference.dicom.read_dicom`, then the same
    resize.

    Args:
        path: the image file.
        cfg: the model's preprocessing (``image_size`` S, ``resize``, ``interpolation``).

    Returns:
        (S, S, 3) uint8 array.

    Raises:
        DataError: the file is missing, or is neither a readable DICOM nor a JPEG/PNG/BMP image.
    """
    tf = tensorflow()
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if is_dicom(path):
        image = tf.convert_to_tensor(read_dicom(path))
        return resize_image(image, cfg.image_size, cfg.resize, cfg.interpolation).numpy()
    try:
        return decode_image(tf.constant(str(path)), cfg.image_size, cfg.resize, cfg.interpolation).numpy()
    except tf.errors.OpError as exc:
        raise DataError(f"{path}: not a readable JPEG/PNG/BMP image ({exc.message.splitlines()[0]})") from exc


def iter_images(paths: Sequence[str | Path], cfg: InputConfig) -> Iterator[tuple[Path, np.ndarray | None, str | None]]:
    """(path, image or None, error or None) per file, in order.

    A file that cannot be read yields its error message instead of stopping the iteration.

    Args:
        paths: the image files.
        cfg: the model's preprocessing.

    Returns:
        An iterator of ``(path, (S, S, 3) uint8 image, None)`` or ``(path, None, one-line error)``.
    """
    for path in paths:
        try:
            yield Path(path), load_image(path, cfg), None
        except DataError as exc:
            yield Path(path), None, str(exc)


def predict_images(model: Any, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """P(pneumonia) for (N, S, S, 3) uint8 images.

    Images are scaled to [0, 1] float32 one batch at a time, so memory stays at one batch of
    floats however many images there are.

    Args:
        model: the Keras model (called directly, ``training=False``).
        images: (N, S, S, 3) uint8.
        batch_size: images per model call.

    Returns:
        (N,) float64 probabilities; empty for no images.
    """
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].astype(np.float32) / 255.0
        out.append(np.asarray(model(batch, training=False), dtype=np.float64).reshape(-1))
    return np.concatenate(out) if out else np.zeros(0)
