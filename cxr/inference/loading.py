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
        """The model's own preprocessing, reading and filling the pipeline's decoded-image cache."""
        return replace(self.input, cache="disk", cache_dir=cache_dir)


ENSEMBLE = "ensemble"


def model_file(name: str | Path, models_dir: str | Path = HERE.models) -> Path:
    """``models/<name>.keras`` for a model name (``ensemble/ensemble.keras`` for the ensemble); a
    path ending in ``.keras`` as given."""
    if str(name).endswith(".keras"):
        return Path(name)
    if str(name) == ENSEMBLE:
        return Path(models_dir).parent / ENSEMBLE / f"{ENSEMBLE}.keras"
    return Path(models_dir) / f"{name}.keras"


def shipped_threshold(lm: LoadedModel, eval_dir: str | Path = HERE.eval) -> tuple[float, str]:
    """The model's decision threshold and where it came from.

    In order: the operating point ``evaluate`` recorded for exactly this model file (it follows
    ``evaluate.threshold_source``), the card's operating point (Youden's J on the validation split,
    chosen at training time), else 0.5.
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
    return model_path.with_name(model_path.name.removesuffix(".keras") + ".card.json")


def load(model_path: str | Path) -> LoadedModel:
    """Load ``<name>.keras`` (safe mode) and its ``<name>.card.json``."""
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
    cfg = InputConfig(image_size=int(pre.get("image_size", 224)), resize=pre.get("resize", "squash"),
                      interpolation=pre.get("interpolation", "bilinear"), cache="memory")
    return LoadedModel(model, card, cfg, model_path, verified)


def load_image(path: str | Path, cfg: InputConfig) -> np.ndarray:
    """One file → (S, S, 3) uint8 as the model saw its training images; DataError if unreadable."""
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
    """(path, image or None, error or None) per file, in order."""
    for path in paths:
        try:
            yield Path(path), load_image(path, cfg), None
        except DataError as exc:
            yield Path(path), None, str(exc)


def predict_images(model: Any, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """P(pneumonia) for (N, S, S, 3) uint8 images."""
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].astype(np.float32) / 255.0
        out.append(np.asarray(model(batch, training=False), dtype=np.float64).reshape(-1))
    return np.concatenate(out) if out else np.zeros(0)
