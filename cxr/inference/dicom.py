"""Read a chest radiograph from DICOM into the 8-bit image the models were trained on.

Order of operations, as the DICOM standard defines them: stored values → Modality LUT (Rescale Slope /
Intercept) → VOI LUT or Window Center/Width when the file has one → invert MONOCHROME1 (where
bright means *less* attenuation) → clip to mean ± 2.5 std → rescale to 0–255 uint8 → gray to
3 channels. Multi-frame, pixel-less and non-image objects are refused with one clear line; a
compressed transfer syntax decodes through pydicom's plugins or fails naming the plugin.

Before any pixel is decoded, the fields that say what the image *is* are checked against the
intended use, paediatric chest radiographs (:func:`intended_use_problem`): ``Modality`` CR or DX,
``BodyPartExamined`` CHEST when present, ``PhotometricInterpretation`` MONOCHROME1/2, one frame, and
``ViewPosition`` AP, PA or absent. Anything else — a CT slice, an MR, an ultrasound, a dose grid, a
lateral film — is refused with one line naming the field, its value and what is expected, unless
the caller explicitly allows images outside the intended use (they are then scored and marked).
Fields are read through pydicom's keyword API (its data dictionary), not tag numbers.

pydicom reports a damaged file twice, as a Python warning (two lines on stderr) and on its
``pydicom`` logger. The warnings are ignored and the log messages collected per thread: a file that
cannot be read gets one line saying what pydicom found; one that can is read, its complaints
logged at DEBUG.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cxr.common.images import ImageLimits, ImageRefused, check_bytes, check_pixels, check_shape
from cxr.errors import DataError
from cxr.runtime import native_stderr
from cxr.safe_text import printable

if TYPE_CHECKING:  # pydicom is imported where a DICOM is read
    from pydicom.dataset import Dataset

log = logging.getLogger(__name__)
warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\..*)?$")


class _Complaints(logging.Handler):
    """Collects the ``pydicom`` logger's warnings of the current thread while :func:`_complaints` is open."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        found = getattr(self.local, "found", None)
        if found is not None:
            found.append(printable(record.getMessage().splitlines()[0] if record.getMessage() else ""))


_COMPLAINTS = _Complaints()
logging.getLogger("pydicom").addHandler(_COMPLAINTS)


@contextlib.contextmanager
def _complaints() -> Iterator[list[str]]:
    """What pydicom logs about the file read in the block (this thread only)."""
    found: list[str] = []
    _COMPLAINTS.local.found = found
    try:
        yield found
    finally:
        _COMPLAINTS.local.found = None


def _because(found: list[str], fallback: str) -> str:
    return found[0][:120] if found else fallback


_PLUGIN_HINT = (
    "install a pydicom decoder for it: pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg "
    "(JPEG, JPEG-LS, JPEG 2000) or python-gdcm"
)


class OutsideIntendedUse(DataError):
    """A DICOM file whose own metadata says it is not a chest radiograph (CT, MR, lateral...)."""


INTENDED_MODALITIES = ("CR", "DX")
INTENDED_VIEWS = ("AP", "PA")
_EXPECTS = "expects CR or DX chest radiographs, AP or PA"


def intended_use_problem(ds: Dataset) -> str | None:
    """Why a DICOM dataset is outside the intended use, from its metadata alone; None when it is not.

    Args:
        ds: a pydicom dataset (pixels need not be read).

    Returns:
        ``"<Keyword> <value>"`` for the first field that disagrees, or None.
    """
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality not in INTENDED_MODALITIES:
        return f"Modality {printable(modality or 'absent')}"
    body_part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if body_part and body_part != "CHEST":
        return f"BodyPartExamined {printable(body_part)}"
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return f"PhotometricInterpretation {printable(photometric)}"
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        return f"NumberOfFrames {frames}"
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    if view and view not in INTENDED_VIEWS:
        return f"ViewPosition {printable(view)}" + (" (a lateral film)" if view in ("LL", "RL", "LATERAL") else "")
    return None


