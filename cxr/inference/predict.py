"""``cxr predict``: label and P(pneumonia) for outside images (JPEG, PNG, DICOM), one per line.

Human output keeps the notebook's format (``prediction: PNEUMONIA  P(Pneumonia): 0.9731``);
``--json`` prints one JSON object per image. A bad file gets one line on stderr naming it, the
others are still predicted, and the exit status is non-zero. Every name printed has its control
characters escaped (:func:`cxr.safe_text.printable`), so a file name cannot forge an output line;
JSON output is strict (never a bare ``NaN``).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from cxr import CLASS_NAMES
from cxr.common.images import ImageLimits
from cxr.config import InputConfig
from cxr.errors import CxrError, DataError
from cxr.files import dumps_json, write_bytes_atomic
from cxr.inference.dicom import dicom_intended_use, is_dicom
from cxr.inference.loading import LoadedModel, UnverifiedModel, load, load_image
from cxr.safe_text import printable

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".dcm", ".dicom"}


def expand(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Files as given; folders expanded (recursively, sorted) to their image and DICOM files.

    Args:
        paths: files and folders. A file is passed on whatever its suffix (and even if missing, so
            the error names it); in a folder only ``.jpg``, ``.jpeg``, ``.png``, ``.bmp``, ``.dcm``
            and ``.dicom`` files (any case) outside hidden folders are taken.

    Returns:
        An iterator of file paths, in the order given.
    """
    for item in paths:
        path = Path(item)
        if path.is_dir():
            yield from sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        else:
            yield path


def check_threshold(value: float) -> float:
    """A decision threshold: a finite number from 0 to 1.

    Args:
        value: the threshold on P(pneumonia).

    Returns:
        It, as a float.

    Raises:
        CxrError: not a number, not finite, or outside [0, 1].
    """
    try:
        cut = float(value)
    except (TypeError, ValueError):
        raise CxrError(f"threshold {printable(value)}: not a number; give a probability from 0 to 1") from None
    if not math.isfinite(cut) or not 0.0 <= cut <= 1.0:
        raise CxrError(f"threshold {printable(value)}: give a probability from 0 to 1, e.g. 0.5")
    return cut


def _gradcam_folder(gradcam_dir: str | Path) -> Path:
    """The Grad-CAM folder, created now so a bad one fails before the model is loaded."""
    folder = Path(gradcam_dir)
    if folder.exists() and not folder.is_dir():
        raise CxrError(f"--gradcam {printable(folder)}: exists and is not a folder; name a folder for the overlays")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CxrError(
            f"--gradcam {printable(folder)}: cannot create the folder ({exc.strerror or type(exc).__name__})"
        ) from None
    return folder


def _inputs(paths: Sequence[str | Path]) -> list[tuple[Path, str | None]]:
    """``(file, None)`` per file to predict and ``(folder, error)`` per given folder without one, in order.

    Raises:
        CxrError: no paths were given.
    """
    inputs: list[tuple[Path, str | None]] = []
    suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
    for item in paths:
        found = list(expand([item]))
        if not found:
            inputs.append((Path(item), f"{printable(item)}: no image files in this folder ({suffixes})"))
        inputs.extend((path, None) for path in found)
    if not inputs:
        raise CxrError("no image files or folders given")
    return inputs


def _load_model(
    model_path: str | Path | LoadedModel, allow_unverified: bool, limits: ImageLimits | None
) -> tuple[LoadedModel, InputConfig]:
    """The model (loaded unless it already is) and its decoding settings, under ``limits`` when given.

    Raises:
        UnverifiedModel: its file is not the one its card describes (and that is not allowed).
    """
    try:
        lm = model_path if isinstance(model_path, LoadedModel) else load(model_path, allow_unverified=allow_unverified)
    except UnverifiedModel as exc:
        raise UnverifiedModel(f"{exc} (--allow-unverified uses it anyway)") from None
    cfg = lm.input
    if limits is not None:
        cfg = cfg.model_copy(update={"max_image_pixels": limits.max_pixels, "max_image_bytes": limits.max_bytes})
    return lm, cfg


