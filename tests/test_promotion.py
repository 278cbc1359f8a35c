"""Champion/challenger promotion, model versions with rollback, and the drift report.

The pure parts (the gate's conditions, the drift report, the version store) are tested on small
hand-made inputs; the whole path runs through the real CLI, real TensorFlow training and real
scoring on a small synthetic project with a fixed, clean reference set.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.factories import SPLIT, chdir, small_params, synthetic, write_raw

# ------------------------------------------------------------------------------------ pure parts


def _rows(n_normal: int, n_pneumonia: int, width: int = 100, intensity: float = 0.5, tag: str = "a") -> list[dict]:
    rows = []
    for i in range(n_normal + n_pneumonia):
        rows.append(
            {
                "path": f"data/raw/{tag}{i}.jpeg",
                "sha256": f"{tag}{i}",
                "label": "0" if i < n_normal else "1",
                "patient_id": f"p{tag}{i // 2}",
                "width": str(width),
                "height": str(width),
                "mean_intensity": str(intensity),
            }
        )
    return rows


def test_the_drift_report_counts_files_and_patients_and_warns_past_the_monitoring_thresholds():
    from cxr.config import MonitoringConfig
    from cxr.data.drift import compare

    old = _rows(50, 50)
    same = compare(old, old, MonitoringConfig())
    assert same["warnings"] == [] and same["files"]["new"] == same["files"]["changed"] == 0

    new = [*_rows(20, 80, width=160, intensity=0.7, tag="b")[:90], dict(old[0], sha256="edited")]
    report = compare(old, new, MonitoringConfig(), old_failures=0, new_failures=3, out_of_domain=0.2)
    assert report["files"] == {
        "new": 90,
        "removed": 99,
        "changed": 1,
        "unchanged": 0,
        "examples": report["files"]["examples"],
    }
    assert report["new"]["prevalence"] == pytest.approx(70 / 91)
    assert report["shifts"]["median_width"] == pytest.approx(0.6)
    text = " | ".join(report["warnings"])
    for expected in ("prevalence moved", "median image width", "median image height", "intensity", "outside"):
        assert expected in text
    assert report["new"]["decode_failures"] == 3 and report["patients"]["new"] > 0
    quiet = compare(old, new, MonitoringConfig(max_prevalence_shift=0.5, max_size_change=1, max_intensity_shift=0.5))
    assert quiet["warnings"] == []


def _entry(auc: float, sens: float, ood: float | None = None, health: str = "healthy") -> dict[str, Any]:
    return {"id": "x", "health": health, "reference": {"auc": auc, "sensitivity": sens, "out_of_domain": ood}}


def test_the_gate_names_each_condition_the_challenger_fails():
    from cxr.config import parse_params
    from cxr.evaluation.promotion import gate

    cfg = parse_params({})
    good = {"auc_difference": 0.0, "ci95": [-0.005, 0.01]}
    assert gate(cfg, _entry(0.9, 0.9), _entry(0.9, 0.9), good, None) == []
    failed = gate(
        cfg,
        _entry(0.9, 0.9, ood=0.01),
        _entry(0.85, 0.8, ood=0.05, health="collapsed"),
        {"auc_difference": -0.05, "ci95": [-0.08, -0.02]},
        {"warnings": ["prevalence moved"]},
    )
    assert [f.split(" ")[0] for f in failed] == ["health", "AUC", "sensitivity", "out"]
    held = parse_params({"monitoring": {"on_drift": "hold"}})
    assert gate(held, _entry(0.9, 0.9), _entry(0.9, 0.9), good, {"warnings": ["prevalence moved"]})[0].startswith(
        "data drift"
    )
    assert gate(cfg, _entry(0.9, 0.9), _entry(0.9, 0.9), {"auc_difference": None, "ci95": None}, None)


def test_promotion_settings_are_strict():
    from cxr.config import ConfigError, parse_params

    with pytest.raises(ConfigError, match=r"promotion\.policy"):
        parse_params({"promotion": {"policy": "sometimes"}})
    with pytest.raises(ConfigError, match="no external set of that name"):
        parse_params({"promotion": {"reference": "guangzhou"}})
    with pytest.raises(ConfigError, match=r"promotion\.auc_margin"):
        parse_params({"promotion": {"auc_margin": -0.1}})
    with pytest.raises(ConfigError, match=r"monitoring\.on_drift"):
        parse_params({"monitoring": {"on_drift": "panic"}})
    ok = parse_params({"evaluate": {"external": {"ref": "somewhere"}}, "promotion": {"reference": "ref"}})
    assert ok.promotion.reference == "ref"


def _fake_version(tmp: Path, name: str, payload: bytes) -> tuple[Path, Path]:
    from cxr.common.model_card import write_card
    from cxr.provenance.hashing import sha256_file

    folder = tmp / f"src-{payload.hex()[:6]}"
    folder.mkdir(parents=True)
    model = folder / f"{name}.keras"
    model.write_bytes(payload)
    card = folder / f"{name}.card.json"
    write_card(card, {"model": name, "model_sha256": sha256_file(model), "created": f"2026-01-0{len(payload) % 9}"})
    (folder / "history.csv").write_text(payload.decode())
    return model, card


def test_versions_are_stored_by_content_and_installed_byte_for_byte(tmp_path):
    from cxr.errors import CxrError
    from cxr.provenance import model_store
    from cxr.provenance.hashing import sha256_file

    root = tmp_path / "registry"
    shipped = model_store.Shipped("m", tmp_path / "models", tmp_path / "reports")
    model, card = _fake_version(tmp_path, "m", b"first model")
    first = model_store.add_version("m", model, card, None, [model.with_name("history.csv")], None, root)
    again = model_store.add_version("m", model, card, None, [], None, root)
    assert again == first and len(model_store.versions("m", root)) == 1  # same bytes, same version
    assert first.id == sha256_file(model)[:12] and model_store.latest("m", root) == first

    model_store.install(first, shipped)
    assert sha256_file(shipped.model) == sha256_file(model)
    assert shipped.card_file.read_bytes() == card.read_bytes()
    assert (shipped.reports / "history.csv").read_text() == "first model"

    model2, card2 = _fake_version(tmp_path, "m", b"second model")
    second = model_store.add_version("m", model2, card2, None, [], None, root)
    assert model_store.latest("m", root) == second and model_store.champion(shipped, root) == first
    model_store.install(second, shipped)
    assert not (shipped.reports / "history.csv").exists()  # the shipped reports are exactly the version's
    assert model_store.find(second.id[:6], root) == second
    with pytest.raises(CxrError, match="no stored model version"):
        model_store.find("abcdef12", root)
    with pytest.raises(CxrError, match="give a version id"):
        model_store.find("../etc", root)
    with pytest.raises(CxrError, match="not a model name"):
        model_store.find("../../etc/abcdef12", root)

    shipped.model.write_bytes(b"tampered")  # a champion whose bytes differ from its card is not adopted
    with pytest.raises(CxrError, match="differ from its card"):
        model_store.champion(shipped, tmp_path / "other-registry")


def test_the_champion_history_pops_on_rollback(tmp_path, monkeypatch):
    from cxr import models_cli
    from cxr.provenance import lineage_log

    monkeypatch.chdir(tmp_path)
    for event in (
        {"event": "promotion", "promoted": True, "shipped": "a"},
        {"event": "promotion", "promoted": False, "shipped": "a"},
        {"event": "promotion", "promoted": True, "shipped": "b"},
        {"event": "manual promotion", "promoted": True, "shipped": "c"},
        {"event": "rollback", "promoted": True, "shipped": "b", "rolled_back": "c"},
    ):
        lineage_log.append({"model": "m", "model_sha256": "0" * 64, **event}, Path("lineage/models.jsonl"))
    assert models_cli.champion_history("m") == ["a", "b"]
    assert lineage_log.training_records(Path("lineage/models.jsonl")) == []


# --------------------------------------------------------------------------- the whole path, real


def _write_set(folder: Path, n: int, seed: int, size: int = 32) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        for class_name, bright in (("NORMAL", False), ("PNEUMONIA", True)):
            path = folder / class_name / f"ref-{class_name.lower()}-{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(synthetic(rng, bright, size), mode="L").save(path)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A synthetic project (raw images, params) with a clean, fixed reference set outside it."""
    root = tmp_path / "project"
    _write_set(tmp_path / "reference", 15, seed=99)
    params = small_params()
    params["evaluate"]["external"] = {"ref": str(tmp_path / "reference")}
    params["promotion"] = {"reference": "ref", "bootstrap": 200}
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    write_raw(root / "data/raw", n_patients=24, hostile=False)
    return root