def dicom_intended_use(path: str | Path) -> str | None:
    """:func:`intended_use_problem` of a DICOM file's header (no pixel data read); None when in use
    or unreadable (reading it reports that)."""
    import pydicom

    try:
        with _complaints():
            return intended_use_problem(pydicom.dcmread(path, stop_before_pixels=True))
    except Exception:  # an unreadable header is read_dicom's to report
        return None


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


def check_dicom_header(path: str | Path, limits: ImageLimits | None = None) -> None:
    """Check a DICOM file's size and its Rows × Columns × frames before any pixel data is read.

    Args:
        path: the DICOM file.
        limits: the decode caps (default: ``input.max_image_pixels`` / ``max_image_bytes`` defaults).

    Raises:
        DataError: over a cap, several frames, or not a readable DICOM header (naming the file).
    """
    import pydicom

    limits = limits or ImageLimits.of()
    shown = printable(path)
    try:
        check_bytes(path, limits)
        with _complaints() as found:
            head = pydicom.dcmread(path, stop_before_pixels=True)
            rows, columns = int(head.get("Rows") or 0), int(head.get("Columns") or 0)
            frames = int(head.get("NumberOfFrames") or 1)
    except ImageRefused as exc:
        raise DataError(f"{shown}: {exc}") from None
    except OSError as exc:
        raise DataError(f"{shown}: unreadable ({exc.strerror or type(exc).__name__})") from None
    except Exception as exc:  # a hostile header can fail pydicom's parser in many ways
        raise DataError(f"{shown}: not a readable DICOM file ({_because(found, type(exc).__name__)})") from None
    if frames > 1:
        raise DataError(f"{shown}: multi-frame DICOM ({frames} frames); export the radiograph as one frame")
    try:
        if rows or columns:  # an object without pixel data has neither: reading it says so
            check_pixels(columns, rows, limits)
    except ImageRefused as exc:
        raise DataError(f"{shown}: {exc}") from None


def read_dicom(
    path: str | Path,
    clip_std: float = 2.5,
    limits: ImageLimits | None = None,
    allow_outside_intended_use: bool = False,
) -> np.ndarray:
    """(H, W, 3) uint8 image from a single-frame grayscale DICOM.

    The file's size and its header's Rows × Columns are checked against the decode caps first
    (:func:`check_dicom_header`). Grayscale pixels go through the Modality LUT, then the VOI LUT or
    window when the file has one, and MONOCHROME1 is inverted; RGB/YBR secondary captures are
    reduced to luminance instead. The result is stretched by :func:`to_uint8`.

    Args:
        path: the DICOM file.
        clip_std: intensities beyond mean ± this many standard deviations are clipped before
            rescaling.
        limits: the decode caps (default: their defaults).
        allow_outside_intended_use: decode a file whose metadata says it is not a chest radiograph
            (CT, MR, colour, lateral...) instead of refusing it.

    Returns:
        (H, W, 3) uint8, the gray image repeated in three channels.

    Raises:
        OutsideIntendedUse: the metadata says the file is not a chest radiograph (unless allowed).
        DataError: over a cap, not a readable DICOM file, no pixel data, several frames, an
            unsupported photometric interpretation or pixel shape, or pixel data that cannot be
            decoded (naming the decoder plugin to install for a compressed transfer syntax).
    """
    path = Path(path)
    check_dicom_header(path, limits)
    shown = printable(path)
    ds = _read_dataset(path, shown)
    photometric = _check_content(ds, shown, allow_outside_intended_use)
    pixels = _pixel_array(ds, shown)
    gray = _to_gray(ds, pixels, photometric, shown)
    del pixels, ds  # a 50-megapixel film: keep one float64 copy alive, not three
    if not np.isfinite(gray).all():  # float pixel data, or a rescale that overflows
        raise DataError(f"{shown}: pixel values that are not finite numbers (NaN or infinity); not scored")
    return _stretch(gray, clip_std)


