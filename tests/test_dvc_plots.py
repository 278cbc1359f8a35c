"""DVC shows the results: the generated ``dvc.yaml`` declares the evaluation's ROC, precision–recall,
reliability and confusion data as plots and the shipped models as artifacts, and real DVC reads them.

A copy of the small evaluated project becomes a git + DVC repository with the repository's own
``dvc.yaml`` and ``.gitignore``; two commits hold two evaluations (the second at another threshold),
and ``dvc plots diff`` / ``dvc metrics diff`` compare them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.factories import REPO_ROOT, chdir, small_params

KINDS = ("roc", "pr", "calibration", "confusion")
FIELDS = {"roc": ("fpr", "tpr"), "pr": ("recall", "precision"), "calibration": ("mean_predicted", "fraction_positive")}


def _run(cmd: list[str], cwd: Path) -> str:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def repo(evaluated: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The evaluated project with the repository's dvc.yaml, .gitignore and code, as a git + DVC repository
    whose first commit holds the first evaluation."""
    root = tmp_path_factory.mktemp("dvc-plots") / "project"
    shutil.copytree(evaluated, root)
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO_ROOT / name, root / name)
    shutil.copytree(REPO_ROOT / "cxr", root / "cxr", ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "cxr", "stages", "--fingerprints"], root)  # what the `code` stage writes
    _run(["git", "init", "-q"], root)
    _run(["dvc", "init", "-q"], root)
    _run(["git", "add", "-A"], root)
    _run(["git", "commit", "-qm", "experiment 1: the shipped (validation) threshold"], root)
    _run(["git", "tag", "experiment-1"], root)
    return root


@pytest.mark.slow
def test_the_kept_files_are_the_metrics_and_plot_data(repo):
    tracked = _run(["git", "ls-files", "reports"], repo).split()
    curves = sorted(p for p in tracked if p.startswith("reports/eval/"))
    assert curves == sorted(f"reports/eval/curves/{k}/test/smallnet.csv" for k in KINDS)
    assert "reports/metrics.json" in tracked and "reports/train/smallnet/history.csv" in tracked
    assert not any(p.endswith((".png", ".html", "predictions.csv")) for p in tracked)


@pytest.mark.slow
def test_dvc_plots_diff_shows_roc_pr_confusion_across_two_experiments(repo):
    metrics = json.loads((repo / "reports/metrics.json").read_text())["models"]["smallnet"]
    confusion = (repo / "reports/eval/curves/confusion/test/smallnet.csv").read_text().splitlines()
    assert confusion[0] == "actual,predicted" and len(confusion) == 1 + metrics["n"]
    counts = metrics_confusion(confusion)
    assert counts == {("NORMAL", "NORMAL"): 6, ("PNEUMONIA", "PNEUMONIA"): 6}  # the fixture's perfect split

    # experiment 2: the same model scored at a fixed threshold nothing reaches
    from cxr.config import parse_params
    from cxr.evaluation.evaluate import evaluate_models

    params = small_params()
    params["evaluate"].update(threshold_source="fixed", threshold=0.999)
    config = parse_params(params)
    with chdir(repo):
        evaluate_models(["smallnet"], config.evaluate, config.input)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "experiment 2: fixed threshold 0.999"], repo)
    _run(["git", "tag", "experiment-2"], repo)

    revs = {"experiment-1", "experiment-2"}
    shown = json.loads(_run(["dvc", "plots", "diff", "experiment-1", "experiment-2", "--json"], repo))
    for kind in KINDS:
        plot_id = f"reports/eval/curves/{kind}/test/smallnet.csv"
        (plot,) = shown["data"][plot_id]
        assert plot["type"] == "vega" and set(plot["revisions"]) == revs
        values = _find_values(plot["content"])
        assert {v["rev"] for v in values} == revs
        if kind in FIELDS:
            x, y = FIELDS[kind]
            spec = json.dumps(plot["content"])
            assert f'"field": "{x}"' in spec and f'"field": "{y}"' in spec  # the declared axes
            assert all(x in v and y in v for v in values)
    confusion = _find_values(shown["data"]["reports/eval/curves/confusion/test/smallnet.csv"][0]["content"])
    before = {(v["actual"], v["predicted"]) for v in confusion if v["rev"] == "experiment-1"}
    after = {(v["actual"], v["predicted"]) for v in confusion if v["rev"] == "experiment-2"}
    assert ("PNEUMONIA", "PNEUMONIA") in before and after == {("NORMAL", "NORMAL"), ("PNEUMONIA", "NORMAL")}
    # (the PNG plots are not kept in git, so only the workspace has them; the curves have no errors)
    assert not [e for e in shown.get("errors") or [] if str(e.get("name")).startswith("reports/eval/curves/")]

    # dvc metrics diff reads the kept metric files of both commits
    diff = json.loads(_run(["dvc", "metrics", "diff", "experiment-1", "experiment-2", "--json"], repo))
    changed = diff["reports/metrics.json"]
    assert changed["models.smallnet.threshold"]["new"] == 0.999
    assert changed["models.smallnet.sensitivity"]["new"] == 0.0

    # dvc plots show (the workspace) renders every kind without errors
    workspace = json.loads(_run(["dvc", "plots", "show", "--json"], repo))
    assert all(f"reports/eval/curves/{k}/test/smallnet.csv" in workspace["data"] for k in KINDS)


