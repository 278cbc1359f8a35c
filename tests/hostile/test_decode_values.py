"""Impossible pixels and DICOM attributes that cannot be applied (issue 19, part 4).

A window 0 wide, a rescale slope of ``abc``, a centre of ``x\\y``, a malformed VOI LUT, NaN or
infinite float pixels, a 1 × 1 image, a 1 × 5000 strip, a CMYK JPEG: each is refused with one line
naming the file and the reason, in ``cxr predict`` (the rest of the batch is scored and the exit
status says some failed), in ``cxr serve`` (422) and in ``prepare`` (excluded, with the reason in
the data-quality report).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.common.images import probe
from cxr.config import PrepareConfig, SplitConfig
from cxr.data.prepare import prepare
from cxr.safe_text import printable
from tests.factories import kermany_layout, synthetic, write_dicom
from tests.hostile.harness import assert_no_traceback, run_cxr

PIXELS = (np.arange(64 * 64).reshape(64, 64) % 4000).astype(np.uint16)


def _patched(path: Path, old: bytes, new: bytes, **attributes: str) -> Path:
    """A valid DICOM whose attribute bytes ``old`` are overwritten with ``new`` (same length): pydicom
    will not write an invalid value itself."""
    write_dicom(path, PIXELS, **attributes)
    data = path.read_bytes()
    assert data.count(old) == 1 and len(old) == len(new)
    path.write_bytes(data.replace(old, new))
    return path


def _float_dicom(path: Path, pixels: np.ndarray) -> Path:
    """A float-pixel DICOM (FloatPixelData, 32-bit)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.BitsAllocated = 1, "MONOCHROME2", 32
    ds.FloatPixelData = pixels.astype("<f4").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _malformed_voi_lut(path: Path) -> Path:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.LUTDescriptor = [4, 0, 16]  # four entries...
    item.LUTData = np.array([0, 1], "<u2").tobytes()  # ...two given
    write_dicom(path, PIXELS, VOILUTSequence=[item])
    return path


def _image(path: Path, width: int, height: int, mode: str = "L", fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (width, height), 128).save(path, format=fmt)
    return path


def hostile_files(folder: Path) -> dict[Path, str]:
    """Every impossible input of this module → the phrase its one line must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    nan = PIXELS.astype(np.float32)
    nan[3, 3] = np.nan
    inf = PIXELS.astype(np.float32)
    inf[5, 5] = np.inf
    return {
        write_dicom(folder / "ww0.dcm", PIXELS, WindowCenter="2000", WindowWidth="0"): "WindowWidth 0 is under 1",
        write_dicom(folder / "wwneg.dcm", PIXELS, WindowCenter="2000", WindowWidth="-5"): "WindowWidth -5 is under 1",
        _patched(folder / "slope.dcm", b"1.25", b"abc ", RescaleSlope="1.25", RescaleIntercept="0"): (
            "RescaleSlope abc is not a number"
        ),
        _patched(folder / "centre.dcm", b"1234", b"x\\y ", WindowCenter="1234", WindowWidth="100"): (
            "WindowCenter x\\y is not a number"
        ),
        write_dicom(folder / "slope-inf.dcm", PIXELS, RescaleSlope="inf", RescaleIntercept="0"): "not a finite number",
        _malformed_voi_lut(folder / "voi.dcm"): "VOI LUT cannot be applied",
        _float_dicom(folder / "nan.dcm", nan): "not finite numbers (NaN or infinity)",
        _float_dicom(folder / "inf.dcm", inf): "not finite numbers (NaN or infinity)",
        _image(folder / "dot.png", 1, 1): "1 × 1 pixels: a side under 16 px",
        _image(folder / "strip.png", 1, 5000): "a side under 16 px",
        _image(folder / "wide-strip.png", 5000, 100): "a 50:1 strip",
        _image(folder / "cmyk.jpeg", 64, 64, mode="CMYK", fmt="JPEG"): "CMYK JPEG is not supported",
    }


def _good(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(synthetic(np.random.default_rng(seed), bright=False), mode="L").save(path, format="PNG")
    return path


def test_predict_refuses_each_impossible_file_in_one_line_and_scores_the_rest(project: Path, tmp_path: Path) -> None:
    bad = hostile_files(tmp_path / "bad")
    first, last = _good(tmp_path / "a.png", 1), _good(tmp_path / "z.png", 2)

    outcome = run_cxr(["predict", "--model", "smallnet", first, *bad, last], project)

    assert outcome.rc == 1, outcome.describe()
    assert_no_traceback(outcome)
    predicted = [line.rpartition(": prediction: ")[0] for line in outcome.out.splitlines()]
    assert predicted == [printable(first), printable(last)], outcome.describe()
    errors = outcome.err.splitlines()
    assert len(errors) == len(bad), outcome.describe()
    for (path, reason), line in zip(bad.items(), errors, strict=True):
        assert line.startswith(f"cxr: error: {printable(path)}: ") and reason in line, line


def test_prepare_excludes_dots_strips_and_cmyk_with_the_reason(make_dataset, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    make_dataset(kermany_layout(n_patients=12, splits=("train",)), root=tmp_path / "data/raw")
    normal = tmp_path / "data/raw/train/NORMAL"
    refused = {
        _image(normal / "IM-9001-0001.png", 1, 1): "a side under 16 px",
        _image(normal / "IM-9002-0001.png", 1, 5000): "a side under 16 px",
        _image(normal / "IM-9003-0001.png", 2000, 200): "a 10:1 strip",
        _image(normal / "IM-9004-0001.jpeg", 64, 64, mode="CMYK", fmt="JPEG"): "CMYK JPEG is not supported",
    }
    prepare("data/raw", SplitConfig(strategy="patient", seed=1, test_size=0.2, val_size=0.2), PrepareConfig(workers=1))
    reasons = {e["path"]: e["reason"] for e in json.loads(Path("reports/data_quality.json").read_text())["excluded"]}
    for path, phrase in refused.items():
        assert phrase in reasons[path.relative_to(tmp_path).as_posix()]


SHAPES = [(28, 28, True), (16, 64, True), (15, 15, False), (100, 401, False)]


@pytest.mark.parametrize(("width", "height", "ok"), SHAPES)
def test_the_shape_bounds(tmp_path: Path, width: int, height: int, ok: bool) -> None:
    """PneumoniaMNIST's 28 × 28 and a 1:4 film pass; a side under 16 px or a strip beyond 1:4 does not."""
    found = probe(_image(tmp_path / "x.png", width, height))
    assert ("error" not in found) is ok, found


def test_serve_answers_422_for_each_impossible_file(trained: Path, tmp_path: Path, monkeypatch) -> None:
    """The server decodes through the same function: each file is a 422 with the same reason."""
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from cxr.inference.loading import load
    from cxr.serving.app import create_app

    monkeypatch.chdir(trained)
    lm = load("models/smallnet.keras")
    with TestClient(create_app(lm, 0.5, "test")) as client:
        for path, reason in hostile_files(tmp_path / "bad").items():
            response = client.post(f"/predict?name={path.name}", content=path.read_bytes())
            assert response.status_code == 422, (path.name, response.text)
            assert reason in response.json()["error"], (path.name, response.text)
        good = io.BytesIO()
        Image.fromarray(synthetic(np.random.default_rng(0), bright=True)).save(good, "PNG")
        assert client.post("/predict?name=good.png", content=good.getvalue()).status_code == 200
