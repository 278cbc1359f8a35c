"""Only chest radiographs get a verdict (issue 16, the DICOM half): the metadata gate, its override,
compressed DICOMs that decode like their uncompressed twins, and pydicom's own test files — data
nobody here made — swept through the real ``cxr predict``."""

from __future__ import annotations

import collections
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.errors import DataError
from cxr.inference.dicom import OutsideIntendedUse, intended_use_problem, read_dicom
from cxr.inference.predict import predict
from tests.factories import SHARED_DATA, synthetic, write_dicom

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPECTS = "outside intended use (expects CR or DX chest radiographs, AP or PA)"


class _Header(dict):
    """A stand-in for a header: ``get`` by keyword, as pydicom's Dataset offers it."""


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"Modality": "DX"}, None),
        ({"Modality": "CR", "BodyPartExamined": "CHEST", "ViewPosition": "PA"}, None),
        ({"Modality": "cr", "PhotometricInterpretation": "MONOCHROME1", "ViewPosition": ""}, None),
        ({"Modality": "CT"}, "Modality CT"),
        ({}, "Modality absent"),
        ({"Modality": "DX", "BodyPartExamined": "HAND"}, "BodyPartExamined HAND"),
        ({"Modality": "DX", "PhotometricInterpretation": "RGB"}, "PhotometricInterpretation RGB"),
        ({"Modality": "DX", "NumberOfFrames": 3}, "NumberOfFrames 3"),
        ({"Modality": "DX", "ViewPosition": "LL"}, "ViewPosition LL (a lateral film)"),
    ],
)
def test_the_metadata_gate_names_the_first_field_that_disagrees(fields: dict, problem: str | None) -> None:
    assert intended_use_problem(_Header(fields)) == problem


def test_a_ct_slice_is_refused_in_one_line_and_scored_only_when_allowed(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ct = write_dicom(tmp_path / "ct.dcm", synthetic(rng, True), modality="CT", sop_class=CT_IMAGE)
    with pytest.raises(OutsideIntendedUse) as err:
        read_dicom(ct)
    assert str(err.value) == f"{ct}: Modality CT: {EXPECTS}"
    assert read_dicom(ct, allow_outside_intended_use=True).shape == (32, 32, 3)
    lateral = write_dicom(tmp_path / "lat.dcm", synthetic(rng, True), ViewPosition="LL")
    with pytest.raises(DataError, match=r"ViewPosition LL \(a lateral film\): outside intended use"):
        read_dicom(lateral)


def _predict(model: Path, files: list, allow: bool = False) -> tuple[int, list[dict], list[str]]:
    out, err = io.StringIO(), io.StringIO()
    failures = predict(model, files, as_json=True, out=out, err=err, allow_outside_intended_use=allow)
    return failures, [json.loads(line) for line in out.getvalue().splitlines()], err.getvalue().splitlines()


def test_predict_marks_what_it_scored_outside_the_intended_use(trained: Path, tmp_path: Path, cli) -> None:
    rng = np.random.default_rng(1)
    film = write_dicom(tmp_path / "film.dcm", synthetic(rng, True), modality="CR", BodyPartExamined="CHEST")
    ct = write_dicom(tmp_path / "ct.dcm", synthetic(rng, True), modality="CT", sop_class=CT_IMAGE)
    model = trained / "models/smallnet.keras"
    failures, records, errors = _predict(model, [film, ct])
    assert failures == 1 and [r["path"] for r in records] == [str(film)] and records[0]["intended_use"] is True
    assert errors == [f"cxr: error: {ct}: Modality CT: {EXPECTS}"]
    failures, records, errors = _predict(model, [film, ct], allow=True)
    assert failures == 0 and errors == []
    assert [(r["intended_use"], r.get("outside_intended_use")) for r in records] == [
        (True, None),
        (False, "Modality CT"),
    ]
    code, out, _ = cli(["predict", "--model", str(model), str(ct), "--allow-outside-intended-use"])
    assert code == 0 and "(outside intended use: Modality CT)" in out


def _real_film() -> np.ndarray:
    """A real chest film from the shared data when it is here, else a synthetic one (8-bit grey)."""
    found = sorted((SHARED_DATA / "chest_xray_224" / "train" / "NORMAL").glob("*.jpeg"))[:1]
    if found:
        return np.asarray(Image.open(found[0]).convert("L"))
    return synthetic(np.random.default_rng(5), False, size=224)


@pytest.mark.parametrize("syntax", ["JPEG2000Lossless", "RLELossless"])
def test_a_losslessly_compressed_film_predicts_like_its_uncompressed_twin(trained: Path, tmp_path: Path, syntax: str):
    import pydicom
    import pydicom.uid

    film = _real_film()
    plain = write_dicom(tmp_path / "plain.dcm", film, modality="DX")
    ds = pydicom.dcmread(plain)
    ds.compress(getattr(pydicom.uid, syntax))
    packed = tmp_path / f"{syntax}.dcm"
    ds.save_as(packed)
    assert pydicom.dcmread(packed).file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_array_equal(read_dicom(packed), read_dicom(plain))
    _, records, errors = _predict(trained / "models/smallnet.keras", [plain, packed])
    assert errors == [] and abs(records[0]["probability"] - records[1]["probability"]) <= 1e-4


def test_pydicom_s_own_test_files_sweep_through_predict(trained: Path) -> None:
    """78 files of every modality, syntax and defect: no traceback, no verdict for any of them (none is
    a CR or DX chest film), and with the override every compressed monochrome frame decodes."""
    import pydicom.data

    files = pydicom.data.get_testdata_files("*.dcm")
    assert len(files) >= 70
    model = trained / "models/smallnet.keras"
    failures, records, errors = _predict(model, files)
    assert records == [] and failures == len(files) == len(errors)
    assert all(line.startswith("cxr: error: ") and "Traceback" not in line for line in errors)
    reasons = collections.Counter(
        "gate" if "outside intended use" in line else "no pixels" if "without pixel data" in line else "other"
        for line in errors
    )
    assert reasons["gate"] >= 50, reasons  # CT, MR, US, NM, RT dose, SEG, secondary captures...

    _, records, errors = _predict(model, files, allow=True)
    undecoded = [line for line in errors if "pixel data could not be decoded" in line or "transfer syntax" in line]
    assert "install a pydicom decoder" not in "\n".join(undecoded)  # the decoders are there
    # the two files whose codestreams are broken on purpose (an embedded delimiter, a 12-bit stream
    # that pylibjpeg and GDCM both refuse) are reported as damaged, in one line each
    assert sorted(Path(line.split(": ")[2]).name for line in undecoded) == [
        "JPEG-lossy.dcm",
        "JPEG2000-embedded-sequence-delimiter.dcm",
    ]
    # 3 × 3 secondary captures, 10 × 10 dose grids and 45 × 10 strips are no film, allowed or not
    not_films = [line for line in errors if "is not a chest film" in line or ":1 strip" in line]
    assert len(not_films) >= 8, not_films
    assert len(records) >= 38 and all(r["intended_use"] is False for r in records)