def metrics_confusion(lines: list[str]) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for line in lines[1:]:
        actual, predicted = line.split(",")
        counts[actual, predicted] = counts.get((actual, predicted), 0) + 1
    return counts


def _find_values(content: dict) -> list[dict]:
    """The data rows of a Vega-Lite spec (the confusion template nests them under ``data.values``)."""
    if isinstance(content.get("data"), dict) and "values" in content["data"]:
        return content["data"]["values"]
    for value in content.values():
        if isinstance(value, dict) and (found := _find_values(value)):
            return found
    return []


@pytest.mark.slow
def test_dvc_reads_the_generated_dvc_yaml_and_artifacts_get_fetches_a_model(repo, tmp_path):
    # DVC itself parses and validates the generated dvc.yaml (stages, plots, artifacts)
    mermaid = _run(["dvc", "dag", "--mermaid"], repo)
    assert mermaid.lstrip().startswith("flowchart") and "evaluate" in mermaid and "promote@smallnet" in mermaid
    # record the trained model in DVC (as `dvc repro` would), commit it and register a version
    (repo / "data/external").mkdir(parents=True, exist_ok=True)  # the promote stage's (empty) external indexes
    _run(["dvc", "commit", "-f", "train@smallnet", "promote@smallnet"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "lock smallnet"], repo)
    _run(["git", "tag", "-a", "smallnet@v0.1.0", "-m", "Registering artifact smallnet version v0.1.0"], repo)
    out = tmp_path / "fetched.keras"
    _run(["dvc", "artifacts", "get", str(repo), "smallnet", "-o", str(out)], tmp_path)
    from cxr.provenance.hashing import sha256_file

    card = json.loads((repo / "models/smallnet.card.json").read_text())
    assert sha256_file(out) == card["model_sha256"]


