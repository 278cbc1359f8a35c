"""cxr audit: from a model file's bytes to the data, parameters, code and run that produced it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cxr.provenance.hashing import sha256_file
from cxr.provenance.lineage_log import append, audit_model, models_for_data, records
from tests.factories import chdir


@pytest.fixture
def project(trained, tmp_path) -> Path:
    target = tmp_path / "project"
    shutil.copytree(trained, target)
    return target


def test_training_appended_a_lineage_record(project):
    everything = records(project / "lineage/models.jsonl")
    entries = [r for r in everything if "event" not in r]
    assert len(entries) == 1 and [r["event"] for r in everything if "event" in r] == ["promotion"]
    entry = entries[0]
    assert entry["model_sha256"] == sha256_file(project / "models/smallnet.keras")
    assert entry["data"]["manifest_sha256"] == sha256_file(project / "data/prepared/manifest.csv")
    assert entry["data"]["splits_sha256"] == sha256_file(project / "data/prepared/splits.csv")
    assert set(entry["data"]["counts"]) == {"train", "val", "test"}
    assert entry["run"]["driver"] == "cli" and entry["params"]["train"]["epochs"] == 3
    assert entry["metrics"]["validation"]["auc"] is not None


def test_audit_of_a_shipped_model_is_verified_and_names_the_manifest(project, cli):
    manifest = sha256_file(project / "data/prepared/manifest.csv")
    with chdir(project):
        code, out, _ = cli(["audit", "models/smallnet.keras"])
    assert code == 0
    assert "verified" in out.splitlines()[0] and "unverified" not in out
    assert manifest[:12] in out
    assert "validation AUC" in out and "epochs 3" in out


def test_tampered_unknown_or_mismatched_files_are_unverified(project, cli):
    with chdir(project):
        tampered = Path("models/copy.keras")
        tampered.write_bytes(Path("models/smallnet.keras").read_bytes() + b"\0")
        shutil.copy("models/smallnet.card.json", "models/copy.card.json")
        code, out, _ = cli(["audit", str(tampered)])
        assert code == 1 and "unverified" in out and "matches no lineage record" in out

        card = json.loads(Path("models/smallnet.card.json").read_text())
        card["model_sha256"] = "0" * 64
        Path("models/smallnet.card.json").write_text(json.dumps(card))
        result = audit_model("models/smallnet.keras", Path("lineage/models.jsonl"))
        assert not result["verified"] and result["record"] is not None
        assert any("card names another sha256" in p for p in result["problems"])

        code, out, _ = cli(["audit", "--json", "models/copy.keras"])
        assert code == 1 and json.loads(out)["verified"] is False


def test_audit_by_data_hash_lists_models_trained_on_it(project, cli):
    manifest = sha256_file(project / "data/prepared/manifest.csv")
    with chdir(project):
        code, out, _ = cli(["audit", "--data", manifest[:12]])
        assert code == 0 and "smallnet" in out
        code, _, err = cli(["audit", "--data", "ffffffffffff"])
        assert code == 1 and "no model" in err
    assert [r["model"] for r in models_for_data(manifest[:8], project / "lineage/models.jsonl")] == ["smallnet"]


def test_the_log_is_append_only_and_survives_a_torn_line(tmp_path):
    log = tmp_path / "models.jsonl"
    append({"model": "a", "model_sha256": "1" * 64, "data": {"manifest_sha256": "ab"}}, log)
    with open(log, "a") as handle:
        handle.write('{"model": "torn", "model_sha')  # a writer killed mid-line
    append({"model": "b", "model_sha256": "2" * 64, "data": {"manifest_sha256": "ab"}}, log)
    assert [r["model"] for r in records(log)] == ["a", "b"]  # the torn line is skipped, b is whole
    assert log.read_text().count("\n") == 3