class _Output:
    """Where one ``cxr predict`` run writes: a line (or JSON object) per image on ``out``, a
    ``cxr: error: ...`` line per input that could not be predicted on ``err`` (``failures`` counts
    them), and the Grad-CAM overlays in ``folder`` (None: none)."""

    def __init__(self, out: TextIO | None, err: TextIO | None, as_json: bool, gradcam_dir: str | Path | None) -> None:
        self.out = out or sys.stdout  # looked up per call: callers may have redirected the streams
        self.err = err or sys.stderr
        self.as_json = as_json
        self.folder = _gradcam_folder(gradcam_dir) if gradcam_dir is not None else None
        self.failures = 0

    def error(self, message: str | None) -> None:
        """One input that could not be predicted."""
        self.failures += 1
        print(f"cxr: error: {message}", file=self.err)

    def errors(self, messages: Iterable[str | None]) -> int:
        """Inputs none of which can be predicted; how many failed."""
        for message in messages:
            self.error(message)
        return self.failures

    def prediction(self, path: Path, record: dict[str, Any], probability: float, outside: str | None) -> None:
        """One image's record as JSON, or the notebook's line."""
        if self.as_json:
            print(dumps_json(record), file=self.out)
            return
        label = record["label"]
        mark = f"  (outside intended use: {outside})" if outside is not None else ""
        if label == OUT_OF_DOMAIN:
            why = f"unlike the training films (domain score {record['ood_score']:.2f} > 1)"
            print(f"{printable(path)}: prediction: {label}: {why}; no verdict{mark}", file=self.out)
        else:
            print(f"{printable(path)}: prediction: {label}  P(Pneumonia): {probability:.4f}{mark}", file=self.out)


class _Batches:
    """Images decoded one by one, scored ``batch_size`` at a time, and written in input order."""

    def __init__(
        self,
        lm: LoadedModel,
        cut: float,
        cut_source: str,
        cfg: InputConfig,
        output: _Output,
        batch_size: int,
        allow_outside_intended_use: bool,
    ) -> None:
        self.lm = lm
        self.cut = cut
        self.cut_source = cut_source
        self.cfg = cfg
        self.output = output
        self.batch_size = batch_size
        self.allow_outside = allow_outside_intended_use
        self.claimed = lm.card.model_sha256
        self.pending: list[tuple[Path, np.ndarray, str | None]] = []

    def predict(self, inputs: list[tuple[Path, str | None]]) -> int:
        """Decode and score every input (a bad one is an error line); the number that failed."""
        for path, error in inputs:
            try:
                image = load_image(path, self.cfg, self.allow_outside) if error is None else None
            except DataError as exc:
                error = str(exc)
            if error or image is None:
                self.flush()  # keep the output in input order around the error line
                self.output.error(error)
                self.output.err.flush()
                continue
            outside = dicom_intended_use(path) if self.allow_outside and is_dicom(path) else None
            self.pending.append((path, image, outside))
            if len(self.pending) >= self.batch_size:
                self.flush()
        self.flush()
        return self.output.failures

    def flush(self) -> None:
        """Score the images waiting, in one model call, and write their records."""
        if not self.pending:
            return
        probabilities, domain_scores = self.lm.score(np.stack([image for _, image, _ in self.pending]), self.batch_size)
        for i, ((path, image, outside), probability) in enumerate(zip(self.pending, probabilities, strict=True)):
            p = float(probability)
            if not math.isfinite(p):
                self.output.error(f"{printable(path)}: the model returned {p} for this image; retrain it")
                continue
            domain_score = None if domain_scores is None else float(domain_scores[i])
            self.output.prediction(path, self.record(path, image, outside, p, domain_score), p, outside)
        self.output.out.flush()
        self.pending.clear()

    def record(
        self, path: Path, image: np.ndarray, outside: str | None, p: float, domain_score: float | None
    ) -> dict[str, Any]:
        """``cxr predict --json``'s record of one image; its Grad-CAM overlay is written when asked for."""
        call = verdict(p, self.cut, domain_score, self.allow_outside)
        record: dict[str, Any] = {
            "path": _json_path(path),
            **call,
            "threshold": self.cut,
            "threshold_source": self.cut_source,
            "model_sha256": self.lm.sha256 or None,
            "card_model_sha256": self.claimed if isinstance(self.claimed, str) else None,
            "verified_model": self.lm.verified,
            "intended_use": outside is None,
        }
        if outside is not None:
            record["outside_intended_use"] = outside
        if self.output.folder is not None:
            record["gradcam"] = _write_overlay(self.lm, image, path, self.output.folder, call["label"], p)
        return record


