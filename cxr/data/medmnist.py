"""PneumoniaMNIST (MedMNIST v2) as PNG files in Kaggle layout, so later steps are source-agnostic."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from cxr import CLASS_NAMES, SPLITS
from cxr.errors import DataError, FetchError

log = logging.getLogger(__name__)

SIZES = (28, 64, 128, 224)


def download_npz(size: int, cache_dir: Path) -> Path:
    """Fetch PneumoniaMNIST at ``size`` px through the ``medmnist`` package (needs internet).

    Args:
        size: the image side in pixels: 28, 64, 128 or 224.
        cache_dir: where ``medmnist`` downloads to; an ``.npz`` already there is reused by it.

    Returns:
        The ``.npz`` file: ``pneumoniamnist.npz`` for 28 px, ``pneumoniamnist_<size>.npz`` otherwise.

    Raises:
        FetchError: an unsupported size, the ``medmnist`` package missing, or the download failing.
    """
    if size not in SIZES:
        raise FetchError(f"data.medmnist_size={size}: PneumoniaMNIST comes in sizes {SIZES}")
    try:
        import medmnist
    except ImportError as exc:
        raise FetchError(
            "data.npz is empty and the medmnist package is not installed: set data.npz to a local "
            "pneumoniamnist .npz, or pip install 'cxr-pipeline[medmnist]'"
        ) from exc
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        for split in ("train", "val", "test"):
            medmnist.PneumoniaMNIST(split=split, download=True, size=size, root=str(cache_dir))
    except Exception as exc:
        raise FetchError(
            f"could not download PneumoniaMNIST ({type(exc).__name__}): no internet? set data.npz "
            "to a local .npz instead"
        ) from exc
    name = "pneumoniamnist.npz" if size == 28 else f"pneumoniamnist_{size}.npz"
    return cache_dir / name


def _split_arrays(npz: np.lib.npyio.NpzFile, split: str, path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    key_x, key_y = f"{split}_images", f"{split}_labels"
    if key_x not in npz.files and key_y not in npz.files:
        return None
    if key_x not in npz.files or key_y not in npz.files:
        raise DataError(f"{path}: has only one of {key_x}/{key_y}; not a MedMNIST file")
    images, labels = npz[key_x], npz[key_y].reshape(-1)
    if images.ndim not in (3, 4) or len(images) != len(labels):
        raise DataError(f"{path}: {key_x} has shape {images.shape} for {len(labels)} labels; expected (N,H,W[,C])")
    if not np.isin(labels, (0, 1)).all():
        raise DataError(f"{path}: {key_y} holds labels other than 0 (normal) and 1 (pneumonia)")
    return images, labels


def materialise_npz(path: str | Path, dest: str | Path) -> dict[str, int]:
    """Write every image of a MedMNIST ``.npz`` as ``dest/<split>/<CLASS>/pneumoniamnist_<split>_<i>.png``.

    ``<i>`` is the image's index in its split, zero-padded to 5 digits. Non-uint8 pixels are clipped
    to 0–255 and cast, so the file is expected to hold 0–255 values as MedMNIST ships them.

    Args:
        path: the ``.npz`` with ``<split>_images`` ((N, H, W) or (N, H, W, C)) and ``<split>_labels``
            (0 normal, 1 pneumonia) for ``train`` and, optionally, ``val`` and ``test`` (the shared
            file has only train and val).
        dest: the Kaggle-layout folder to write into.

    Returns:
        The number of images written per split present.

    Raises:
        FetchError: ``path`` is not a file.
        DataError: not a readable ``.npz``, no train split, a split with only images or only
            labels, mismatched shapes or counts, or labels other than 0 and 1.
    """
    path, dest = Path(path), Path(dest)
    if not path.is_file():
        raise FetchError(f"data.npz={path}: file not found")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from exc
    counts: dict[str, int] = {}
    with npz:
        for split in SPLITS:
            arrays = _split_arrays(npz, split, path)
            if arrays is None:
                continue
            images, labels = arrays
            if images.dtype != np.uint8:
                images = np.clip(images, 0, 255).astype(np.uint8)
            for class_name in CLASS_NAMES:
                (dest / split / class_name).mkdir(parents=True, exist_ok=True)
            for i, (image, label) in enumerate(zip(images, labels, strict=True)):
                name = f"pneumoniamnist_{split}_{i:05d}.png"
                Image.fromarray(np.squeeze(image)).save(dest / split / CLASS_NAMES[int(label)] / name)
            counts[split] = len(images)
    if "train" not in counts:
        raise DataError(f"{path}: no train_images/train_labels; not a MedMNIST file")
    log.info("materialised PneumoniaMNIST %s as PNG: %s", path.name, counts)
    return counts
