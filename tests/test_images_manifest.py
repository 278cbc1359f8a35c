"""Decode checks, patient ids and the manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.common.images import probe
from cxr.data.manifest import build_manifest, classify_path, parse_patient
from tests.factories import kermany_layout, write_image


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("person1_bacteria_1.jpeg", ("person1", "bacteria")),
        ("person1261_virus_2147.jpeg", ("person1261", "virus")),
        ("person142_virus_288_2.jpeg", ("person142", "virus")),
        ("IM-0115-0001.jpeg", ("IM-0115", "")),
        ("IM-0439-0001-0002.jpeg", ("IM-0439", "")),
        ("NORMAL2-IM-0115-0001.jpeg", ("IM-0115", "")),  # the two normal batches are grouped
        ("pneumoniamnist_train_00001.png", ("", "")),
        ("scan.jpeg", ("", "")),
    ],
)
def test_parse_patient(name, expected):
    assert parse_patient(name) == expected


def test_classify_path():
    assert classify_path(Path("train/NORMAL/a.jpeg")) == ("train", "NORMAL")
    assert classify_path(Path("PNEUMONIA/sub/a.jpeg")) == ("", "PNEUMONIA")
    assert classify_path(Path("train/OTHER/a.jpeg")) is None
    assert classify_path(Path("a.jpeg")) is None


def test_probe_reads_geometry_and_hash(tmp_path):
    gray = probe(write_image(tmp_path / "g.jpeg", 1, size=(50, 30), mode="L", fmt="JPEG"))
    rgb = probe(write_image(tmp_path / "c.png", 2, size=(40, 20), mode="RGB", fmt="PNG"))
    assert (gray["width"], gray["height"], gray["channels"], gray["format"]) == (50, 30, 1, "jpeg")
    assert (rgb["width"], rgb["height"], rgb["channels"], rgb["format"]) == (40, 20, 3, "png")
    assert len(gray["sha256"]) == 64 and gray["bytes"] == (tmp_path / "g.jpeg").stat().st_size


def test_probe_names_each_kind_of_bad_file(tmp_path):
    (tmp_path / "empty.jpeg").write_bytes(b"")
    (tmp_path / "text.jpeg").write_text("not an image at all")
    good = write_image(tmp_path / "full.jpeg", 3, size=(200, 200), fmt="JPEG").read_bytes()
    (tmp_path / "cut.jpeg").write_bytes(good[: len(good) // 2])
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "scan.tiff")
    Image.new("CMYK", (8, 8)).save(tmp_path / "cmyk.jpeg")
    assert probe(tmp_path / "empty.jpeg")["error"] == "empty file (0 bytes)"
    assert probe(tmp_path / "text.jpeg")["error"] == "not an image (unknown format)"
    assert probe(tmp_path / "cut.jpeg")["error"].startswith("truncated or corrupt image")
    assert probe(tmp_path / "scan.tiff")["error"].startswith("unsupported format TIFF")
    assert probe(tmp_path / "cmyk.jpeg")["error"].startswith("CMYK JPEG")
    assert probe(tmp_path / "missing.jpeg")["error"].startswith("unreadable file")


def test_manifest_lists_sorted_usable_images_and_excludes_bad_ones(make_dataset, tmp_path):
    raw = make_dataset(
        {"train/NORMAL": ["IM-0002-0001.jpeg", "IM-0001-0001.jpeg"], "train/PNEUMONIA": ["person5_virus_9.jpeg"]},
        root=tmp_path / "raw",
    )
    (raw / "train/NORMAL/broken.jpeg").write_bytes(b"\xff\xd8\xff garbage")
    (raw / "train/NORMAL/notes.txt").write_text("radiologist notes")
    write_image(raw / "stray.jpeg", 99)  # outside any class folder
    manifest, excluded = build_manifest(raw, workers=2, path_prefix="data/raw")
    assert manifest["path"].tolist() == [
        "data/raw/train/NORMAL/IM-0001-0001.jpeg",
        "data/raw/train/NORMAL/IM-0002-0001.jpeg",
        "data/raw/train/PNEUMONIA/person5_virus_9.jpeg",
    ]
    assert manifest["label"].tolist() == [0, 0, 1]
    assert manifest["patient_id"].tolist() == ["IM-0001", "IM-0002", "person5"]
    assert manifest["subtype"].tolist() == ["", "", "virus"]
    reasons = {e["path"]: e["reason"] for e in excluded}
    assert reasons["data/raw/train/NORMAL/notes.txt"] == "not an image file name"
    assert reasons["data/raw/stray.jpeg"] == "not inside a NORMAL/ or PNEUMONIA/ folder"
    assert reasons["data/raw/train/NORMAL/broken.jpeg"] == "not an image (unknown format)"


def test_parallel_and_serial_manifests_agree(make_dataset, tmp_path):
    raw = make_dataset(kermany_layout(n_patients=40), root=tmp_path / "raw")
    serial, _ = build_manifest(raw, workers=1)
    parallel, _ = build_manifest(raw, workers=3)
    assert serial.equals(parallel) and len(serial) == 240
