"""Read a chest radiograph from DICOM into the 8-bit image the models were trained on.

Order of operations, as the DICOM standard defines them: stored values → Modality LUT (Rescale Slope /
Intercept) → VOI LUT or Window Center/Width when the file has one → invert MONOCHROME1 (where
bright means *less* attenuation) → clip to mean ± 2.5 std → rescale to 0–255 uint8 → gray to
3 channels. Multi-frame, pixel-less and non-image objects are refused with one clear line; a
compressed transfer syntax decodes through pydicom's plugins or fails naming the plugin.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cxr.errors import DataError

_PLUGIN_HINT = (
    "install a pydicom decoder for it: pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg "
    "(JPEG, JPEG-LS, JPEG 2000) or python-gdcm"
)


def is_dicom(path: str | Path) -> bool:
    """DICOM Part 10 files carry 'DICM' at byte 128; also accept the .dcm suffix.

    Args:
        path: the file.

    Returns:
        True for a ``.dcm`` name (any case) or a file with the ``DICM`` marker; False otherwise,
        including for a file that cannot be opened.
    """
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def read_dicom(path: str | Path, clip_std: float = 2.5) -> np.ndarray:
    """(H, W, 3) uint8 image from a single-frame grayscale DICOM.

    Grayscale pixels go through the Modality LUT, then the VOI LUT or window when the file has one,
    and MONOCHROME1 is inverted; RGB/YBR secondary captures are reduced to luminance instead. The
    result is stretched by :func:`to_uint8`.

    Args:
        path: the DICOM file.
        clip_std: intensities beyond mean ± this many standard deviations are clipped before
            rescaling.

    Returns:
        (H, W, 3) uint8, the gray image repeated in three channels.

    Raises:
        DataError: not a readable DICOM file, no pixel data, several frames, an unsupported
            photometric interpretation or pixel shape, or pixel data that cannot be decoded (naming
            the decoder plugin to install for a compressed transfer syntax).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: not a readable DICOM file ({type(exc).__name__})") from exc
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        kind = getattr(ds, "Modality", None) or getattr(ds, "SOPClassUID", "unknown")
        raise DataError(f"{path}: DICOM object without pixel data ({kind}); not an image")
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DataError(f"{path}: multi-frame DICOM ({frames} frames); export the radiograph as one frame")
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    colour = ("RGB", "YBR_FULL", "YBR_FULL_422")
    if not photometric.startswith("MONOCHROME") and photometric not in colour:
        raise DataError(f"{path}: unsupported photometric interpretation {photometric}")
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises several types for missing decoders
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        if syntax is not None and getattr(syntax, "is_compressed", False):
            raise DataError(f"{path}: cannot decode compressed transfer syntax {name}; {_PLUGIN_HINT}") from exc
        raise DataError(f"{path}: unreadable pixel data ({type(exc).__name__}: {exc})") from exc
    if pixels.ndim == 3 and pixels.shape[-1] == 3:  # colour secondary capture: use luminance
        gray = pixels.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    elif pixels.ndim == 2:
        values = apply_modality_lut(pixels, ds)
        has_voi = "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)
        gray = np.asarray(apply_voi_lut(values, ds) if has_voi else values, dtype=np.float64)
        if photometric == "MONOCHROME1":
            gray = gray.max() + gray.min() - gray
    else:
        raise DataError(f"{path}: unexpected pixel array shape {pixels.shape}")
    return to_uint8(gray, clip_std)


def to_uint8(gray: np.ndarray, clip_std: float = 2.5) -> np.ndarray:
    """Clip to mean ± ``clip_std`` std, rescale to 0–255, stack to 3 channels (the notebook's display step).

    The clip range never reaches beyond the image's own minimum and maximum.

    Args:
        gray: (H, W) intensities in any unit.
        clip_std: how many standard deviations around the mean are kept.

    Returns:
        (H, W, 3) uint8; all zeros for a blank (constant) image.
    """
    gray = np.asarray(gray, dtype=np.float64)
    mean, std = float(gray.mean()), float(gray.std())
    low, high = mean - clip_std * std, mean + clip_std * std
    low, high = max(low, float(gray.min())), min(high, float(gray.max()))
    if high <= low:  # a blank image: nothing to stretch
        return np.zeros((*gray.shape, 3), np.uint8)
    scaled = (np.clip(gray, low, high) - low) / (high - low) * 255.0
    image = np.round(scaled).astype(np.uint8)
    return np.repeat(image[..., None], 3, axis=-1)