def _prepare(root: Path, cli) -> None:
    shutil.rmtree(root / "data/prepared", ignore_errors=True)
    assert cli(["prepare"])[0] == 0


def _sha(path: Path) -> str:
    from cxr.provenance.hashing import sha256_file

    return sha256_file(path)


def _decision(root: Path) -> dict[str, Any]:
    return json.loads((root / "reports/train/smallnet/promotion.json").read_text())


def test_a_mislabelled_retrain_keeps_the_champion_a_better_one_ships_and_a_rollback_restores(project, cli):
    root = project
    with chdir(root):
        _prepare(root, cli)
        code, out, _ = cli(["train", "--model", "smallnet"])
        assert code == 0 and json.loads(out)["promotion"] == "first model"
        first = _sha(root / "models/smallnet.keras")
        first_card = (root / "models/smallnet.card.json").read_bytes()

        # every label flipped: healthy on its own (mislabelled) validation split, wrong on the reference set
        (root / "data/raw/NORMAL").rename(root / "data/raw/tmp")
        (root / "data/raw/PNEUMONIA").rename(root / "data/raw/NORMAL")
        (root / "data/raw/tmp").rename(root / "data/raw/PNEUMONIA")
        _prepare(root, cli)
        code, out, err = cli(["train", "--model", "smallnet"])
        assert code == 0, err
        assert json.loads(out)["promoted"] is False
        decision = _decision(root)
        assert decision["challenger"]["health"] == "healthy" and decision["reference"]["name"] == "ref"
        assert decision["reasons"][0].startswith("AUC") and decision["paired_auc"]["ci95"][1] < 0
        assert "not promoted: AUC" in decision["line"] and decision["line"].endswith("stays")
        assert _sha(root / "models/smallnet.keras") == first  # the champion, byte for byte
        assert (root / "models/smallnet.card.json").read_bytes() == first_card
        assert decision["drift"]["files"]["changed"] == 0 and decision["drift"]["files"]["new"] > 0
        loser = decision["challenger"]["id"]

        code, out, _ = cli(["models", "list", "smallnet", "--json"])
        listed = {r["id"]: r["status"] for r in json.loads(out)}
        assert listed[first[:12]] == "champion" and listed[loser].startswith("challenger, not promoted: AUC")
        assert cli(["models", "rollback", "../x"])[0] == 1  # a name, not a path

        # the report's champion-versus-challenger section, in the page and in its Markdown summary
        from cxr.reporting.report import render

        rendered = render(["smallnet"], root, root / "reports/report.html", root / "reports/report.md")
        assert "## Champion versus challenger: smallnet" in rendered["markdown"]
        assert f"| version | {loser} | {first[:12]} |" in rendered["markdown"]
        page = (root / "reports/report.html").read_text()
        assert "<h2>Champion versus challenger</h2>" in page and "Not promoted because: AUC" in page

        # clean data again, another seed: no worse on the reference set, so it ships
        (root / "data/raw/NORMAL").rename(root / "data/raw/tmp")
        (root / "data/raw/PNEUMONIA").rename(root / "data/raw/NORMAL")
        (root / "data/raw/tmp").rename(root / "data/raw/PNEUMONIA")
        _prepare(root, cli)
        code, out, _ = cli(["train", "--model", "smallnet", "-S", "train.common.seed=7"])
        assert code == 0 and json.loads(out)["promoted"] is True, _decision(root)["reasons"]
        second = _sha(root / "models/smallnet.keras")
        assert second != first and _decision(root)["line"].endswith("retired")

        code, out, _ = cli(["models", "rollback", "smallnet"])
        assert code == 0 and json.loads(out)["shipped"] == first[:12]
        code, out, _ = cli(["models", "list", "--json"])
        assert {r["id"]: r["status"] for r in json.loads(out)}[second[:12]] == "rolled back"
        assert _sha(root / "models/smallnet.keras") == first
        assert (root / "models/smallnet.card.json").read_bytes() == first_card
        code, out, _ = cli(["audit", "models/smallnet.keras", "--json"])
        audit = json.loads(out)
        assert code == 0 and audit["verified"] is True
        assert [e["event"] for e in audit["events"]][-1] == "rollback"

        # promotion does not undo a person's rollback; promoting by hand does
        code, out, _ = cli(["promote", "--model", "smallnet"])
        assert json.loads(out)["outcome"] == "rolled back" and _sha(root / "models/smallnet.keras") == first
        code, out, _ = cli(["models", "promote", second[:8]])
        assert code == 0 and _sha(root / "models/smallnet.keras") == second
        code, out, _ = cli(["models", "show", loser])
        shown = json.loads(out)
        assert shown["card"]["model_sha256"].startswith(loser) and shown["images_trained_on"] > 0
        assert any(e.get("outcome") == "not promoted" for e in shown["events"])