def _read_dataset(path: Path, shown: str) -> Dataset:
    """The parsed DICOM dataset, its pixels not yet decoded; pydicom's complaints logged at DEBUG.

    Raises:
        DataError: unreadable, not a readable DICOM file, or an object without pixel data.
    """
    import pydicom

    with _complaints() as found:
        try:
            ds = pydicom.dcmread(path)
        except OSError as exc:
            raise DataError(f"{shown}: unreadable ({exc.strerror or type(exc).__name__})") from None
        except Exception as exc:  # InvalidDicomError, ValueError, EOFError, struct.error... on hostile bytes
            raise DataError(f"{shown}: not a readable DICOM file ({_because(found, type(exc).__name__)})") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        if found:  # pydicom gave up on a damaged file, rather than read an object without pixels
            raise DataError(f"{shown}: not a readable DICOM file ({_because(found, 'damaged')})")
        kind = getattr(ds, "Modality", None) or getattr(ds, "SOPClassUID", "unknown")
        raise DataError(f"{shown}: DICOM object without pixel data ({printable(kind)}); not an image")
    for complaint in found:
        log.debug("%s: pydicom: %s", shown, complaint)
    return ds


def _check_content(ds: Dataset, shown: str, allow_outside_intended_use: bool) -> str:
    """The dataset's photometric interpretation, once its intended use, shape and photometric
    interpretation are checked (before any pixel is decoded).

    Raises:
        OutsideIntendedUse: the metadata says it is not a chest radiograph (unless allowed).
        DataError: a shape over a cap, or an unsupported photometric interpretation.
    """
    problem = intended_use_problem(ds)
    if problem and not allow_outside_intended_use:
        raise OutsideIntendedUse(f"{shown}: {problem}: outside intended use ({_EXPECTS})")
    try:  # after the intended use: "Modality CT" says more about a 16 × 16 dose grid than its size
        check_shape(int(ds.get("Columns") or 0), int(ds.get("Rows") or 0))
    except ImageRefused as exc:
        raise DataError(f"{shown}: {exc}") from None
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    colour = ("RGB", "YBR_FULL", "YBR_FULL_422")
    if not photometric.startswith("MONOCHROME") and photometric not in colour:
        raise DataError(f"{shown}: unsupported photometric interpretation {printable(photometric)}")
    return photometric


def _pixel_array(ds: Dataset, shown: str) -> np.ndarray:
    """The decoded pixels; what a native decoder printed is logged at DEBUG.

    Raises:
        DataError: the pixel data cannot be decoded (see :func:`_undecodable`).
    """
    try:  # decoders written in C (OpenJPEG, libjpeg) report on fd 2: captured, so a failure is one line
        with native_stderr(quiet_on=(Exception,)) as noise:
            pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises several types for missing decoders
        raise DataError(f"{shown}: {_undecodable(ds, exc, noise.lines())}") from None
    for line in noise.lines():
        if line.strip():
            log.debug("%s: decoder: %s", shown, printable(line.strip()))
    return pixels


def _to_gray(ds: Dataset, pixels: np.ndarray, photometric: str, shown: str) -> np.ndarray:
    """One float64 gray image, bright where attenuation is high: luminance of a colour capture, or
    the LUT stages (:func:`_grayscale`) with MONOCHROME1 inverted.

    Raises:
        DataError: an unexpected pixel array shape, or LUT attributes that cannot be applied.
    """
    if pixels.ndim == 3 and pixels.shape[-1] == 3:  # colour secondary capture: use luminance
        return pixels.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    if pixels.ndim == 2:
        gray = _grayscale(ds, pixels, shown)
        if photometric == "MONOCHROME1":
            np.subtract(gray.max() + gray.min(), gray, out=gray)
        return gray
    raise DataError(f"{shown}: unexpected pixel array shape {pixels.shape}")


# The attributes the Modality and VOI LUT stages compute with: each must hold finite numbers.
_LUT_NUMBERS = ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth")


