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
    edited["stages"]["train"]["do"]["deps"].remove("data/code/train.sha256")
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
    assert "cxr/cli.py" not in {p for s in STAGES for p in s.code()}  # only its part: see the fingerprint


def test_a_fingerprint_ignores_comments_docstrings_logs_and_messages_but_not_statements():
    from cxr.provenance.code_closure import normalised_tree

    base = textwrap.dedent('''
        """Module doc."""
        import logging
        log = logging.getLogger(__name__)

        def f(x):
            """Doc."""
            log.info("computing %s", x)  # a comment
            if x < 0:
                raise ValueError(f"x={x} is negative; give a positive number")
            return x * 2
    ''')
    same = (
        base.replace("Module doc.", "Other doc.")
        .replace("# a comment", "# another")
        .replace("computing %s", "now computing %s")
        .replace("give a positive number", "try again")
    )
    assert normalised_tree(base) == normalised_tree(same)
    for computing in (base.replace("x * 2", "x * 3"), base.replace("x < 0", "x <= 0"), base + "\nY = 1\n"):
        assert normalised_tree(base) != normalised_tree(computing)


def test_each_step_fingerprints_only_its_own_command_of_the_cli():
    from cxr.provenance.code_closure import fingerprint
    from cxr.stages import stage

    evaluate, train = stage("evaluate"), stage("train")
    others = tuple(f"_cmd_{s.command}" for s in STAGES if s.command != "evaluate")
    assert "_cmd_train" in others and "_cmd_evaluate" not in others
    assert evaluate.fingerprint() == fingerprint(evaluate.code(), partial=[("cxr/cli.py", others)])
    assert len({s.fingerprint() for s in STAGES}) == len(STAGES)  # every step has its own
    assert train.fingerprint_file == "data/code/train.sha256"


def test_every_declared_setting_exists_in_the_shipped_params():
    params = load_params(REPO / "params.yaml")
    for st in STAGES:
        items = params["train"]["models"] if st.foreach == "train.models" else [None]
        for item in items:
            for key, value in settings_of(st.name, params, item).items():
                assert value is not None or key.startswith("train."), f"{st.name}: {key} is not in params.yaml"
    assert inputs_of("fetch", params) == [params["data"]["dir"], "cxr/data/sample_data"]  # + the demo sample


# --- DVC and Prefect agree on what a change touches -------------------------------------------------
_DECISIONS_SCRIPT = textwrap.dedent("""
    import json, sys, types
    from dvc.repo import Repo

    # DVC first: `dvc repro code` (rewrites the fingerprints), then what `dvc status` would list
    with Repo(".") as repo:
        repo.reproduce("code", single_item=True)
        dvc = sorted(name for name in repo.status() if name != "code")  # code: always changed

    from cxr.config import load_params
    from cxr.stages import inputs_of, settings_of
    from tasks.evaluate import ensemble_task, evaluate_task, explain_task, report_task
    from tasks.export import export_task
    from tasks.fetch import fetch_task
    from tasks.prepare import prepare_task
    from tasks.train import preview_task, promote_task, train_task

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
        f"promote@{model}": (promote_task, dict(model=model, inputs=inputs_of("promote", params, model),
                                                params_path="params.yaml",
                                                settings=settings_of("promote", params, model))),
        "export": (export_task, dict(inputs=inputs_of("export", params), params_path="params.yaml",
                                     settings=settings_of("export", params))),
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
    print(json.dumps({"dvc": dvc, "keys": keys}))
""")