def test_drift_is_reported_and_hold_keeps_the_champion(project, cli):
    root = project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["monitoring"] = {"on_drift": "hold"}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    with chdir(root):
        _prepare(root, cli)
        assert cli(["train", "--model", "smallnet"])[0] == 0
        first = _sha(root / "models/smallnet.keras")
        # new data: two thirds of the NORMAL films gone, and every film twice the size
        for i, path in enumerate(sorted((root / "data/raw/NORMAL").glob("*.jpeg"))):
            if i % 3:
                path.unlink()
        rng = np.random.default_rng(5)
        for path in sorted((root / "data/raw").rglob("*.jpeg")):
            Image.fromarray(synthetic(rng, "PNEUMONIA" in path.parts, 64), mode="L").save(path, format="JPEG")
        _prepare(root, cli)
        assert cli(["train", "--model", "smallnet"])[0] == 0
        decision = _decision(root)
        warnings = " | ".join(decision["drift"]["warnings"])
        assert "prevalence moved" in warnings and "median image width 32 → 64" in warnings
        assert decision["promoted"] is False and any(r.startswith("data drift") for r in decision["reasons"])
        assert _sha(root / "models/smallnet.keras") == first
        assert decision["drift"]["files"]["changed"] > 0 and decision["drift"]["files"]["removed"] > 0


