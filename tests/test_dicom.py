"""DICOM reading: real Part 10 files written with pydicom, pixel values checked against the documented pipeline.

The reference below re-implements ``cxr.inference.dicom``'s documented order of operations with plain numpy
(modality LUT → VOI window (DICOM PS3.3 C.11.2.1.2.1, LINEAR) → MONOCHROME1 inversion → clip to
mean ± 2.5 std → 0–255 uint8 → 3 channels), independently of pydicom's LUT helpers. The last two
steps are invariant to a positive affine map, so the reference maps the window onto [0, 1] while
pydicom maps it onto the stored bit range: the outputs must still agree pixel for pixel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydicom.encaps import encapsulate

from cxr.common.preprocessing import resize_image
from cxr.config import InputConfig
from cxr.errors import DataError
from cxr.inference.dicom import is_dicom, read_dicom, to_uint8
from cxr.inference.loading import load_image
from cxr.runtime import tensorflow
from tests.factories import write_dicom

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"


def reference(
    stored: np.ndarray,
    slope: float = 1.0,
    intercept: float = 0.0,
    window: tuple[float, float] | None = None,
    monochrome1: bool = False,
    clip_std: float = 2.5,
) -> np.ndarray:
    """The documented pipeline in numpy (no pydicom): what ``read_dicom`` must return."""
    x = stored.astype(np.float64) * slope + intercept  # modality LUT (rescale)
    if window is not None:  # VOI LINEAR window onto [0, 1]
        center, width = window
        below = x <= center - 0.5 - (width - 1) / 2
        above = x > center - 0.5 + (width - 1) / 2
        x = np.where(below, 0.0, np.where(above, 1.0, (x - (center - 0.5)) / (width - 1) + 0.5))
    if monochrome1:  # bright means less attenuation: invert within the data's own range
        x = x.max() + x.min() - x
    mean, std = x.mean(), x.std()
    low, high = max(mean - clip_std * std, x.min()), min(mean + clip_std * std, x.max())
    out = np.round((np.clip(x, low, high) - low) / (high - low) * 255.0).astype(np.uint8)
    return np.repeat(out[..., None], 3, axis=-1)


def radiograph(shape: tuple[int, int], low: int, high: int, seed: int, dtype: Any) -> np.ndarray:
    """A smooth gradient plus noise between ``low`` and ``high`` (a few outliers, so clipping matters)."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    ramp = np.add.outer(np.linspace(0, 0.6, rows), np.linspace(0, 0.4, cols))
    values = low + (high - low) * (0.1 + 0.8 * ramp / ramp.max()) + rng.normal(0, (high - low) * 0.05, shape)
    values.flat[rng.choice(values.size, 6, replace=False)] = [low, low, high, high, high, low]  # outliers
    return np.clip(np.round(values), low, high).astype(dtype)


