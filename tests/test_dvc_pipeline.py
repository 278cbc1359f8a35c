"""`dvc repro` on a fresh copy of the repository with the shared 224-px set (real DVC)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.factories import REPO_ROOT, SHARED_DATA, kermany_layout

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SHARED_DATA / "chest_xray_224").is_dir(), reason="shared 224-px data absent"),
]


def _run(cmd: list[str], cwd: Path, stdout_only: bool = False) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout if stdout_only else proc.stdout + proc.stderr


def _ran(out: str) -> set[str]:
    """The stages a `dvc repro` ran, less `code` (it runs on every repro and only rewrites fingerprints)."""
    return {name for name in re.findall(r"Running stage '([^']+)'", out) if name != "code"}


def _up_to_date(clone: Path) -> bool:
    """`dvc status` has nothing to say but that the `code` stage always runs."""
    status = json.loads(_run(["dvc", "status", "--json"], clone, stdout_only=True) or "{}")
    return set(status) <= {"code"}


@pytest.fixture
def fresh_clone(tmp_path: Path) -> Path:
    """The repository's tracked files (as a clone would have them), in a new git repository."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO_ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    clone = tmp_path / "clone"
    for rel in filter(None, files):
        if (REPO_ROOT / rel).is_file() and not rel.startswith(("dvc.lock", "lineage/models.jsonl")):
            (clone / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / rel, clone / rel)
    _run(["git", "init", "-q"], clone)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], clone)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "clone"], clone)
    return clone


def _set_params(clone: Path, **changes: object) -> None:
    params = yaml.safe_load((clone / "params.yaml").read_text())
    for key, value in changes.items():
        *parents, name = key.split("__")
        node = params
        for part in parents:
            node = node[part]
        node[name] = value
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_repro_builds_the_dataset_then_does_nothing(fresh_clone):
    _set_params(fresh_clone, data__source="dir", data__dir=str(SHARED_DATA / "chest_xray_224"))
    out = _run(["dvc", "repro", "prepare"], fresh_clone)
    assert "Running stage 'fetch'" in out and "Running stage 'prepare'" in out
    splits = (fresh_clone / "data/prepared/splits.csv").read_text().splitlines()
    assert len(splits) == 1 + 5216 and splits[0].startswith("path,")
    quality = json.loads((fresh_clone / "reports/data_quality.json").read_text())
    assert quality["images_usable"] == 5216
    assert quality["splits"]["patient"]["leakage"]["clean"] is True
    assert quality["splits"]["seed"]["leakage"]["patients_shared"]["train-test"] > 0
    assert (fresh_clone / "reports/plots/class_distribution.png").is_file()

    again = _run(["dvc", "repro", "prepare"], fresh_clone)
    assert _ran(again) == set()
    # (which stages a parameter reruns follows from the params each stage declares: tests/test_stages.py)


