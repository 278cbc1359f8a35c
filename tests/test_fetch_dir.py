"""fetch with data.source=dir: layout detection, copying, atomic replacement, clear errors."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from cxr.config import DataConfig
from cxr.data.fetch import fetch, source_digest
from cxr.data.kaggle_layout import find_class_folders
from cxr.errors import CxrError, DataError
from cxr.provenance.hashing import hash_tree


def _fetch(src: Path, tmp_path: Path) -> dict:
    return fetch(
        DataConfig(source="dir", dir=str(src)),
        raw_dir=tmp_path / "data/raw",
        record_path=tmp_path / "data/fetch.json",
        cache_dir=tmp_path / "data/.cache",
    )


def test_split_layout_is_copied_and_recorded(make_dataset, tmp_path):
    src = make_dataset(
        {
            "train/NORMAL": ["a.jpeg", "b.jpeg"],
            "train/PNEUMONIA": ["c.jpeg"],
            "test/NORMAL": ["d.jpeg"],
            "test/PNEUMONIA": ["e.png"],
        }
    )
    record = _fetch(src, tmp_path)
    raw = tmp_path / "data/raw"
    assert sorted(p.relative_to(raw).as_posix() for p in raw.rglob("*") if p.is_file()) == [
        "test/NORMAL/d.jpeg",
        "test/PNEUMONIA/e.png",
        "train/NORMAL/a.jpeg",
        "train/NORMAL/b.jpeg",
        "train/PNEUMONIA/c.jpeg",
    ]
    assert record["counts"] == {"test/NORMAL": 1, "test/PNEUMONIA": 1, "train/NORMAL": 2, "train/PNEUMONIA": 1}
    assert record["tree_sha256"] == hash_tree(raw)
    assert json.loads((tmp_path / "data/fetch.json").read_text()) == record
    assert "fetched_at" not in record  # no timestamps: the record only changes with the data
    assert record["skipped"] == []  # nothing left out (links out of the tree, bad names: tests/hostile)


def test_flat_layout_wrapper_and_case_insensitive_names(make_dataset, tmp_path):
    src = make_dataset({"chest_xray/normal": ["a.jpeg"], "chest_xray/Pneumonia": ["b.jpeg"]})
    folders = find_class_folders(src)
    assert [(f.split, f.class_name) for f in folders] == [(None, "NORMAL"), (None, "PNEUMONIA")]
    _fetch(src, tmp_path)
    assert (tmp_path / "data/raw/NORMAL/a.jpeg").is_file()
    assert (tmp_path / "data/raw/PNEUMONIA/b.jpeg").is_file()


def test_kaggle_archive_quirks_are_ignored(make_dataset, tmp_path):
    src = make_dataset(
        {
            "chest_xray/train/NORMAL": ["a.jpeg"],
            "chest_xray/train/PNEUMONIA": ["b.jpeg"],
            "chest_xray/chest_xray/train/NORMAL": ["dup.jpeg"],
            "chest_xray/__MACOSX/train/NORMAL": ["._a.jpeg"],
        }
    )
    _fetch(src, tmp_path)
    files = sorted(p.name for p in (tmp_path / "data/raw").rglob("*") if p.is_file())
    assert files == ["a.jpeg", "b.jpeg"]


def test_wrong_layout_is_one_clear_line(make_dataset, tmp_path):
    src = make_dataset({"cats": ["a.jpeg"], "dogs": ["b.jpeg"]})
    with pytest.raises(DataError) as err:
        _fetch(src, tmp_path)
    message = str(err.value)
    assert "\n" not in message and "NORMAL/" in message and "cats/" in message and "dogs/" in message
    assert not (tmp_path / "data/raw").exists()


def test_missing_folder_and_unknown_source(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        _fetch(tmp_path / "nope", tmp_path)
    with pytest.raises(CxrError, match="choose one of kaggle, dir, medmnist"):
        fetch(DataConfig(source="ftp"), raw_dir=tmp_path / "raw", record_path=tmp_path / "r.json")


def test_read_only_source_is_never_written(make_dataset, tmp_path):
    src = make_dataset({"NORMAL": ["a.jpeg"], "PNEUMONIA": ["b.jpeg"]})
    for path in [*src.rglob("*"), src]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    before = hash_tree(src)
    _fetch(src, tmp_path)
    assert hash_tree(src) == before
    copied = tmp_path / "data/raw/NORMAL/a.jpeg"
    assert os.access(copied, os.W_OK)  # the copy is ours: DVC may replace it later
    for path in [src, *src.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)


def test_refetch_replaces_atomically_and_failure_keeps_previous(make_dataset, tmp_path):
    good = make_dataset({"NORMAL": ["a.jpeg"], "PNEUMONIA": ["b.jpeg"]}, root=tmp_path / "good")
    _fetch(good, tmp_path)
    before = hash_tree(tmp_path / "data/raw")
    bad = make_dataset({"other": ["x.jpeg"]}, root=tmp_path / "bad")
    with pytest.raises(DataError):
        _fetch(bad, tmp_path)
    assert hash_tree(tmp_path / "data/raw") == before
    assert not list((tmp_path / "data").glob(".fetch-*"))
    assert not (tmp_path / "data/.fetch.lock").exists()  # the lock file goes with the run
    newer = make_dataset({"NORMAL": ["c.jpeg"], "PNEUMONIA": ["d.jpeg"]}, root=tmp_path / "newer")
    _fetch(newer, tmp_path)
    assert sorted(p.name for p in (tmp_path / "data/raw").rglob("*.jpeg")) == ["c.jpeg", "d.jpeg"]


def test_source_digest_tracks_content(make_dataset, tmp_path):
    src = make_dataset({"NORMAL": ["a.jpeg"], "PNEUMONIA": ["b.jpeg"]})
    first = source_digest(DataConfig(source="dir", dir=str(src)))
    assert first == source_digest(DataConfig(source="dir", dir=str(src)))
    (src / "NORMAL/a.jpeg").write_bytes(b"changed")
    assert source_digest(DataConfig(source="dir", dir=str(src))) != first
    assert source_digest(DataConfig(source="kaggle")) is None
