"""The prepare step end to end on synthetic data: outputs, quality report, failures."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from cxr.config import PrepareConfig, SplitConfig
from cxr.data.prepare import prepare
from cxr.errors import DataError
from cxr.provenance.hashing import sha256_file
from tests.factories import kermany_layout, write_image

SPLIT = SplitConfig(strategy="patient", seed=42, test_size=0.2, val_size=0.2)


def test_prepare_writes_manifest_splits_quality_and_plot(make_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_dataset(kermany_layout(n_patients=30, splits=("train", "test")), root=tmp_path / "data/raw")
    (tmp_path / "data/raw/train/NORMAL/zero.jpeg").write_bytes(b"")
    dup = (tmp_path / "data/raw/train/PNEUMONIA").iterdir().__next__()
    (tmp_path / "data/raw/train/PNEUMONIA/copy_of_other.jpeg").write_bytes(dup.read_bytes())
    result = prepare("data/raw", SPLIT, PrepareConfig(min_images_per_class=5, workers=2))

    manifest = pd.read_csv("data/prepared/manifest.csv", keep_default_na=False)
    splits = pd.read_csv("data/prepared/splits.csv", keep_default_na=False)
    assert len(manifest) == 30 * 2 * 3 * 2 + 1  # both splits, 3 images per patient pair, + the copy
    assert set(splits["split"]) == {"train", "val", "test"}
    assert (splits.loc[splits["path"].str.contains("/test/"), "split"] == "test").all()
    assert all((tmp_path / p).is_file() for p in splits["path"])  # readable from the repo root
    quality = json.loads((tmp_path / "reports/data_quality.json").read_text())
    assert quality["excluded"] == [{"path": "data/raw/train/NORMAL/zero.jpeg", "reason": "empty file (0 bytes)"}]
    assert quality["duplicates"]["duplicate_groups"] == 1
    assert quality["splits"]["patient"]["leakage"]["clean"] is True
    assert set(quality["splits"]) == {"seed", "patient"}
    copy_row = splits[splits["path"].str.endswith("copy_of_other.jpeg")]
    original_row = splits[splits["path"] == dup.relative_to(tmp_path).as_posix()]
    assert copy_row["split"].item() == original_row["split"].item()
    assert result["manifest_sha256"] == sha256_file("data/prepared/manifest.csv")
    # splits.csv names the manifest it was cut from (readers refuse a mismatched pair)
    assert splits["manifest_sha256"].unique().tolist() == [result["manifest_sha256"]]
    assert sorted(p.name for p in tmp_path.rglob("*") if ".tmp-" in p.name or p.name.endswith(".lock")) == []
    assert (tmp_path / "reports/plots/class_distribution.png").stat().st_size > 1000


def test_prepare_is_deterministic(make_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_dataset(kermany_layout(n_patients=25), root=tmp_path / "data/raw")
    first = prepare("data/raw", SPLIT, PrepareConfig(min_images_per_class=1))
    second = prepare("data/raw", SPLIT, PrepareConfig(min_images_per_class=1))
    assert first["splits_sha256"] == second["splits_sha256"]
    assert first["manifest_sha256"] == second["manifest_sha256"]
    other_seed = prepare("data/raw", SPLIT.model_copy(update={"seed": 7}), PrepareConfig(min_images_per_class=1))
    assert other_seed["splits_sha256"] != first["splits_sha256"]


def test_prepare_fails_clearly_when_a_class_is_too_small(make_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pneumonia = [f"person{i}_virus_{i}.jpeg" for i in range(20)]
    make_dataset({"NORMAL": ["IM-0001-0001.jpeg"], "PNEUMONIA": pneumonia}, root=tmp_path / "data/raw")
    with pytest.raises(DataError, match=r"NORMAL=1; prepare.min_images_per_class=5"):
        prepare("data/raw", SPLIT, PrepareConfig(min_images_per_class=5))


def test_identical_files_under_both_classes_are_excluded(make_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_dataset(kermany_layout(n_patients=10), root=tmp_path / "data/raw")
    write_image(tmp_path / "data/raw/train/NORMAL/IM-0900-0001.jpeg", 4242)
    write_image(tmp_path / "data/raw/train/PNEUMONIA/person900_virus_1.jpeg", 4242)
    prepare("data/raw", SPLIT, PrepareConfig(min_images_per_class=1))
    quality = json.loads((tmp_path / "reports/data_quality.json").read_text())
    reasons = {e["path"]: e["reason"] for e in quality["excluded"]}
    assert reasons["data/raw/train/NORMAL/IM-0900-0001.jpeg"].startswith("identical bytes")
    assert reasons["data/raw/train/PNEUMONIA/person900_virus_1.jpeg"].startswith("identical bytes")


def test_prepare_without_raw_data_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="run the fetch step first"):
        prepare("data/raw", SPLIT)