def predict(
    model_path: str | Path | LoadedModel,
    paths: Sequence[str | Path],
    threshold: float | None = None,
    gradcam_dir: str | Path | None = None,
    as_json: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
    batch_size: int = 32,
    allow_unverified: bool = False,
    limits: ImageLimits | None = None,
    allow_outside_intended_use: bool = False,
) -> int:
    """Predict every file; return the number of inputs that could not be predicted.

    Images are decoded one by one (a bad file is reported and skipped) and scored in batches, so
    many images cost little more than one model call per ``batch_size``. Output keeps input order.

    Args:
        model_path: a ``.keras`` file with its card, or a model already loaded.
        paths: image and DICOM files, or folders of them (see :func:`expand`). A folder with no
            image file counts as one failure (one error line naming it).
        threshold: the P(pneumonia) at or above which an image is called PNEUMONIA (a number from
            0 to 1); None uses the model's shipped threshold
            (:func:`cxr.common.thresholds.model_threshold`).
        gradcam_dir: when set, a Grad-CAM overlay PNG per image is written there
            (``<stem>-<8 hex of the path's hash>.gradcam.png``).
        as_json: one JSON object per image (path, label, probability, threshold and its source,
            the model file's sha256, its card's ``model_sha256``, whether they agree, Grad-CAM file)
            instead of the notebook's ``<path>: prediction: <LABEL>  P(Pneumonia): <p>`` line.
        out: where predictions go (default: ``sys.stdout`` at call time).
        err: where ``cxr: error: ...`` lines for bad files go (default: ``sys.stderr``).
        batch_size: images per model call.
        allow_unverified: use a model file whose sha256 is not its card's (a warning line) instead
            of refusing it.
        limits: the decode caps (default: ``input.max_image_pixels`` / ``max_image_bytes`` defaults).
        allow_outside_intended_use: score a DICOM whose metadata says it is not a chest radiograph
            (CT, MR, lateral...) instead of refusing it; its record says ``intended_use: false``
            and why.

    Returns:
        The number of files (and empty folders) that could not be predicted (0 when all were).

    Raises:
        CxrError: a bad threshold or Grad-CAM folder; the model file or its card is missing,
            damaged or does not match (see :func:`cxr.inference.loading.load`).
    """
    cut_given = None if threshold is None else check_threshold(threshold)
    output = _Output(out, err, as_json, gradcam_dir)  # the Grad-CAM folder is created now, before the model loads
    inputs = _inputs(paths)
    if all(error for _, error in inputs):  # nothing to predict: no model to load
        return output.errors(error for _, error in inputs)
    lm, cfg = _load_model(model_path, allow_unverified, limits)
    cut, cut_source = lm.threshold(cut_given)
    batches = _Batches(lm, cut, cut_source, cfg, output, batch_size, allow_outside_intended_use)
    return batches.predict(inputs)


OUT_OF_DOMAIN = "OUT_OF_DOMAIN"


def verdict(probability: float, threshold: float, domain_score: float | None, allow_outside: bool) -> dict[str, Any]:
    """The label, probability and domain fields of one record (``cxr predict --json`` and ``cxr serve``).

    An image whose domain score is above 1 (unlike the training films, :mod:`cxr.common.domain`)
    gets no NORMAL/PNEUMONIA verdict: label ``OUT_OF_DOMAIN``, probability null. With
    ``allow_outside`` it gets its verdict, still marked ``in_domain: false``. A model without a
    content check says ``in_domain: null``.

    Args:
        probability: P(pneumonia).
        threshold: the decision threshold.
        domain_score: the image's domain score, or None when the model has no content check.
        allow_outside: restore the verdict of an out-of-domain image.

    Returns:
        ``{label, probability, ood_score, in_domain}``.
    """
    in_domain = None if domain_score is None else bool(domain_score <= 1.0)
    call: dict[str, Any] = {
        "label": CLASS_NAMES[int(probability >= threshold)],
        "probability": round(probability, 6),
        "ood_score": None if domain_score is None else round(domain_score, 4),
        "in_domain": in_domain,
    }
    if in_domain is False and not allow_outside:
        call.update(label=OUT_OF_DOMAIN, probability=None)
    return call


def _json_path(path: Path) -> str:
    """The path for JSON: as given, or with its non-UTF-8 bytes as ``\\xNN`` (no lone surrogates in the output)."""
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", errors="backslashreplace")
    return text


def _write_overlay(lm: LoadedModel, image: np.ndarray, path: Path, folder: Path, label: str, probability: float) -> str:
    from cxr.common.plots import plt
    from cxr.inference.gradcam import gradcam, overlay

    cam, _ = gradcam(lm.model, image[None].astype(np.float32) / 255.0)
    # the stem alone would collide for x/scan.png and y/scan.dcm; a hostile stem (control characters,
    # 255 bytes) must not become a file name
    tag = hashlib.sha256(str(path.resolve()).encode(errors="surrogateescape")).hexdigest()[:8]
    stem = re.sub(r"[^\w.-]", "_", path.stem)[:80]
    target = folder / f"{stem}-{tag}.gradcam.png"
    fig, ax = plt.subplots(figsize=(4, 4.2))
    ax.imshow(overlay(image.astype(np.float32) / 255.0, cam[0]))
    ax.axis("off")
    ax.set_title(f"prediction: {label}  P(Pneumonia): {probability:.4f}", fontsize=9)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)
    # a temporary file renamed over the name: a link planted there is replaced, never written through
    write_bytes_atomic(target, png.getvalue())
    return target.as_posix()
