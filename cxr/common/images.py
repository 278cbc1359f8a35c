"""Decode-check one image file: the manifest's source of truth for size, channels and validity.

Every file is fully decoded (not just its header), so truncated JPEGs are caught here rather than
mid-epoch. Only formats the training input pipeline can decode are accepted.

Decoding costs memory in proportion to the pixels a header announces, not to the file's size (a
514 KB PNG can announce 23000 × 23000 pixels: 1.6 GB decoded), so nothing is decoded before two
caps are checked (:class:`ImageLimits`, ``input.max_image_pixels`` and ``input.max_image_bytes``):
the file's size, from ``stat``, before a byte is read, and the pixel count, from the header. The
same checks guard ``prepare`` (an over-cap file is excluded with its reason), the training input
pipeline and ``cxr predict``. Pillow's own decompression-bomb guard (``PIL.Image.MAX_IMAGE_PIXELS``)
is set to the same cap, and its warning is an error.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageFile

from cxr.config import InputConfig
from cxr.errors import DataError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never silently padded
# Pillow warns between MAX_IMAGE_PIXELS and twice that, and raises above; here both refuse.
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)

# What tf.io.decode_image reads as a single frame. MPO is a JPEG with an extra preview frame.
SUPPORTED_FORMATS = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "BMP": "bmp"}
_CHANNELS = {"1": 1, "L": 1, "I;16": 1, "I;16B": 1, "I": 1, "LA": 2, "P": 3, "RGB": 3, "RGBA": 4}


class ImageRefused(DataError):
    """A file refused before it is decoded; the message is a short reason, without the path."""


class OverCap(ImageRefused):
    """A file refused because decoding it would pass a cap (``input.max_image_pixels`` / ``max_image_bytes``)."""


class NotAFilm(ImageRefused):
    """An image whose shape no chest film has: a side under :data:`MIN_SIDE` pixels, or a strip."""


CMYK_REFUSED = "CMYK JPEG is not supported (convert it to grayscale or RGB)"

# A chest film is neither a dot nor a strip. The smallest images this pipeline reads are
# PneumoniaMNIST's 28 × 28; radiographs are at most about 1:2.5 (Kermany's extremes are near 1:2.2).
MIN_SIDE = 16
MAX_ASPECT = 4.0


@dataclass(frozen=True)
class ImageLimits:
    """The most an image may cost to decode: pixels (width × height × frames) and file bytes.

    The defaults (``input.max_image_pixels`` = 50 megapixels, ``input.max_image_bytes`` = 200 MB,
    kept in :class:`cxr.config.InputConfig`) fit the largest chest films with room to spare: a
    flat-panel DICOM of 4300 × 4300 pixels is 18.5 megapixels (37 MB uncompressed at 16 bits), the
    Kermany JPEGs are at most about 2900 × 2700 (7.8 megapixels, a few MB). 200 MB holds 50
    megapixels uncompressed at 4 bytes each, so the byte cap never refuses an image the pixel cap
    accepts; it catches padded, appended or sparse files.
    """

    max_pixels: int
    max_bytes: int

    @classmethod
    def of(cls, cfg: InputConfig | None = None) -> ImageLimits:
        """The caps of an ``input`` section.

        Args:
            cfg: the ``input`` section, or None for the defaults.

        Returns:
            The caps.
        """
        section = cfg or InputConfig()
        return cls(section.max_image_pixels, section.max_image_bytes)


@dataclass(frozen=True)
class Header:
    """What an image file's header says, read without decoding its pixels."""

    format: str  # Pillow's name: JPEG, MPO, PNG, BMP...
    mode: str  # Pillow's mode: L, RGB, I;16...
    width: int
    height: int


def _size(n: int) -> str:
    """``3,221,225,472 bytes (3.22 GB)``: exact, and readable."""
    return f"{n:,} bytes ({n / 1e9:.3g} GB)" if n >= 1e9 else f"{n:,} bytes ({n / 1e6:.3g} MB)"