def test_policy_always_ships_every_challenger(project, cli):
    root = project
    with chdir(root):
        _prepare(root, cli)
        assert cli(["train", "--model", "smallnet"])[0] == 0
        first = _sha(root / "models/smallnet.keras")
        (root / "data/raw/NORMAL").rename(root / "data/raw/tmp")
        (root / "data/raw/PNEUMONIA").rename(root / "data/raw/NORMAL")
        (root / "data/raw/tmp").rename(root / "data/raw/PNEUMONIA")
        _prepare(root, cli)
        code, out, _ = cli(["train", "--model", "smallnet", "-S", "promotion.policy=always"])
        assert code == 0 and json.loads(out)["promoted"] is True
        assert _sha(root / "models/smallnet.keras") != first
        assert _decision(root)["outcome"] == "promoted (policy always)"


def test_without_a_reference_the_test_split_less_training_images_decides(tmp_path, cli):
    root = tmp_path / "project"
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(small_params()))
    write_raw(root / "data/raw", n_patients=24, hostile=False)
    with chdir(root):
        from cxr.config import PrepareConfig, SplitConfig
        from cxr.data.prepare import prepare

        prepare("data/raw", SplitConfig(**SPLIT), PrepareConfig(min_images_per_class=5, workers=1))
        assert cli(["train", "--model", "smallnet", "--no-promote"])[0] == 0
        assert not (root / "models/smallnet.keras").exists()  # stored, not shipped
        assert cli(["promote", "--model", "smallnet"])[0] == 0
        assert (root / "models/smallnet.keras").is_file()
        assert cli(["train", "--model", "smallnet", "-S", "train.common.seed=3"])[0] == 0
        ref = _decision(root)["reference"]
        assert ref["name"] == "test split" and ref["fixed"] is False and ref["images"] >= 20
        assert ref["excluded_seen_in_training"] == 0


def test_an_unhealthy_first_model_ships_flagged_only_where_its_settings_keep_one(project, cli):
    root = project
    slow = ["-S", "train.smallnet.learning_rate=0.00001"]  # collapses: constant output
    with chdir(root):
        _prepare(root, cli)
        # on_collapse: warn (the shared test settings) keeps an unhealthy model, flagged
        code, out, _ = cli(["train", "--model", "smallnet", *slow])
        assert code == 0 and json.loads(out)["promotion"] == "first model, flagged"
        assert "shipped flagged" in _decision(root)["line"] and (root / "models/smallnet.keras").is_file()

        # a version stored by other means (here: its card says on_collapse fail) with no champion: nothing ships
        from cxr.common.model_card import read_card, write_card
        from cxr.provenance import model_store

        (root / "models/smallnet.keras").unlink()
        version = model_store.latest("smallnet")
        card = read_card(version.card_file).to_json()
        card["train_config"]["health"]["on_collapse"] = "fail"
        write_card(version.card_file, card)
        code, _, err = cli(["promote", "--model", "smallnet"])
        assert code == 1 and not (root / "models/smallnet.keras").exists()
        line = err.strip().splitlines()[-1]
        assert "not promoted: health check: collapsed; no smallnet model is shipped" in line
        assert "promotion.policy: always" in line and "Traceback" not in err
        assert _decision(root)["outcome"] == "rejected"  # recorded before the error
