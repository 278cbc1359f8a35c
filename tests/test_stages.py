"""The stage registry drives dvc.yaml, the Prefect cache policies and the training run key; DVC and
Prefect must decide to rerun exactly the same stages after a change."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from cxr.config import load_params
from cxr.stages import STAGES, dvc_yaml_drift, import_closure, inputs_of, settings_of

REPO = Path(__file__).resolve().parents[1]


def test_dvc_yaml_is_generated_from_the_registry():
    assert dvc_yaml_drift(REPO / "dvc.yaml") == []


def test_a_hand_edit_of_dvc_yaml_is_reported(tmp_path):
    edited = yaml.safe_load((REPO / "dvc.yaml").read_text())
    edited["stages"]["train"]["do"]["deps"].remove("cxr/runtime.py")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(edited))
    assert dvc_yaml_drift(tmp_path / "dvc.yaml") == ["stage train: differs from the registry"]


def test_code_deps_are_the_import_closure_including_lazy_imports():
    train = import_closure("cxr.training.train")
    assert "cxr/runtime.py" in train  # precision and seeding: missed by the hand-kept lists
    assert "cxr/training/models.py" in train and "cxr/config.py" in train
    assert "cxr/training/__init__.py" in train and "cxr/__init__.py" in train
    fetch = import_closure("cxr.data.fetch")
    assert "cxr/data/kaggle.py" in fetch
    # the strict config (and the builders' declared options it checks) is every step's code; no TensorFlow code is
    assert not {"cxr/runtime.py", "cxr/training/models.py", "cxr/training/train.py"} & set(fetch)
    assert "cxr/cli.py" not in {p for s in STAGES for p in s.code()}


def test_every_declared_setting_exists_in_the_shipped_params():
    params = load_params(REPO / "params.yaml")
    for st in STAGES:
        items = params["train"]["models"] if st.foreach == "train.models" else [None]
        for item in items:
            for key, value in settings_of(st.name, params, item).items():
                assert value is not None or key.startswith("train."), f"{st.name}: {key} is not in params.yaml"
    assert inputs_of("fetch", params) == [params["data"]["dir"], "cxr/data/sample_data"]  # + the demo sample


# --- DVC and Prefect agree on what a change touches -------------------------------------------------
_KEYS_SCRIPT = textwrap.dedent("""
    import json, sys, types
    from cxr.config import load_params
    from cxr.stages import inputs_of, settings_of
    from tasks.evaluate import ensemble_task, evaluate_task, explain_task, report_task
    from tasks.fetch import fetch_task
    from tasks.prepare import prepare_task
    from tasks.train import preview_task, train_task

    params = load_params("params.yaml")
    model = params["train"]["models"][0]
    calls = {
        "fetch": (fetch_task, dict(settings=settings_of("fetch", params), inputs=inputs_of("fetch", params),
                                   source_digest=None)),
        "prepare": (prepare_task, dict(raw_dir="data/raw", settings=settings_of("prepare", params))),
        "preview": (preview_task, dict(inputs=inputs_of("preview", params), params_path="params.yaml",
                                       settings=settings_of("preview", params))),
        f"train@{model}": (train_task, dict(model=model, inputs=inputs_of("train", params, model),
                                            params_path="params.yaml", settings=settings_of("train", params, model))),
        "ensemble": (ensemble_task, dict(inputs=inputs_of("ensemble", params), params_path="params.yaml",
                                         settings=settings_of("ensemble", params))),
        "evaluate": (evaluate_task, dict(models=[model], inputs=inputs_of("evaluate", params),
                                         params_path="params.yaml", settings=settings_of("evaluate", params))),
        "explain": (explain_task, dict(models=[model], inputs=inputs_of("explain", params),
                                       params_path="params.yaml", settings=settings_of("explain", params))),
        "report": (report_task, dict(models=[model], inputs=inputs_of("report", params),
                                     settings=settings_of("report", params))),
    }
    keys = {name: task.cache_policy.compute_key(types.SimpleNamespace(task=task), kwargs, {})
            for name, (task, kwargs) in calls.items()}
    print(json.dumps(keys))
""")


def _placeholders(root: Path) -> None:
    """Every dependency and output of the stages, as tiny files, so `dvc commit` can write a lock."""
    for folder in (
        "inbox",
        "data/raw/NORMAL",
        "models",
        "ensemble",
        "data/external",
        "reports/eval",
        "reports/gradcam",
        "reports/plots",
    ):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "placeholder.txt").write_text(folder)
    for name in (
        "data/fetch.json",
        "data/prepared/manifest.csv",
        "data/prepared/splits.csv",
        "reports/data_quality.json",
        "reports/plots/class_distribution.png",
        "reports/plots/augmented_batch.png",
        "models/smallnet.keras",
        "models/smallnet.card.json",
        "reports/train/smallnet/summary.txt",
        "reports/train/smallnet/metrics.json",
        "reports/train/smallnet/history.csv",
        "reports/train/smallnet/curves.png",
        "reports/train/smallnet/architecture.png",
        "reports/metrics.json",
        "reports/report.html",
        "reports/report.md",
    ):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(
            "{}" if name.endswith(".json") else "epoch,val_auc\n1,0.5\n" if name.endswith(".csv") else name
        )


@pytest.fixture
def locked_project(tmp_path):
    root = tmp_path / "project"
    for item in ("cxr", "tasks", "flows", "dvc.yaml", "params.yaml"):
        src = REPO / item
        (
            shutil.copytree(src, root / item, ignore=shutil.ignore_patterns("__pycache__"))
            if src.is_dir()
            else (root.mkdir(exist_ok=True), shutil.copy(src, root / item))
        )
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update(source="dir", dir="inbox")
    params["train"]["models"] = ["smallnet"]
    params["ensemble"]["members"] = []
    params["evaluate"]["external"] = {}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _placeholders(root)
    env = {**os.environ, "PYTHONPATH": str(root), "PREFECT_HOME": str(tmp_path / "prefect")}
    for command in (
        ["git", "init", "-q"],
        [sys.executable, "-m", "dvc", "init", "-q"],
        [sys.executable, "-m", "dvc", "commit", "-f", "-q"],
    ):
        proc = subprocess.run(command, cwd=root, capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr
    return root, env


def _decisions(root: Path, env: dict[str, str]) -> tuple[set[str], dict[str, str]]:
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"], cwd=root, capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    dvc = {name for name in json.loads(proc.stdout or "{}")}
    proc = subprocess.run([sys.executable, "-c", _KEYS_SCRIPT], cwd=root, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return dvc, json.loads(proc.stdout)


def test_dvc_and_prefect_rerun_the_same_stages_after_a_code_or_param_change(locked_project):
    root, env = locked_project
    dvc, before = _decisions(root, env)
    assert dvc == set()

    with (root / "cxr" / "runtime.py").open("a") as fh:  # precision and seeding code
        fh.write("\n# an edit\n")
    dvc, after = _decisions(root, env)
    prefect = {name for name in before if before[name] != after[name]}
    assert dvc == prefect == {"preview", "train@smallnet", "ensemble", "evaluate", "explain", "report"}

    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "commit", "-f", "-q"], cwd=root, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    dvc3, base = _decisions(root, env)
    assert dvc3 == set()
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["evaluate"]["bootstrap"] = 10
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc4, changed = _decisions(root, env)
    prefect4 = {name for name in base if base[name] != changed[name]}
    assert dvc4 == prefect4 == {"evaluate", "explain", "report"}