def _lut_numbers_problem(ds: Dataset) -> str | None:
    """Why the rescale or window attributes cannot be applied (``WindowWidth 0``...), or None."""
    for keyword in _LUT_NUMBERS:
        if keyword not in ds:
            continue
        raw = ds[keyword].value
        if raw is None or raw == "":
            continue
        items = list(raw) if isinstance(raw, (list, tuple)) or type(raw).__name__ == "MultiValue" else [raw]
        shown = printable("\\".join(str(v) for v in items)[:40])
        try:
            numbers = [float(v) for v in items]
        except (TypeError, ValueError):
            return f"{keyword} {shown} is not a number"
        if not all(np.isfinite(numbers)):
            return f"{keyword} {shown} is not a finite number"
        if keyword == "WindowWidth" and min(numbers) < 1:
            return f"{keyword} {shown} is under 1 (a window must be at least one value wide)"
        if keyword == "RescaleSlope" and 0 in numbers:
            return f"{keyword} {shown} maps every pixel to one value"
    return None


def _grayscale(ds: Dataset, pixels: np.ndarray, shown: str) -> np.ndarray:
    """Stored values → Modality LUT → VOI LUT or window, as a new float64 array; DataError when the
    file's own attributes cannot be applied (a hostile file must not take its batch down with it)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    problem = _lut_numbers_problem(ds)
    if problem:
        raise DataError(f"{shown}: {problem}; the file cannot be displayed as its header says")
    try:
        with np.errstate(all="ignore"):  # overflow to infinity is checked after, on the result
            values = apply_modality_lut(pixels, ds)
            has_voi = "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)
            return np.array(apply_voi_lut(values, ds) if has_voi else values, dtype=np.float64)  # a new array
    except Exception as exc:  # a malformed LUT sequence fails pydicom in many ways
        reason = printable((str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[:120])
        raise DataError(f"{shown}: its modality or VOI LUT cannot be applied ({reason})") from None


def _undecodable(ds: Dataset, exc: Exception, native: list[str]) -> str:
    """Why the pixel data did not decode: a missing decoder (naming the plugin to install), a
    damaged compressed stream (with the decoder's own first complaint), or unreadable pixel data."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    name = getattr(syntax, "name", str(syntax))
    said = [line.strip() for line in native if line.strip()]
    reason = printable((said[0] if said else str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[:120])
    if syntax is not None and getattr(syntax, "is_compressed", False):
        from pydicom.pixels import get_decoder

        try:
            available = get_decoder(syntax).is_available
        except (NotImplementedError, ValueError):
            available = False
        if not available:
            return f"cannot decode compressed transfer syntax {name}; {_PLUGIN_HINT}"
        return f"its {name} pixel data could not be decoded ({reason}); the file may be damaged"
    return f"unreadable pixel data ({type(exc).__name__}: {reason})"


def to_uint8(gray: np.ndarray, clip_std: float = 2.5) -> np.ndarray:
    """Clip to mean ± ``clip_std`` std, rescale to 0–255, stack to 3 channels (the notebook's display step).

    The clip range never reaches beyond the image's own minimum and maximum.

    Args:
        gray: (H, W) intensities in any unit.
        clip_std: how many standard deviations around the mean are kept.

    Returns:
        (H, W, 3) uint8; all zeros for a blank (constant) image.
    """
    return _stretch(np.array(gray, dtype=np.float64), clip_std)


def _stretch(gray: np.ndarray, clip_std: float) -> np.ndarray:
    """:func:`to_uint8` on a float64 array it may overwrite (in place: no full-size temporaries)."""
    mean, std = float(gray.mean()), float(gray.std())
    low, high = mean - clip_std * std, mean + clip_std * std
    low, high = max(low, float(gray.min())), min(high, float(gray.max()))
    if high <= low:  # a blank image: nothing to stretch
        return np.zeros((*gray.shape, 3), np.uint8)
    np.clip(gray, low, high, out=gray)
    gray -= low
    gray /= high - low
    gray *= 255.0
    np.round(gray, out=gray)
    image = gray.astype(np.uint8)
    return np.repeat(image[..., None], 3, axis=-1)
