"""Load a trained model with its card, and score images exactly as the model was trained.

The preprocessing (image size, resize mode, interpolation, scaling) is read from the model card,
never re-typed, and the decoding is the training pipeline's own function; DICOM files go through
:mod:`cxr.inference.dicom` and then the same resize.

A model is used only when its file is the one its card describes (the card's ``model_sha256`` is
the file's sha256): the card says how to prepare images for it, and a card that describes other
bytes says nothing reliable about this file. :func:`load` refuses any other file with one line
unless the caller explicitly allows an unverified model (``cxr predict --allow-unverified``).
Every image is checked against the decode caps (``input.max_image_pixels`` / ``max_image_bytes``)
before it is decoded.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxr.common.domain import SUFFIX as DOMAIN_SUFFIX
from cxr.common.domain import (
    DomainModel,
    MemberDomains,
    features_and_probabilities,
    load_domain,
    load_member_domains,
    scoring_model,
)
from cxr.common.images import ImageLimits, ImageRefused, NotAFilm, OverCap, check_image
from cxr.common.model_card import ModelCard, card_path_for, read_card
from cxr.common.preprocessing import resize_image, traced_decoder
from cxr.common.thresholds import Threshold, model_threshold
from cxr.config import ConfigError, InputConfig, parse_input
from cxr.errors import CxrError, DataError
from cxr.inference.dicom import is_dicom, read_dicom
from cxr.provenance import lineage_log
from cxr.provenance.hashing import sha256_file
from cxr.runtime import DECODER_LINE, decoder_messages, native_stderr, pass_on, tensorflow
from cxr.safe_text import printable
from cxr.workspace import HERE

log = logging.getLogger(__name__)


class UnverifiedModel(CxrError):
    """The model file is not the one its card describes (its sha256 is not the card's ``model_sha256``)."""


@dataclass
class LoadedModel:
    """A Keras model with its card and the preprocessing the card names.

    Attributes:
        model: the Keras model.
        card: the model card (:class:`cxr.common.model_card.ModelCard`).
        input: the card's preprocessing as input settings (``cache="memory"``, default decode caps).
        path: the ``.keras`` file.
        verified: the file's sha256 equals the card's ``model_sha256``.
        sha256: the file's own sha256 (the card's claim is ``card.model_sha256``).
    """

    model: Any
    card: ModelCard
    input: InputConfig
    path: Path
    verified: bool
    sha256: str = ""
    domain: DomainModel | MemberDomains | None = None  # the content check's statistics, when the card has one
    _scorer: Any = None
    _call: Any = None

    @property
    def name(self) -> str:
        """The model's name: its file name without ``.keras`` (``ensemble`` for the ensemble)."""
        return self.path.name.removesuffix(".keras")

    def threshold(
        self, given: float | None = None, given_source: str = "--threshold", eval_dir: str | Path = HERE.eval
    ) -> Threshold:
        """Which threshold this model file uses, and why (:func:`cxr.common.thresholds.model_threshold`)."""
        return model_threshold(self.name, self.sha256, self.card, given, given_source, eval_dir)

    def score(self, images: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
        """P(pneumonia) and, when the model has a content check, each image's domain score (≤ 1 in
        domain), from one forward pass per batch.

        Args:
            images: (N, S, S, 3) uint8.
            batch_size: images per model call.

        Returns:
            ((N,) probabilities, (N,) domain scores or None).
        """
        if self._call is None:
            self._call = compiled(self.model, self.input.image_size)
        if self.domain is None:
            return predict_images(self._call, images, batch_size), None
        if isinstance(self.domain, MemberDomains):  # an ensemble: each member's check, the worst score
            if self._scorer is None:
                size = self.input.image_size
                self._scorer = {
                    name: compiled(scoring_model(self.model.get_layer(name)), size) for name in self.domain.members
                }
            scores = [
                self.domain.members[name].scores(features_and_probabilities(scorer, images, batch_size)[0])
                for name, scorer in self._scorer.items()
            ]
            return predict_images(self._call, images, batch_size), np.max(scores, axis=0)
        if self._scorer is None:
            self._scorer = compiled(scoring_model(self.model), self.input.image_size)
        features, probabilities = features_and_probabilities(self._scorer, images, batch_size)
        return probabilities, self.domain.scores(features) if len(features) else np.zeros(0)

    def cached_input(self, cache_dir: str) -> InputConfig:
        """The model's own preprocessing, reading and filling the pipeline's decoded-image cache.

        Args:
            cache_dir: the decoded-image cache folder (``input.cache_dir``).

        Returns:
            A copy of the model's input settings with ``cache="disk"`` in ``cache_dir``.
        """
        return self.input.model_copy(update={"cache": "disk", "cache_dir": cache_dir})


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


# what the card's preprocessing may say: the input settings it names, and what this pipeline always does
_PREPROCESSING = ("image_size", "resize", "interpolation", "normalize", "center_crop")
_REQUIRED = ("image_size", "resize", "interpolation")
_FIXED = {"channels": 3, "scale": "1/255", "dtype": "float32"}


def card_input(card: ModelCard, card_file: Path) -> InputConfig:
    """The input settings a card's ``input.preprocessing`` names, parsed as strictly as ``params.yaml``.

    Args:
        card: the model card.
        card_file: its path (for messages).

    Returns:
        The :class:`InputConfig` (``cache="memory"``; decode caps at their defaults).

    Raises:
        CxrError: no preprocessing, a missing or unknown key, or a value of the wrong type or range
            (``image_size: "abc"``, ``resize: bogus``), naming the card.
    """
    shown = printable(card_file)
    pre = card.input.preprocessing if card.input is not None else None
    if not isinstance(pre, Mapping):
        raise CxrError(f"{shown}: the card has no input.preprocessing object, so images cannot be prepared for it")
    unknown = sorted(str(k) for k in pre if k not in _PREPROCESSING and k not in _FIXED)
    missing = [k for k in _REQUIRED if k not in pre]
    if unknown or missing:
        what = f"unknown step {', '.join(map(printable, unknown))}" if unknown else f"no {', '.join(missing)}"
        raise CxrError(f"{shown}: input.preprocessing has {what}; this pipeline cannot prepare images as it says")
    for key, expected in _FIXED.items():
        if key in pre and pre[key] != expected:
            raise CxrError(
                f"{shown}: input.preprocessing.{key}={printable(repr(pre[key]))}; this pipeline feeds {expected!r} only"
            )
    try:
        return parse_input({k: pre[k] for k in _PREPROCESSING if k in pre} | {"cache": "memory"}, "input.preprocessing")
    except ConfigError as exc:
        raise CxrError(f"{shown}: {printable(exc)}; the card is damaged: retrain or restore it") from None


def _model_sha256(model_path: Path) -> str:
    try:
        return sha256_file(model_path)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise CxrError(f"{printable(model_path)}: cannot read the model file ({reason})") from None


def _verify(model_path: Path, card: ModelCard, card_file: Path, allow_unverified: bool) -> tuple[str, bool]:
    """(the file's sha256, whether it is the card's ``model_sha256`` and the card the one its lineage
    record names); refuse a mismatch unless allowed."""
    actual = _model_sha256(model_path)
    claimed = card.model_sha256
    card_name = printable(card_file.name)
    if claimed == actual:
        why = lineage_log.card_change(card_file, actual)
        if why is None:
            return actual, True
        why = f"{card_name}: {why}"
    elif isinstance(claimed, str) and claimed:
        why = f"its sha256 {actual[:12]}… differs from its card's model_sha256 {printable(claimed[:12])}… ({card_name})"
    else:
        why = f"its card {card_name} has no model_sha256"
    if not allow_unverified:
        raise UnverifiedModel(
            f"{printable(model_path)}: unverified model: {why}; retrain it or restore the files the lineage log records"
        )
    log.warning("%s: unverified model used as asked: %s", printable(model_path), why)
    return actual, False


def _check_input_shape(model: Any, cfg: InputConfig, model_path: Path, card_file: Path) -> None:
    """The card's image size must be what the model takes (when its input has a fixed size)."""
    try:
        shape = tuple(model.inputs[0].shape)
    except (AttributeError, IndexError, TypeError):
        return  # a subclassed model without a symbolic input: nothing to compare
    if len(shape) != 4:
        raise CxrError(f"{printable(model_path)}: the model takes inputs of shape {shape}, not images")
    height, width, channels = shape[1:]
    if channels not in (None, 3) or any(side not in (None, cfg.image_size) for side in (height, width)):
        raise CxrError(
            f"{printable(card_file)}: input.preprocessing.image_size={cfg.image_size} but "
            f"{printable(model_path.name)} takes {height}×{width}×{channels} images; the card describes another model"
        )


def load(model_path: str | Path, allow_unverified: bool = False) -> LoadedModel:
    """Load ``<name>.keras`` (Keras safe mode) and its ``<name>.card.json``, verified against each other.

    The preprocessing (image size, resize mode, interpolation) comes from the card, never from
    ``params.yaml``, so the model sees images as it did in training. The card is checked first (a
    JSON object whose preprocessing parses strictly), then the file's sha256 against the card's
    ``model_sha256`` (before Keras reads a byte of it), then the model's input size against the card.

    Args:
        model_path: the ``.keras`` file; its card must sit beside it.
        allow_unverified: use a file whose sha256 differs from its card's (or whose card has none),
            with a warning, instead of refusing it. The card's preprocessing is still used.

    Returns:
        The model, its card, its input settings (``cache="memory"``), its path, whether its bytes
        match the card, and the file's own sha256.

    Raises:
        CxrError: one line: the model file is missing, a folder or unreadable; its card is missing,
            not a JSON object, or its preprocessing is unknown or ill-typed; the file is not the one
            its card describes (:class:`UnverifiedModel`, unless allowed); Keras cannot load it; or
            its input size disagrees with the card.
    """
    model_path = Path(model_path)
    shown = printable(model_path)
    if model_path.is_dir():
        raise CxrError(f"{shown}: a folder, not a model file; give a .keras file or a model name")
    if not model_path.is_file():
        raise CxrError(f"{shown}: model file not found")
    card_file = card_path_for(model_path)
    card = read_card(card_file)
    cfg = card_input(card, card_file)
    sha256, verified = _verify(model_path, card, card_file, allow_unverified)
    if not zipfile.is_zipfile(model_path):  # checked here, before TensorFlow: a .keras file is a zip archive
        raise CxrError(f"{shown}: not a Keras model file (a .keras file is a zip archive); retrain or restore it")
    tensorflow()
    import keras

    import cxr.common.layers  # noqa: F401  (registers the custom layers for deserialisation)

    try:
        with native_stderr(quiet_on=(Exception,)) as noise:
            model = keras.saving.load_model(model_path, safe_mode=True)
    except Exception as exc:
        reason = printable(str(exc).strip().splitlines()[0][:160]) if str(exc).strip() else type(exc).__name__
        raise CxrError(f"{shown}: cannot load the model ({type(exc).__name__}: {reason})") from None
    pass_on(noise)
    _check_input_shape(model, cfg, model_path, card_file)
    domain = _load_domain(model_path, card, allow_unverified)
    return LoadedModel(model, card, cfg, model_path, verified, sha256, domain)


def _load_domain(model_path: Path, card: ModelCard, allow_unverified: bool) -> DomainModel | MemberDomains | None:
    """The content check's statistics beside the model, verified against the card's sha256."""
    if card.domain is None:
        return None
    path = model_path.with_name(model_path.name.removesuffix(".keras") + DOMAIN_SUFFIX)
    shown = printable(path)
    problem = None
    if not path.is_file():
        problem = "missing"
    elif card.domain.sha256 != sha256_file(path):
        problem = "not the file the card names (sha256 differs)"
    if problem is None:
        try:
            return load_member_domains(path) if card.kind == "ensemble" else load_domain(path)
        except (OSError, ValueError, KeyError) as exc:
            problem = f"unreadable ({printable(type(exc).__name__)})"
    if not allow_unverified:
        raise UnverifiedModel(f"{shown}: domain statistics {problem}; retrain the model or restore the file")
    log.warning("%s: domain statistics %s: no content check for this model", shown, problem)
    return None


def _op_message(exc: BaseException) -> str:
    """TensorFlow's error message without the function-node prefix and the ``[Op:...]`` suffix."""
    text = str(getattr(exc, "message", exc)).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\{\{[^}]*\}\}\s*", "", text)
    return re.sub(r"\s*\[Op:\w+\]\s*$", "", text)


def _load_dicom(path: Path, shown: str, cfg: InputConfig, limits: ImageLimits, allow_outside: bool) -> np.ndarray:
    """A DICOM file through :func:`read_dicom` and the training resize. A failure that the reader did
    not foresee still ends as this file's one line (DataError), so the rest of a batch is scored."""
    tf = tensorflow()
    try:
        pixels = read_dicom(path, limits=limits, allow_outside_intended_use=allow_outside)
        image = tf.convert_to_tensor(pixels)
        return resize_image(image, cfg.image_size, cfg.resize, cfg.interpolation).numpy()
    except (DataError, OSError):
        raise
    except Exception as exc:  # hostile DICOM attributes fail pydicom/numpy in many ways
        reason = printable((str(exc).splitlines()[0] if str(exc).strip() else "")[:120])
        raise DataError(f"{shown}: the DICOM file cannot be decoded ({type(exc).__name__}: {reason})") from None


def load_image(path: str | Path, cfg: InputConfig, allow_outside_intended_use: bool = False) -> np.ndarray:
    """One file → (S, S, 3) uint8 as the model saw its training images; DataError if unreadable.

    The file's size and header are checked against the decode caps of ``cfg`` (``max_image_bytes``,
    ``max_image_pixels``) before it is decoded. JPEG, PNG and BMP files are then decoded by the
    training pipeline's own function; DICOM files (by marker or ``.dcm`` suffix) through
    :func:`cxr.inference.dicom.read_dicom`, then the same resize. What the decoders log about a
    damaged file becomes the error's reason (or a warning line when it decoded anyway).

    Args:
        path: the image file.
        cfg: the model's preprocessing (``image_size`` S, ``resize``, ``interpolation``) and caps.
        allow_outside_intended_use: decode a DICOM whose metadata says it is not a chest
            radiograph instead of refusing it (:func:`cxr.inference.dicom.intended_use_problem`).

    Returns:
        (S, S, 3) uint8 array.

    Raises:
        DataError: one line naming the file (control characters escaped): missing, a folder,
            unreadable, over a cap, or neither a readable DICOM nor a JPEG/PNG/BMP image.
    """
    tf = tensorflow()
    path = Path(path)
    shown = printable(path)
    limits = ImageLimits.of(cfg)
    try:
        if path.is_dir():
            raise DataError(f"{shown}: a folder, not an image file")
        if not path.is_file():  # missing, or a device, pipe or socket (/dev/zero never ends)
            raise DataError(f"{shown}: {'not a regular file' if path.exists() else 'file not found'}")
        if is_dicom(path):
            return _load_dicom(path, shown, cfg, limits, allow_outside_intended_use)
        check_image(path, limits)
    except (OverCap, NotAFilm) as exc:
        raise DataError(f"{shown}: {exc}") from None
    except ImageRefused as exc:
        reason = str(exc)
        if reason.startswith("not an image ("):  # "not an image (unknown format)": say it once
            reason = reason.removeprefix("not an image (").removesuffix(")")
        raise DataError(f"{shown}: not a readable JPEG/PNG/BMP image ({reason})") from None
    except OSError as exc:
        raise DataError(f"{shown}: unreadable ({exc.strerror or type(exc).__name__})") from None
    try:
        with native_stderr(quiet_on=(tf.errors.OpError,)) as noise:
            decode = traced_decoder(cfg.image_size, cfg.resize, cfg.interpolation)
            image = decode(tf.constant(os.fsencode(path))).numpy()
    except tf.errors.OpError as exc:
        reason = "; ".join(decoder_messages(noise)) or _op_message(exc)
        raise DataError(f"{shown}: not a readable JPEG/PNG/BMP image ({printable(reason)})") from None
    for line in decoder_messages(noise):
        log.warning("%s: decoded despite a damaged image (%s)", shown, printable(line))
    pass_on(noise, drop=DECODER_LINE)
    return image


def iter_images(
    paths: Sequence[str | Path], cfg: InputConfig, allow_outside_intended_use: bool = False
) -> Iterator[tuple[Path, np.ndarray | None, str | None]]:
    """(path, image or None, error or None) per file, in order.

    A file that cannot be read yields its error message instead of stopping the iteration.

    Args:
        paths: the image files.
        cfg: the model's preprocessing.
        allow_outside_intended_use: see :func:`load_image`.

    Returns:
        An iterator of ``(path, (S, S, 3) uint8 image, None)`` or ``(path, None, one-line error)``.
    """
    for path in paths:
        try:
            yield Path(path), load_image(path, cfg, allow_outside_intended_use), None
        except DataError as exc:
            yield Path(path), None, str(exc)


def compiled(model: Any, image_size: int) -> Any:
    """``model(x, training=False)`` as one traced TensorFlow graph for (N, S, S, 3) float32 batches.

    Called eagerly, a Keras functional model pays Python overhead per layer: 52 ms for one 160-px
    image through cxrnet on this 2-core VM, against 6.9 ms for the same call traced once (batch of
    eight: 76 against 24 ms). The batch dimension is left open, so batches of any size share the
    one trace. The result is called like the model (``training`` is accepted and ignored: always
    inference).
    """
    tf = tensorflow()
    spec = tf.TensorSpec((None, image_size, image_size, 3), tf.float32)
    traced = tf.function(lambda batch: model(batch, training=False), input_signature=[spec])

    def call(batch: Any, training: bool = False) -> Any:
        return traced(tf.convert_to_tensor(batch, tf.float32))

    return call


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
