"""Every script in ``benchmarks/`` runs to its JSON on tiny synthetic data, so a change of a default
cannot break one silently (``train_throughput.py`` crashed once the default image size became 160 px
and nobody ran it). These are smoke runs: they check that the figures come out, not their values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.factories import REPO_ROOT, prepared_project, small_params, write_raw

BENCH = REPO_ROOT / "benchmarks"
pytestmark = pytest.mark.slow


def _bench(script: str, *args: str, cwd: Path | None = None) -> list[dict[str, Any]]:
    """Run one benchmark in a fresh interpreter; its JSON lines (anything else it prints is skipped)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "CXR_NO_PROGRESS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        cwd=cwd or REPO_ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    rows = []
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            rows.append(json.loads(line))
    assert rows, f"{script} printed no JSON:\n{proc.stdout[-2000:]}"
    return rows


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """{NORMAL,PNEUMONIA}/ of 32-px synthetic films, 12 patients each."""
    root = tmp_path_factory.mktemp("bench-images")
    write_raw(root, n_patients=12, hostile=False)
    return root


def test_train_throughput_builds_the_model_at_the_size_it_feeds(images: Path) -> None:
    [row] = _bench(
        "train_throughput.py",
        *("--data", str(images), "--steps", "2", "--repeats", "1", "--warmup", "1"),
        *("--image-size", "32", "--batch-size", "4", "--precision", "float32"),
    )
    assert row["image_size"] == 32 and row["images_per_s"] > 0 and row["notebook_images_per_s"] > 0


def test_input_pipeline_benchmark(images: Path) -> None:
    rows = _bench(
        "input_pipeline.py", "--data", str(images), "--epochs", "1", "--repeats", "1", "--notebook-images", "8"
    )
    assert any(isinstance(v, int | float) and v > 0 for v in rows[-1].values())


def test_prepare_speed_benchmark(images: Path) -> None:
    rows = _bench("prepare_speed.py", "--data", str(images), "--repeats", "1")
    assert rows[-1].get("peak_rss_mb_by_files")


def test_predict_and_serve_speed_benchmarks(trained: Path, images: Path) -> None:
    model = str(trained / "models/smallnet.keras")
    [row] = _bench("predict_speed.py", "--model", model, "--data", str(images), "-n", "4", "--repeats", "1")
    assert any(isinstance(v, int | float) and v > 0 for v in row.values())
    rows = _bench(
        "serve_speed.py", "--model", model, "--data", str(images), "-n", "4", "--clients", "2", "--batch-files", "2"
    )
    assert rows[0]["startup_s"] > 0 and len(rows) == 5  # start-up, 1 client, 2 clients, then 2 batch runs
    assert all(r["images_per_s"] > 0 for r in rows[3:])


def test_domain_check_benchmark(trained: Path, images: Path, tmp_path: Path) -> None:
    import shutil

    workspace = tmp_path / "ws"
    shutil.copytree(trained, workspace)
    model = str(workspace / "models/smallnet.keras")
    [row] = _bench("domain_check.py", "--workspace", str(workspace), "--model", model, "--external", str(images))
    assert 0 <= row["in_domain"]["external"] <= 1 and row["n"]["corpus"] >= 2
    assert set(row["flagged"]) == {"non_chest_corpus", "upside_down", "rotated_90", "inverted"}


def test_recipes_then_the_preregistered_comparison(tmp_path: Path, images: Path) -> None:
    params = small_params()
    workspace = prepared_project(tmp_path / "ws", params, hostile=False)
    tiny = (
        "model=smallnet,input.image_size=32,input.batch_size=8,input.normalize=none,train.smallnet.epochs=1,"
        "train.common.tensorboard=false,train.common.precision=float32,train.common.health.on_collapse=warn"
    )
    args = ["--workspace", str(workspace), "--external", str(images), "--bootstrap", "20"]
    args += ["--out", str(tmp_path / "recipes.jsonl")]
    _bench("recipes.py", *args, "--recipe", f"a:{tiny}", "--recipe", f"b:{tiny},train.common.seed=7")
    rows = [json.loads(line) for line in (tmp_path / "recipes.jsonl").read_text().splitlines()]
    assert [r["recipe"] for r in rows] == ["a", "b"] and all(0 <= r["ext_auc"] <= 1 for r in rows)
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "compare_recipes.py"),
            *("--workspace", str(workspace), "--external", str(images), "--results", str(tmp_path / "recipes.jsonl")),
            *("--baseline", "a", "--ensemble", "ab=a+b", "--bootstrap", "20", "--out", str(tmp_path / "cmp.json")),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    compared = {r["candidate"]: r for r in json.loads((tmp_path / "cmp.json").read_text())}
    assert set(compared) == {"a", "b", "ab"} and compared["ab"]["members"] == ["a", "b"]
    assert compared["a"]["passes_rule"] is False  # the baseline never "beats" itself
    assert "| ab |" in proc.stdout


def test_hostile_memory_benchmark(trained: Path) -> None:
    rows = _bench(
        "hostile_memory.py",
        *("--project", str(trained), "--model", "smallnet", "--clients", "3", "--dicom-side", "400"),
    )
    by = {(r["tool"], r["input"]): r for r in rows}
    assert by[("predict", "dicom")]["rc"] == 0 and by[("predict", "png_bomb")]["rc"] == 1
    assert by[("predict", "over_byte_cap")]["rc"] == 1
    assert sum(by[("serve", "dicom")]["statuses"].values()) == 3 and by[("serve", "dicom")]["peak_mb"] > 0
    assert by[("serve", "png_bomb")]["statuses"] == {"422": 3}
