"""Decode-check one image file: the manifest's source of truth for size, channels and validity.

Every file is fully decoded (not just its header), so truncated JPEGs are caught here rather than
mid-epoch. Only formats the training input pipeline can decode are accepted.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

from PIL import Image, ImageFile

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never silently padded

# What tf.io.decode_image reads as a single frame. MPO is a JPEG with an extra preview frame.
SUPPORTED_FORMATS = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "BMP": "bmp"}
_CHANNELS = {"1": 1, "L": 1, "I;16": 1, "I;16B": 1, "I": 1, "LA": 2, "P": 3, "RGB": 3, "RGBA": 4}


def probe(path: str | Path) -> dict[str, Any]:
    """Return ``{sha256, bytes, width, height, channels, format}`` or ``{error: reason}``.

    Never raises for bad files: the reason is a short phrase for the data-quality report.

    Args:
        path: the image file; read whole and decoded whole.

    Returns:
        The file's sha256 and size in bytes, its width and height in pixels, its channel count (1
        for grayscale, 3 for RGB and palette images, 2/4 with alpha) and its format as the input
        pipeline names it (``jpeg``, ``png`` or ``bmp``). For a bad file: ``error``, plus the
        sha256 and size when the bytes could be read.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        return {"error": f"unreadable file ({exc.strerror or type(exc).__name__})"}
    result: dict[str, Any] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    if not data:
        return {**result, "error": "empty file (0 bytes)"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                fmt, mode, (width, height) = image.format, image.mode, image.size
                if fmt not in SUPPORTED_FORMATS:
                    return {**result, "error": f"unsupported format {fmt} (use JPEG or PNG)"}
                if mode == "CMYK":
                    return {**result, "error": "CMYK JPEG is not supported (convert to RGB or grayscale)"}
                image.load()
    except Image.UnidentifiedImageError:
        return {**result, "error": "not an image (unknown format)"}
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return {**result, "error": "too many pixels (decompression-bomb guard)"}
    except (OSError, SyntaxError, ValueError) as exc:
        return {**result, "error": f"truncated or corrupt image ({str(exc).splitlines()[0][:80]})"}
    return {
        **result,
        "width": width,
        "height": height,
        "channels": _CHANNELS.get(mode, 3),
        "format": SUPPORTED_FORMATS[fmt],
    }
