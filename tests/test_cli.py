"""The cxr command: parameters, overrides and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cxr.cli import main
from cxr.config import apply_overrides, load_params
from cxr.errors import CxrError
from tests.factories import REPO_ROOT, kermany_layout


def test_overrides_parse_yaml_values_and_nest():
    params = apply_overrides({"data": {"source": "kaggle"}}, ["data.source=dir", "split.seed=7", "data.npz="])
    assert params == {"data": {"source": "dir", "npz": ""}, "split": {"seed": 7}}
    with pytest.raises(CxrError):
        apply_overrides({}, ["novalue"])


def test_repository_params_have_the_documented_interface():
    params = load_params(REPO_ROOT / "params.yaml")
    assert params["data"]["source"] in {"kaggle", "dir", "medmnist"}
    assert {"dir", "npz"} <= set(params["data"])
    assert params["split"]["strategy"] in {"seed", "patient"}
    assert isinstance(params["split"]["seed"], int)


def test_fetch_and_prepare_from_the_command_line(make_dataset, tmp_path, monkeypatch, capsys):
    src = make_dataset(kermany_layout(n_patients=10))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    assert main(["fetch", "-S", "data.source=dir", "-S", f"data.dir={src}"]) == 0
    assert json.loads(capsys.readouterr().out)["files"] == 60
    assert main(["prepare", "-S", "prepare.min_images_per_class=1"]) == 0
    assert (tmp_path / "data/prepared/splits.csv").is_file()


def test_errors_are_one_line_without_traceback(tmp_path):
    (tmp_path / "params.yaml").write_text("data:\n  source: dir\n  dir: nowhere\n")
    proc = subprocess.run(
        [sys.executable, "-m", "cxr", "fetch"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["cxr: error: nowhere: not a folder (expected a folder in Kaggle layout)"]


def test_missing_params_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["prepare"]) == 1
    assert "params.yaml: not found" in capsys.readouterr().err
