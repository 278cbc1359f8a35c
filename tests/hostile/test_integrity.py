"""What trains is what the records say (issue 19, part 1): a training image swapped in ``data/raw``
after prepare, and a decoded-image cache that was truncated or overwritten, through the real CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from tests.hostile.harness import assert_no_traceback, assert_refused, run_cxr


def _train_rows(project: Path) -> list[str]:
    import csv

    with open(project / "data/prepared/splits.csv", newline="") as handle:
        return [r["path"] for r in csv.DictReader(handle) if r["split"] == "train"]


def test_an_image_swapped_in_data_raw_after_prepare_is_refused_before_training(project: Path) -> None:
    rows = _train_rows(project)
    normal = next(p for p in rows if "/NORMAL/" in p)
    pneumonia = next(p for p in rows if "/PNEUMONIA/" in p)
    shutil.copyfile(project / pneumonia, project / normal)  # a valid image, the wrong label
    shutil.rmtree(project / "data/cache")
    shipped = (project / "models/smallnet.keras").read_bytes()
    line = assert_refused(run_cxr(["train", "--model", "smallnet"], project), normal, "changed since prepare")
    assert "rerun prepare" in line
    assert (project / "models/smallnet.keras").read_bytes() == shipped


def _cache(project: Path, split: str = "train") -> Path:
    (found,) = sorted((project / "data/cache").glob(f"{split}-*.npy"))
    return found


def test_a_truncated_or_overwritten_cache_is_rebuilt_with_one_warning(project: Path) -> None:
    cache = _cache(project)
    good = np.load(cache).copy()
    with open(cache, "r+b") as handle:  # truncated: half its bytes
        handle.truncate(cache.stat().st_size // 2)
    outcome = run_cxr(["train", "--model", "smallnet", "--no-promote"], project)
    assert outcome.rc == 0 and "is unreadable" in outcome.err, outcome.describe()
    assert_no_traceback(outcome)
    assert np.array_equal(np.load(_cache(project)), good)  # decoded again from the images

    cache = _cache(project)
    header = cache.stat().st_size - good.nbytes
    with open(cache, "r+b") as handle:  # every pixel white: a valid file of the right shape
        handle.seek(header)
        handle.write(b"\xff" * good.nbytes)
    outcome = run_cxr(["train", "--model", "smallnet", "--no-promote"], project)
    assert outcome.rc == 0, outcome.describe()
    warnings = [line for line in outcome.err.splitlines() if "does not match its recorded sha256" in line]
    assert len(warnings) == 1, outcome.describe()
    assert np.array_equal(np.load(_cache(project)), good)
    record = json.loads((project / "lineage/models.jsonl").read_text().splitlines()[-1])
    assert record["model"] == "smallnet"


def _edit_card(project: Path, edit) -> Path:
    card_file = project / "models/smallnet.card.json"
    card = json.loads(card_file.read_text())
    edit(card)
    card_file.write_text(json.dumps(card, indent=2))
    return card_file


def _an_image(project: Path) -> str:
    return _train_rows(project)[0]


def test_an_edited_model_card_is_unverified_with_the_field_that_changed(project: Path) -> None:
    """Issue 19 §1: the card names the model's sha256; the lineage record names the card's."""
    image = _an_image(project)
    good = run_cxr(["predict", "--model", "smallnet", "--json", image], project)
    assert good.rc == 0 and json.loads(good.out.splitlines()[-1])["verified_model"] is True, good.describe()

    original = (project / "models/smallnet.card.json").read_bytes()
    edits = {
        "operating_point.threshold": lambda c: c["operating_point"].update(threshold=0.0001),
        "input.preprocessing.resize": lambda c: c["input"]["preprocessing"].update(resize="pad"),
        "validation.auc": lambda c: c["validation"].update(auc=0.999),
    }
    for field, edit in edits.items():
        (project / "models/smallnet.card.json").write_bytes(original)
        _edit_card(project, edit)
        line = assert_refused(run_cxr(["predict", "--model", "smallnet", image], project), "unverified model", field)
        assert "recorded" in line
        if field == "input.preprocessing.resize":  # allowed, it runs marked (one field will do: the same path)
            allowed = run_cxr(["predict", "--model", "smallnet", "--json", "--allow-unverified", image], project)
            assert allowed.rc == 0 and json.loads(allowed.out.splitlines()[-1])["verified_model"] is False
        audit = run_cxr(["audit", "models/smallnet.keras", "--json"], project)
        assert audit.out.strip(), audit.describe()
        report = json.loads(audit.out)
        assert report["verified"] is False and any(field in p for p in report["problems"]), audit.describe()

    (project / "models/smallnet.card.json").write_bytes(original)  # restored: verified again
    audit = run_cxr(["audit", "models/smallnet.keras", "--json"], project)
    assert json.loads(audit.out)["verified"] is True, audit.describe()