def test_a_prefect_run_leaves_dvc_up_to_date_and_a_remote_round_trips(fresh_clone, make_dataset, tmp_path):
    from cxr.provenance.hashing import hash_tree, sha256_file

    source = make_dataset(kermany_layout(n_patients=12), root=tmp_path / "xrays")
    _set_params(
        fresh_clone,
        data__source="dir",
        data__dir=str(source),
        prepare__min_images_per_class=1,
        train__models=["smallnet"],
        ensemble__members=[],
        train__smallnet__epochs=1,
        train__common__steps_per_epoch=2,
        train__common__tensorboard=False,
        train__common__health__on_collapse="warn",
        input__image_size=32,
        input__batch_size=8,
        evaluate__bootstrap=50,
        evaluate__gradcam_per_outcome=1,
        export__formats=[],
    )
    env_home = tmp_path / "prefect-home"
    proc = subprocess.run(
        [sys.executable, "-m", "flows.pipeline"],
        cwd=fresh_clone,
        capture_output=True,
        text=True,
        timeout=900,
        env={
            **os.environ,
            "PREFECT_HOME": str(env_home),
            "CXR_NO_PROGRESS": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        },
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    states = json.loads(proc.stdout.strip().splitlines()[-1])
    assert states["dvc.lock"] == "committed"
    # whichever driver ran the pipeline, DVC agrees with the files on disk
    assert _up_to_date(fresh_clone)
    assert _ran(_run(["dvc", "repro"], fresh_clone)) == set()

    # a DVC remote (a local folder here; S3 in production) round-trips data and models
    remote = tmp_path / "remote"
    _run(["dvc", "remote", "add", "-d", "store", str(remote)], fresh_clone)
    _run(["dvc", "push"], fresh_clone)
    before = {
        "raw": hash_tree(fresh_clone / "data/raw"),
        "model": sha256_file(fresh_clone / "models/smallnet.keras"),
        "manifest": sha256_file(fresh_clone / "data/prepared/manifest.csv"),
    }
    shutil.rmtree(fresh_clone / ".dvc/cache")
    shutil.rmtree(fresh_clone / "data/raw")
    (fresh_clone / "models/smallnet.keras").unlink()
    (fresh_clone / "data/prepared/manifest.csv").unlink()
    _run(["dvc", "pull"], fresh_clone)
    after = {
        "raw": hash_tree(fresh_clone / "data/raw"),
        "model": sha256_file(fresh_clone / "models/smallnet.keras"),
        "manifest": sha256_file(fresh_clone / "data/prepared/manifest.csv"),
    }
    assert after == before
    assert _up_to_date(fresh_clone)


def test_repro_trains_each_model_then_reruns_exactly_what_a_change_touches(fresh_clone, make_dataset, tmp_path):
    """Every stage of the shipped dvc.yaml on 400 of the real films (the full set's prepare is the test
    above), two models, their ensemble and an outside set; then one change at a time."""
    inbox = tmp_path / "inbox"
    _copy_class_files(inbox, {"NORMAL": slice(0, 200), "PNEUMONIA": slice(0, 200)})
    site = make_dataset(
        {
            "NORMAL": [f"IM-{900 + i:04d}-0001.jpeg" for i in range(5)],
            "PNEUMONIA": [f"person{900 + i}_virus_{i}.jpeg" for i in range(5)],
        },
        root=tmp_path / "site_b",
    )
    _set_params(
        fresh_clone,
        data__source="dir",
        data__dir=str(inbox),
        input__image_size=64,
        train__models=["smallnet", "cxrnet"],
        train__common__steps_per_epoch=4,
        train__common__tensorboard=False,
        train__common__health__on_collapse="warn",
        train__smallnet__epochs=1,
        train__cxrnet__epochs=1,
        evaluate__bootstrap=50,
        evaluate__gradcam_per_outcome=1,
        evaluate__external={"site_b": str(site)},
        ensemble__members=["smallnet", "cxrnet"],
    )
    out = _run(["dvc", "repro"], fresh_clone)
    for stage in ("fetch", "prepare", "preview", "train@smallnet", "train@cxrnet", "external@site_b", "export"):
        assert f"Running stage '{stage}'" in out
    for stage in ("ensemble", "evaluate", "explain", "report"):
        assert f"Running stage '{stage}'" in out
    for model in ("smallnet", "cxrnet"):
        card = json.loads((fresh_clone / f"models/{model}.card.json").read_text())
        assert card["epochs_run"] == 1 and card["data"]["train_images"] > 150
        assert (fresh_clone / f"reports/train/{model}/metrics.json").is_file()
    metrics = json.loads((fresh_clone / "reports/metrics.json").read_text())
    assert set(metrics["external"]["site_b"]["models"]) == {"smallnet", "cxrnet", "ensemble"}
    assert metrics["external"]["site_b"]["n"] == 10
    shown = _run(["dvc", "metrics", "show", "--json"], fresh_clone)
    assert "reports/train/smallnet/metrics.json" in shown
    assert '"site_b"' in shown and '"ensemble"' in shown  # dvc metrics / exp show list the external figures
    exported = json.loads((fresh_clone / "exports/index.json").read_text())["exports"]
    assert {(r["model"], r["format"]) for r in exported} == {("smallnet", "onnx"), ("cxrnet", "onnx")}
    assert all((fresh_clone / r["folder"] / r["file"]).is_file() for r in exported)
    # the evaluation's DVC plots: every kind, per model, on the test split and the external set
    plots = json.loads(_run(["dvc", "plots", "show", "--json"], fresh_clone))["data"]
    for kind in ("roc", "pr", "calibration", "confusion"):
        for where in ("test", "external-site_b"):
            assert f"reports/eval/curves/{kind}/{where}/ensemble.csv" in plots
    assert _ran(_run(["dvc", "repro"], fresh_clone)) == set()
    assert _up_to_date(fresh_clone)

    # one model's parameter: that model's training and promotion (what follows reruns only when the
    # promotion ships a new model), not the other model
    _set_params(fresh_clone, train__smallnet__learning_rate=0.0005)
    changed = _ran(_run(["dvc", "repro"], fresh_clone))
    assert {"train@smallnet", "promote@smallnet"} <= changed
    assert not changed & {"fetch", "prepare", "preview", "train@cxrnet", "external@site_b"}

    # a new image in the external folder, and the threshold chosen on that set: its index and everything
    # scored on it rerun, no training; the report says where the threshold came from. (One round: which
    # stages a parameter alone reruns is tests/test_stages.py's check, for both drivers.)
    shutil.copy(next((site / "NORMAL").glob("*.jpeg")), site / "NORMAL" / "IM-0999-0001.jpeg")
    _set_params(fresh_clone, evaluate__threshold_source="external:site_b")
    changed = _ran(_run(["dvc", "repro"], fresh_clone))
    assert {"external@site_b", "evaluate", "report"} <= changed
    assert not changed & {"fetch", "prepare", "train@smallnet", "train@cxrnet", "ensemble"}
    metrics = json.loads((fresh_clone / "reports/metrics.json").read_text())
    assert metrics["external"]["site_b"]["n"] == 11
    assert metrics["external"]["site_b"]["models"]["ensemble"]["threshold_chosen_on_this_set"] is True
    assert "threshold chosen on this set" in (fresh_clone / "reports/report.html").read_text()


def _copy_class_files(target: Path, per_class: dict[str, slice]) -> None:
    for class_name, part in per_class.items():
        files = sorted((SHARED_DATA / "chest_xray_224/train" / class_name).glob("*.jpeg"))[part]
        (target / class_name).mkdir(parents=True, exist_ok=True)
        for path in files:
            shutil.copy2(path, target / class_name / path.name)


def _flip_a_third(folder: Path) -> None:
    """Move every third film of each class into the other class's folder: a third of the labels wrong."""
    moves = []
    for source, target in (("NORMAL", "PNEUMONIA"), ("PNEUMONIA", "NORMAL")):
        moves += [(path, folder / target / path.name) for path in sorted((folder / source).glob("*.jpeg"))[::3]]
    for path, target in moves:
        path.rename(target)


def test_repro_keeps_the_champion_when_a_mislabelled_retrain_is_worse(fresh_clone, tmp_path):
    """The gate inside `dvc repro` on real films. (A better challenger shipping, the rollback and the audit
    after it: tests/test_promotion.py, through the same CLI.)"""
    from cxr.provenance.hashing import sha256_file

    inbox, reference = tmp_path / "inbox", tmp_path / "reference"
    _copy_class_files(inbox, {"NORMAL": slice(0, 160), "PNEUMONIA": slice(0, 160)})
    _copy_class_files(reference, {"NORMAL": slice(700, 790), "PNEUMONIA": slice(2500, 2590)})
    _set_params(
        fresh_clone,
        data__source="dir",
        data__dir=str(inbox),
        train__models=["smallnet"],
        ensemble__members=[],
        input__image_size=64,
        input__batch_size=16,
        train__common__tensorboard=False,
        train__common__health__on_collapse="warn",
        train__common__ema=False,  # a few short epochs: the weight average would still be near the initial weights
        train__smallnet__epochs=8,
        evaluate__external={"ref": str(reference)},
        evaluate__bootstrap=50,
        promotion__reference="ref",
        promotion__bootstrap=300,
        export__formats=[],
    )
    model = fresh_clone / "models/smallnet.keras"

    def decision() -> dict:
        return json.loads((fresh_clone / "reports/train/smallnet/promotion.json").read_text())

    out = _run(["dvc", "repro", "promote@smallnet"], fresh_clone)
    assert {"train@smallnet", "promote@smallnet", "external@ref"} <= _ran(out)
    assert decision()["outcome"] == "first model"
    print(decision()["line"])  # the decisions, for the record (pytest -s shows them)
    champion = sha256_file(model)

    # new data, a third of its labels wrong: dvc repro succeeds, the champion stays byte for byte
    _flip_a_third(inbox)
    out = _run(["dvc", "repro", "promote@smallnet"], fresh_clone)
    assert "Running stage 'train@smallnet'" in out and "Running stage 'promote@smallnet'" in out
    lost = decision()
    print(lost["line"])
    assert lost["promoted"] is False and lost["outcome"] == "not promoted", lost["line"]
    assert sha256_file(model) == champion
    assert "not promoted" in out and "stays" in out  # the decision's line in dvc repro's output
    listed = json.loads(_run(["cxr", "models", "list", "smallnet", "--json"], fresh_clone, stdout_only=True))
    status = {r["id"]: r["status"] for r in listed}
    assert status[lost["challenger"]["id"]].startswith("challenger, not promoted: ")
    # the stages ran with these params, and their outputs are what the gate left: nothing to do
    status = json.loads(
        _run(["dvc", "status", "--json", "--with-deps", "promote@smallnet"], fresh_clone, stdout_only=True) or "{}"
    )
    assert set(status) <= {"code"}, status
    metrics = json.loads(_run(["dvc", "metrics", "show", "--json"], fresh_clone, stdout_only=True))
    assert "reports/train/smallnet/promotion.json" in json.dumps(metrics)