def test_curves_cover_every_model_and_external_set_and_drop_stale_files(tmp_path):
    from cxr.evaluation.curves import write_plot_data

    out = tmp_path / "reports/eval"
    rows = "path,label,patient_id,probability\n" + "".join(
        f"x{i}.jpeg,{i % 2},p{i},{p}\n" for i, p in enumerate([0.1, 0.8, 0.45, 0.5, 0.7, 0.2])
    )
    for folder in ("a", "b", "a/external-site_b"):
        (out / folder).mkdir(parents=True, exist_ok=True)
        (out / folder / "predictions.csv").write_text(rows)
    stale = out / "curves/roc/test/gone.csv"
    stale.parent.mkdir(parents=True)
    stale.write_text("fpr,tpr\n")
    summary = {
        "models": {"a": {"threshold": 0.5}, "b": {"threshold": 0.75}},
        "external": {"site_b": {"models": {"a": {"threshold": 0.45}}}},
    }
    written = write_plot_data(out, summary)
    assert sorted(p.relative_to(out / "curves").as_posix() for p in written) == sorted(
        f"{kind}/{where}.csv" for kind in KINDS for where in ("test/a", "test/b", "external-site_b/a")
    )
    assert not stale.exists()  # a model no longer evaluated leaves no plot behind
    # labels 0 1 0 1 0 1, probabilities 0.1 0.8 0.45 0.5 0.7 0.2: predicted at or above the threshold
    confusion = out / "curves/confusion/{}.csv"
    assert metrics_confusion(Path(str(confusion).format("test/a")).read_text().splitlines()) == {
        ("NORMAL", "NORMAL"): 2,
        ("NORMAL", "PNEUMONIA"): 1,
        ("PNEUMONIA", "PNEUMONIA"): 2,
        ("PNEUMONIA", "NORMAL"): 1,
    }
    assert metrics_confusion(Path(str(confusion).format("test/b")).read_text().splitlines()) == {
        ("NORMAL", "NORMAL"): 3,
        ("PNEUMONIA", "PNEUMONIA"): 1,
        ("PNEUMONIA", "NORMAL"): 2,
    }
    assert (
        metrics_confusion(Path(str(confusion).format("external-site_b/a")).read_text().splitlines())[
            "NORMAL", "PNEUMONIA"
        ]
        == 2
    )  # 0.45 and 0.7
    roc = (out / "curves/roc/test/a.csv").read_text().splitlines()
    assert roc[0] == "fpr,tpr,threshold" and roc[1].startswith("0.0,0.0,") and roc[-1].startswith("1.0,1.0,")
    assert (out / "curves/pr/test/a.csv").read_text().startswith("recall,precision\n")
    assert (out / "curves/calibration/test/a.csv").read_text().startswith("mean_predicted,fraction_positive,count\n")


def test_dvc_yaml_declares_the_curves_and_the_shipped_models():
    import yaml

    from cxr.config import EnsembleConfig, TrainSection
    from cxr.evaluation.curves import CURVES

    generated = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    plots = {k: v for entry in generated["plots"] for k, v in entry.items()}
    assert set(plots) == {f"reports/eval/{CURVES}/{k}" for k in KINDS}
    confusion = plots["reports/eval/curves/confusion"]
    assert (confusion["template"], confusion["x"], confusion["y"]) == ("confusion", "actual", "predicted")
    assert plots["reports/eval/curves/roc"]["x"] == "fpr" and plots["reports/eval/curves/roc"]["y"] == "tpr"
    assert plots["reports/eval/curves/pr"]["x"] == "recall" and plots["reports/eval/curves/pr"]["y"] == "precision"
    assert plots["reports/eval/curves/calibration"]["y"] == "fraction_positive"
    artifacts = generated["artifacts"]
    assert list(artifacts) == [*TrainSection().models, "ensemble"] and EnsembleConfig().members
    for name, artifact in artifacts.items():
        assert artifact["type"] == "model" and {"cxr", "pneumonia", name} <= set(artifact["labels"])
        assert artifact["path"] == ("ensemble/ensemble.keras" if name == "ensemble" else f"models/{name}.keras")
        assert "not a medical device" in artifact["desc"]


def test_a_hand_edit_of_the_plots_or_artifacts_is_drift(tmp_path):
    import yaml

    from cxr.stages import dvc_yaml_drift

    generated = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    generated["plots"][0]["reports/eval/curves/roc"]["x"] = "threshold"
    del generated["artifacts"]["smallnet"]
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(generated))
    assert dvc_yaml_drift(tmp_path / "dvc.yaml") == [
        "plots: differs from the registry",
        "artifacts: differs from the registry",
    ]