def _byte_cap(limits: ImageLimits) -> str:
    return f"the {limits.max_bytes / 1e6:g} MB cap (input.max_image_bytes={limits.max_bytes})"


def _pixel_cap(limits: ImageLimits) -> str:
    return f"the {limits.max_pixels / 1e6:g}-megapixel cap (input.max_image_pixels={limits.max_pixels})"


def check_bytes(path: str | Path, limits: ImageLimits) -> int:
    """The file's size, from ``stat`` (nothing is read); refused above ``limits.max_bytes``.

    Args:
        path: the file.
        limits: the caps.

    Returns:
        Its size in bytes.

    Raises:
        OverCap: the file is larger than the cap.
        OSError: the file cannot be examined.
    """
    size = os.stat(path).st_size
    if size > limits.max_bytes:
        raise OverCap(f"file of {_size(size)} is over {_byte_cap(limits)}; not read")
    return size


def check_pixels(width: int, height: int, limits: ImageLimits, frames: int = 1) -> None:
    """Refuse an image whose header announces more than ``limits.max_pixels`` pixels.

    Args:
        width: columns, from the header.
        height: rows, from the header.
        limits: the caps.
        frames: frames in the file (DICOM), each decoded.

    Raises:
        OverCap: the image is over the cap.
    """
    pixels = int(width) * int(height) * max(int(frames), 1)
    if pixels > limits.max_pixels:
        shape = f"{width} × {height}" + (f" × {frames} frames" if frames > 1 else "")
        raise OverCap(f"{shape} = {pixels:,} pixels, over {_pixel_cap(limits)}; not decoded")


def check_shape(width: int, height: int) -> None:
    """Refuse a shape no chest film has (checked after the format: an unsupported file says so first).

    Raises:
        NotAFilm: a side is under :data:`MIN_SIDE` pixels, or one side is over :data:`MAX_ASPECT`
            times the other.
    """
    short, long = sorted((int(width), int(height)))
    if short < MIN_SIDE:
        raise NotAFilm(f"{width} × {height} pixels: a side under {MIN_SIDE} px is not a chest film; not decoded")
    if long > MAX_ASPECT * short:
        raise NotAFilm(
            f"{width} × {height} pixels: a {long / short:.3g}:1 strip, beyond the {MAX_ASPECT:g}:1 of any chest "
            "film; not decoded"
        )