def _placeholders(root: Path) -> None:
    """Every dependency and output of the stages, as tiny files, so `dvc commit` can write a lock."""
    for folder in (
        "inbox",
        "data/raw/NORMAL",
        "models",
        "registry/smallnet",
        "ensemble",
        "exports",
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
        "models/smallnet.domain.npz",
        "reports/train/smallnet/summary.txt",
        "reports/train/smallnet/metrics.json",
        "reports/train/smallnet/history.csv",
        "reports/train/smallnet/curves.png",
        "reports/train/smallnet/architecture.png",
        "reports/train/smallnet/promotion.json",
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
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the `cxr` the code stage runs
    for command in (
        ["git", "init", "-q"],
        [sys.executable, "-m", "dvc", "init", "-q"],
        [sys.executable, "-m", "cxr", "stages", "--fingerprints"],
        [sys.executable, "-m", "dvc", "commit", "-f", "-q"],
    ):
        proc = subprocess.run(command, cwd=root, capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr
    return root, env


def _decisions(root: Path, env: dict[str, str]) -> tuple[set[str], dict[str, str]]:
    """(the stages DVC would rerun, each Prefect task's cache key), from one process with the project's
    code: DVC's ``code`` stage first rewrites the fingerprints (``dvc repro code``), then ``dvc status``
    lists the steps whose fingerprint or data changed, then each task's cache policy computes its key."""
    proc = subprocess.run([sys.executable, "-c", _DECISIONS_SCRIPT], cwd=root, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    return set(found["dvc"]), found["keys"]


def _commit(root: Path, env: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "commit", "-f", "-q"], cwd=root, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def _changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {name for name in before if before[name] != after[name]}


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path}: {old!r} not found"
    path.write_text(text.replace(old, new, 1))


@pytest.mark.slow
def test_dvc_and_prefect_rerun_the_same_stages_after_a_code_or_param_change(locked_project):
    root, env = locked_project
    dvc, base = _decisions(root, env)
    assert dvc == set()

    # a comment, a docstring, a log line and an error message in modules every step imports: nothing reruns
    with (root / "cxr" / "errors.py").open("a") as fh:
        fh.write("\n# an edit\n")
    _edit(root / "cxr/runtime.py", '"""', '"""A reworded docstring. ')
    _edit(root / "cxr/common/metrics.py", 'raise ValueError("', 'raise ValueError("reworded: ')
    dvc, after = _decisions(root, env)
    assert dvc == _changed(base, after) == set()

    # a statement in shared code (precision and seeding): every step that imports it, and only those
    with (root / "cxr" / "runtime.py").open("a") as fh:
        fh.write("\n_AN_EDIT = 1\n")
    dvc, after = _decisions(root, env)
    assert (
        dvc
        == _changed(base, after)
        == {
            "preview",
            "train@smallnet",
            "promote@smallnet",
            "export",
            "ensemble",
            "evaluate",
            "explain",
            "report",
        }
    )
    _commit(root, env)  # a commit changes no fingerprint, setting or input: the keys are still `after`

    # the CLI: one command's handler reruns its step alone; the shared dispatch reruns every step
    base = after
    _edit(
        root / "cxr/cli.py",
        "def _cmd_evaluate(args: argparse.Namespace) -> int:\n",
        "def _cmd_evaluate(args: argparse.Namespace) -> int:\n    _edit = 1\n",
    )
    dvc, after = _decisions(root, env)
    assert dvc == _changed(base, after) == {"evaluate"}
    _commit(root, env)
    base = after
    _edit(root / "cxr/cli.py", "def main(", "_DISPATCH_EDIT = 1\n\n\ndef main(")
    dvc, after = _decisions(root, env)
    assert dvc == _changed(base, after) == {s for s in base}
    _commit(root, env)  # (the next round shows that the commit left nothing but the parameter to rerun)

    base = after
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["evaluate"]["bootstrap"] = 10
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc, after = _decisions(root, env)
    assert dvc == _changed(base, after) == {"evaluate", "explain", "report"}


def test_fingerprints_computed_from_several_threads_at_once_agree():
    """The Prefect flow computes several training tasks' cache keys at once; CPython 3.11's parser is
    not thread-safe (``AST constructor recursion depth mismatch``), so parses are serialised."""
    import threading

    from cxr.provenance import code_closure

    expected = {s.name: s.fingerprint() for s in STAGES}
    code_closure._normalised_file.cache_clear()
    seen, errors = [], []

    def work() -> None:
        try:
            seen.append({s.name: s.fingerprint() for s in STAGES})
        except Exception as exc:  # the bug surfaced as SystemError
            errors.append(repr(exc))

    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and seen == [expected] * 6