def assert_same_pixels(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == np.uint8 and actual.shape == expected.shape
    np.testing.assert_array_equal(actual, expected)


def test_8_bit_monochrome2_follows_the_documented_pipeline(tmp_path):
    stored = radiograph((30, 40), 3, 251, seed=1, dtype=np.uint8)
    out = read_dicom(write_dicom(tmp_path / "mono2.dcm", stored))
    assert out.shape == (30, 40, 3)
    assert_same_pixels(out, reference(stored))
    # the stretch is real: the clipped outliers saturate and the output spans 0–255
    assert out.min() == 0 and out.max() == 255
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()


def test_16_bit_rescale_is_applied_before_the_window(tmp_path):
    """Slope 2, intercept −1024: the window (in modality units) must see 2·x − 1024, not x."""
    stored = radiograph((32, 36), 100, 1900, seed=2, dtype=np.uint16)
    window = (1000.0, 1200.0)  # covers modality values 400–1600 = stored 712–1312
    path = write_dicom(
        tmp_path / "ct.dcm",
        stored,
        bits_stored=12,
        RescaleSlope="2",
        RescaleIntercept="-1024",
        WindowCenter="1000",
        WindowWidth="1200",
    )
    out = read_dicom(path)
    assert_same_pixels(out, reference(stored, 2, -1024, window))
    # the same modality values stored directly (signed, no rescale) read identically ...
    direct = write_dicom(
        tmp_path / "direct.dcm",
        (2 * stored.astype(np.int32) - 1024).astype(np.int16),
        WindowCenter="1000",
        WindowWidth="1200",
    )
    assert_same_pixels(read_dicom(direct), out)
    # ... and skipping the rescale would have given a different image
    assert not np.array_equal(out, reference(stored, 1, 0, window))


def test_16_bit_rescale_without_window_equals_processing_the_modality_values(tmp_path):
    stored = radiograph((24, 28), 0, 4095, seed=3, dtype=np.uint16)
    path = write_dicom(tmp_path / "rescaled.dcm", stored, bits_stored=12, RescaleSlope="2", RescaleIntercept="-1024")
    modality = stored.astype(np.float64) * 2 - 1024
    assert_same_pixels(read_dicom(path), reference(stored, 2, -1024))
    assert_same_pixels(read_dicom(path), to_uint8(modality))


def test_window_saturates_values_outside_it(tmp_path):
    rng = np.random.default_rng(4)
    stored = rng.integers(0, 4096, (40, 40)).astype(np.uint16)
    center, width = 2000.0, 1001.0
    path = write_dicom(tmp_path / "windowed.dcm", stored, bits_stored=12, WindowCenter="2000", WindowWidth="1001")
    out = read_dicom(path)[..., 0]
    assert_same_pixels(read_dicom(path), reference(stored, window=(center, width)))
    below = stored <= center - 0.5 - (width - 1) / 2
    above = stored > center - 0.5 + (width - 1) / 2
    inside = ~below & ~above
    assert below.sum() > 100 and above.sum() > 100 and inside.sum() > 100
    assert (out[below] == 0).all() and (out[above] == 255).all()
    assert len(np.unique(out[inside])) > 150  # the window's width is stretched over the full 0–255 range
    # inside the window the output still follows the stored value (monotonic)
    order = np.argsort(stored[inside], kind="stable")
    assert (np.diff(out[inside][order].astype(int)) >= 0).all()
    assert not np.array_equal(read_dicom(path), reference(stored))  # the window changed the image


def test_monochrome1_is_the_inverse_of_monochrome2(tmp_path):
    stored = radiograph((30, 30), 10, 240, seed=5, dtype=np.uint8)
    stored[0, 0], stored[-1, -1] = 255, 0  # one brightest and one darkest stored value
    mono1 = read_dicom(write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1"))
    mono2 = read_dicom(write_dicom(tmp_path / "m2.dcm", stored, photometric="MONOCHROME2"))
    assert_same_pixels(mono1, reference(stored, monochrome1=True))
    assert mono1[0, 0, 0] == 0 and mono1[-1, -1, 0] == 255  # brightest stored value → darkest output
    assert mono2[0, 0, 0] == 255 and mono2[-1, -1, 0] == 0
    assert np.abs(mono1.astype(int) + mono2.astype(int) - 255).max() <= 1  # rounding ties only
    assert np.corrcoef(mono1[..., 0].ravel(), mono2[..., 0].ravel())[0, 1] < -0.99


def test_monochrome1_with_a_window_inverts_after_windowing(tmp_path):
    stored = radiograph((30, 30), 0, 1000, seed=6, dtype=np.uint16)
    path = write_dicom(
        tmp_path / "m1w.dcm", stored, photometric="MONOCHROME1", bits_stored=10, WindowCenter="500", WindowWidth="401"
    )
    assert_same_pixels(read_dicom(path), reference(stored, window=(500.0, 401.0), monochrome1=True))


def test_signed_16_bit(tmp_path):
    stored = radiograph((26, 34), -2000, 2000, seed=7, dtype=np.int16)
    assert (stored < 0).mean() > 0.2
    out = read_dicom(write_dicom(tmp_path / "signed.dcm", stored))
    assert_same_pixels(out, reference(stored))
    # read as unsigned, the negative values would wrap to the top of the range: the order must hold
    assert out[..., 0][stored == stored.min()].max() == 0
    assert out[..., 0][stored == stored.max()].min() == 255


def _data_error(path: Path) -> str:
    with pytest.raises(DataError) as info:
        read_dicom(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_multi_frame_is_refused(tmp_path):
    frames = np.stack([radiograph((16, 16), 0, 255, seed=s, dtype=np.uint8) for s in range(3)])
    message = _data_error(write_dicom(tmp_path / "cine.dcm", frames, frames=3))
    assert "multi-frame" in message and "3 frames" in message


def test_object_without_pixel_data_is_refused(tmp_path):
    path = write_dicom(tmp_path / "report.dcm", None, sop_class=BASIC_TEXT_SR, modality="SR", ContentDate="20240101")
    message = _data_error(path)
    assert "without pixel data" in message and "SR" in message


def test_non_dicom_with_dcm_suffix_is_refused(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("this is a text file, not a DICOM object\n" * 20)
    assert "not a readable DICOM" in _data_error(path)


@pytest.mark.parametrize("syntax", [JPEG2000_LOSSLESS, JPEG_LS_LOSSLESS])
def test_a_damaged_compressed_stream_or_a_missing_decoder_is_one_line(tmp_path, syntax, monkeypatch, capfd):
    pixels = np.zeros((16, 16), np.uint16)
    fragment = b"\xff\x4f\xff\x51" + bytes(range(60))  # a codestream header, then nothing decodable
    path = write_dicom(
        tmp_path / "compressed.dcm",
        pixels,
        bits_stored=12,
        transfer_syntax=syntax,
        encapsulated=encapsulate([fragment]),
    )
    message = _data_error(path)  # the decoders are installed (pyproject): the stream itself is bad
    assert "pixel data could not be decoded" in message and "may be damaged" in message
    assert capfd.readouterr().err == ""  # the C decoder's own complaints do not reach the terminal
    import pydicom.pixels

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda uid: type("D", (), {"is_available": False})())
    message = _data_error(path)
    assert "compressed transfer syntax" in message
    assert "pylibjpeg" in message and "gdcm" in message


def test_is_dicom_by_magic_bytes_or_suffix(tmp_path):
    pixels = radiograph((8, 8), 0, 255, seed=8, dtype=np.uint8)
    no_suffix = write_dicom(tmp_path / "IM000001", pixels)
    assert no_suffix.read_bytes()[128:132] == b"DICM"
    assert is_dicom(no_suffix)
    assert is_dicom(write_dicom(tmp_path / "upper.DCM", pixels))
    png = tmp_path / "image.png"
    Image.fromarray(pixels).save(png)
    assert not is_dicom(png)
    text = tmp_path / "notes"
    text.write_text("x" * 200)
    assert not is_dicom(text)
    assert not is_dicom(tmp_path / "missing")
    short = tmp_path / "short"
    short.write_bytes(b"DICM")
    assert not is_dicom(short)


def test_load_image_reads_a_dicom_like_the_model_input(tmp_path):
    stored = radiograph((40, 30), 0, 4000, seed=9, dtype=np.uint16)
    path = write_dicom(tmp_path / "IM-0001-0001", stored, bits_stored=12)  # no suffix: found by magic bytes
    cfg = InputConfig(image_size=32, cache="memory")
    image = load_image(path, cfg)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 0] == image[..., 2]).all()
    expected = resize_image(tensorflow().convert_to_tensor(reference(stored)), 32).numpy()
    np.testing.assert_array_equal(image, expected)
    assert image.std() > 20  # a real picture, not a blank


def test_load_image_of_a_bad_dicom_is_a_data_error(tmp_path):
    frames = np.zeros((2, 8, 8), np.uint8)
    path = write_dicom(tmp_path / "two.dcm", frames, frames=2)
    with pytest.raises(DataError, match="multi-frame"):
        load_image(path, InputConfig(image_size=32, cache="memory"))