def read_header(path: str | Path, limits: ImageLimits) -> Header:
    """Format, mode and size from the header (Pillow reads no pixel data), with the pixel cap applied.

    Args:
        path: the image file.
        limits: the caps; ``PIL.Image.MAX_IMAGE_PIXELS`` is set to ``limits.max_pixels``.

    Returns:
        The :class:`Header`.

    Raises:
        ImageRefused: not an image Pillow knows (:class:`OverCap`: over the pixel cap).
        OSError: the file cannot be read.
    """
    Image.MAX_IMAGE_PIXELS = limits.max_pixels
    try:
        with Image.open(path) as image:
            header = Header(image.format or "", image.mode, *image.size)
    except Image.UnidentifiedImageError:
        raise ImageRefused("not an image (unknown format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise OverCap(f"{pixels}, over {_pixel_cap(limits)}; not decoded") from None
    except OSError as exc:
        if exc.errno is not None:  # the file system's error (permission, vanished file): the caller's to report
            raise
        reason = str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__  # Pillow's: 'Truncated File Read'
        raise ImageRefused(f"truncated or corrupt image ({reason})") from None
    except (SyntaxError, ValueError) as exc:  # a header Pillow recognised but could not parse
        raise ImageRefused(f"truncated or corrupt image ({str(exc).splitlines()[0][:80]})") from None
    check_pixels(header.width, header.height, limits)
    return header


def probe(path: str | Path, limits: ImageLimits | None = None) -> dict[str, Any]:
    """Return ``{sha256, bytes, width, height, channels, format}`` or ``{error: reason}``.

    Never raises for bad files: the reason is a short phrase for the data-quality report. The
    file's size and its header are checked against the caps before any byte of pixel data is read.

    Args:
        path: the image file; read whole and decoded whole once it passes the caps.
        limits: the decode caps (default: ``input.max_image_pixels`` / ``max_image_bytes`` defaults).

    Returns:
        The file's sha256 and size in bytes, its width and height in pixels, its channel count (1
        for grayscale, 3 for RGB and palette images, 2/4 with alpha) and its format as the input
        pipeline names it (``jpeg``, ``png`` or ``bmp``). For a bad file: ``error``, plus the
        size (and the sha256 when the bytes were read).
    """
    limits = limits or ImageLimits.of()
    path = Path(path)
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        return {"error": f"unreadable file ({exc.strerror or type(exc).__name__})"}
    if not size:
        return {"bytes": 0, "error": "empty file (0 bytes)"}
    problem = _header_problem(path, limits)
    if problem:
        return {"bytes": size, "error": problem}
    try:
        data = path.read_bytes()
    except OSError as exc:
        return {"bytes": size, "error": f"unreadable file ({exc.strerror or type(exc).__name__})"}
    result: dict[str, Any] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    if len(data) > limits.max_bytes:  # it grew between stat and read
        return {**result, "error": f"file grew past {_byte_cap(limits)} while it was read"}
    return {**result, **_decode_whole(data, limits)}


def _header_problem(path: Path, limits: ImageLimits) -> str | None:
    """Why :func:`probe` refuses a file before reading its pixel data (its size, its header's
    format, mode and pixels), or None."""
    try:
        check_bytes(path, limits)
        header = read_header(path, limits)
    except ImageRefused as exc:
        return str(exc)
    except OSError as exc:
        return f"unreadable file ({exc.strerror or type(exc).__name__})"
    if header.format not in SUPPORTED_FORMATS:
        return f"unsupported format {header.format} (use JPEG or PNG)"
    if header.mode == "CMYK":
        return CMYK_REFUSED
    try:
        check_shape(header.width, header.height)
    except NotAFilm as exc:
        return str(exc)
    return None


def _decode_whole(data: bytes, limits: ImageLimits) -> dict[str, Any]:
    """Decode the very bytes that were hashed: ``{width, height, channels, format}`` or ``{error: reason}``."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, mode, (width, height) = image.format, image.mode, image.size
            if fmt not in SUPPORTED_FORMATS:
                return {"error": f"unsupported format {fmt} (use JPEG or PNG)"}
            check_pixels(width, height, limits)
            check_shape(width, height)
            image.load()
    except ImageRefused as exc:
        return {"error": str(exc)}
    except Image.UnidentifiedImageError:
        return {"error": "not an image (unknown format)"}
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return {"error": f"over {_pixel_cap(limits)}"}
    except (OSError, SyntaxError, ValueError) as exc:
        return {"error": f"truncated or corrupt image ({str(exc).splitlines()[0][:80]})"}
    return {"width": width, "height": height, "channels": _CHANNELS.get(mode, 3), "format": SUPPORTED_FORMATS[fmt]}


def check_image(path: str | Path, limits: ImageLimits) -> Header:
    """The checks made before a JPEG/PNG/BMP is decoded: size, header, format, pixels.

    Args:
        path: the image file.
        limits: the caps.

    Returns:
        Its :class:`Header`.

    Raises:
        ImageRefused: not an image, or a format the input pipeline does not decode (:class:`OverCap`:
            over a cap).
        OSError: the file cannot be read.
    """
    if not check_bytes(path, limits):
        raise ImageRefused("empty file (0 bytes)")
    header = read_header(path, limits)
    if header.format not in SUPPORTED_FORMATS:
        raise ImageRefused(f"unsupported format {header.format} (use JPEG, PNG or BMP)")
    if header.mode == "CMYK":  # prepare excludes them too (probe): one behaviour everywhere
        raise ImageRefused(CMYK_REFUSED)
    check_shape(header.width, header.height)
    return header
