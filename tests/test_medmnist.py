"""PneumoniaMNIST .npz → PNG files in Kaggle layout."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cxr.config import DataConfig
from cxr.data.fetch import fetch
from cxr.errors import DataError, FetchError
from tests.factories import SHARED_DATA


def _npz(path, with_test: bool = False, **overrides):
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
        "train_labels": np.array([[0], [1], [1], [0], [1], [1]], dtype=np.uint8),
        "val_images": rng.integers(0, 256, (2, 28, 28), dtype=np.uint8),
        "val_labels": np.array([[1], [0]], dtype=np.uint8),
    }
    if with_test:
        arrays["test_images"] = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
        arrays["test_labels"] = np.array([[0], [1], [1]], dtype=np.uint8)
    arrays.update(overrides)
    np.savez(path, **arrays)
    return path, arrays


def test_npz_becomes_png_files_with_exact_pixels(tmp_path):
    npz, arrays = _npz(tmp_path / "p.npz", with_test=True)
    record = fetch(
        DataConfig(source="medmnist", npz=str(npz)), raw_dir=tmp_path / "raw", record_path=tmp_path / "fetch.json"
    )
    assert record["counts"] == {
        "test/NORMAL": 1,
        "test/PNEUMONIA": 2,
        "train/NORMAL": 2,
        "train/PNEUMONIA": 4,
        "val/NORMAL": 1,
        "val/PNEUMONIA": 1,
    }
    png = tmp_path / "raw/train/PNEUMONIA/pneumoniamnist_train_00001.png"
    assert np.array_equal(np.asarray(Image.open(png)), arrays["train_images"][1])
    assert len(record["origin_sha256"]) == 64


def test_bad_npz_files_get_clear_errors(tmp_path):
    with pytest.raises(FetchError, match="file not found"):
        fetch(
            DataConfig(source="medmnist", npz=str(tmp_path / "none.npz")),
            raw_dir=tmp_path / "raw",
            record_path=tmp_path / "f.json",
        )
    (tmp_path / "junk.npz").write_text("junk")
    with pytest.raises(DataError, match=r"not a readable \.npz"):
        fetch(
            DataConfig(source="medmnist", npz=str(tmp_path / "junk.npz")),
            raw_dir=tmp_path / "raw",
            record_path=tmp_path / "f.json",
        )
    bad_labels, _ = _npz(tmp_path / "labels.npz", train_labels=np.array([[0], [2], [1], [0], [1], [1]]))
    with pytest.raises(DataError, match="labels other than 0"):
        fetch(
            DataConfig(source="medmnist", npz=str(bad_labels)),
            raw_dir=tmp_path / "raw",
            record_path=tmp_path / "f.json",
        )
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(DataError, match="not a MedMNIST file"):
        fetch(
            DataConfig(source="medmnist", npz=str(tmp_path / "other.npz")),
            raw_dir=tmp_path / "raw",
            record_path=tmp_path / "f.json",
        )
    assert not (tmp_path / "raw").exists()


def test_download_without_the_medmnist_package_names_the_fix(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_medmnist(name, *args, **kwargs):
        if name == "medmnist":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_medmnist)
    with pytest.raises(FetchError, match=r"set data.npz .* pip install 'cxr-pipeline\[medmnist\]'"):
        fetch(
            DataConfig(source="medmnist", npz="", medmnist_size=28),
            raw_dir=tmp_path / "raw",
            record_path=tmp_path / "f.json",
            cache_dir=tmp_path / "cache",
        )


@pytest.mark.skipif(not (SHARED_DATA / "pneumoniamnist_trainval.npz").is_file(), reason="shared data absent")
def test_shared_pneumoniamnist_file(tmp_path):
    record = fetch(
        DataConfig(source="medmnist", npz=str(SHARED_DATA / "pneumoniamnist_trainval.npz")),
        raw_dir=tmp_path / "raw",
        record_path=tmp_path / "f.json",
    )
    assert record["files"] == 4708 + 524
    assert set(record["counts"]) == {"train/NORMAL", "train/PNEUMONIA", "val/NORMAL", "val/PNEUMONIA"}
