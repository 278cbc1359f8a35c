"""``cxr predict``: label and P(pneumonia) for outside images (JPEG, PNG, DICOM), one per line.

Human output keeps the notebook's format (``prediction: PNEUMONIA  P(Pneumonia): 0.9731``);
``--json`` prints one JSON object per image. A bad file gets one line on stderr naming it, the
others are still predicted, and the exit status is non-zero.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from cxr import CLASS_NAMES
from cxr.inference.loading import LoadedModel, iter_images, load, predict_images, shipped_threshold

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


def predict(
    model_path: str | Path | LoadedModel,
    paths: Sequence[str | Path],
    threshold: float | None = None,
    gradcam_dir: str | Path | None = None,
    as_json: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
    batch_size: int = 32,
) -> int:
    """Predict every file; return the number of files that could not be predicted.

    Images are decoded one by one (a bad file is reported and skipped) and scored in batches, so
    many images cost little more than one model call per ``batch_size``. Output keeps input order.

    Args:
        model_path: a ``.keras`` file with its card, or a model already loaded.
        paths: image and DICOM files, or folders of them (see :func:`expand`).
        threshold: the P(pneumonia) at or above which an image is called PNEUMONIA; None uses the
            model's shipped threshold (:func:`cxr.inference.loading.shipped_threshold`).
        gradcam_dir: when set, a Grad-CAM overlay PNG per image is written there
            (``<stem>-<8 hex of the path's hash>.gradcam.png``).
        as_json: one JSON object per image (path, label, probability, threshold and its source,
            model sha256, whether the model is verified, Grad-CAM file) instead of the notebook's
            ``<path>: prediction: <LABEL>  P(Pneumonia): <p>`` line.
        out: where predictions go (default: ``sys.stdout`` at call time).
        err: where ``cxr: error: ...`` lines for bad files go (default: ``sys.stderr``).
        batch_size: images per model call.

    Returns:
        The number of files that could not be read (0 when every file was predicted).

    Raises:
        CxrError: the model file or its card is missing or cannot be loaded.
    """
    out = out or sys.stdout  # looked up per call: callers may have redirected the streams
    err = err or sys.stderr
    lm = model_path if isinstance(model_path, LoadedModel) else load(model_path)
    if threshold is not None:
        cut, cut_source = float(threshold), "--threshold"
    else:
        cut, cut_source = shipped_threshold(lm)
    failures = 0
    pending: list[tuple[Path, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        probabilities = predict_images(lm.model, np.stack([image for _, image in pending]), batch_size)
        for (path, image), probability in zip(pending, probabilities, strict=True):
            label = CLASS_NAMES[int(probability >= cut)]
            record: dict[str, Any] = {
                "path": str(path),
                "label": label,
                "probability": round(float(probability), 6),
                "threshold": cut,
                "threshold_source": cut_source,
                "model_sha256": lm.card.get("model_sha256"),
                "verified_model": lm.verified,
            }
            if gradcam_dir is not None:
                record["gradcam"] = _write_overlay(lm, image, path, Path(gradcam_dir), label, float(probability))
            if as_json:
                print(json.dumps(record), file=out)
            else:
                print(f"{path}: prediction: {label}  P(Pneumonia): {probability:.4f}", file=out)
        out.flush()
        pending.clear()

    for path, image, error in iter_images(list(expand(paths)), lm.input):
        if error or image is None:
            flush()  # keep the output in input order around the error line
            failures += 1
            print(f"cxr: error: {error}", file=err)
            continue
        pending.append((path, image))
        if len(pending) >= batch_size:
            flush()
    flush()
    return failures


def _write_overlay(lm: Any, image: np.ndarray, path: Path, folder: Path, label: str, probability: float) -> str:
    from cxr.evaluation.gradcam import gradcam, overlay
    from cxr.reporting.plots import plt

    cam, _ = gradcam(lm.model, image[None].astype(np.float32) / 255.0)
    folder.mkdir(parents=True, exist_ok=True)
    # the stem alone would collide for x/scan.png and y/scan.dcm
    tag = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
    target = folder / f"{path.stem}-{tag}.gradcam.png"
    fig, ax = plt.subplots(figsize=(4, 4.2))
    ax.imshow(overlay(image.astype(np.float32) / 255.0, cam[0]))
    ax.axis("off")
    ax.set_title(f"prediction: {label}  P(Pneumonia): {probability:.4f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(target, dpi=90, metadata={"Software": None})
    plt.close(fig)
    return target.as_posix()
