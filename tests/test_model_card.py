"""The model card schema (one reader, one writer) and the one answer to "which threshold, and why"."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cxr.common.model_card import CARD_VERSION, ModelCard, card_path_for, parse_card, read_card, write_card
from cxr.common.thresholds import model_threshold, record_operating_point, recorded_point
from cxr.errors import CxrError, DataError

SHA = "ab" * 32


def _raw(**changes: Any) -> dict[str, Any]:
    """A version 0 card as training wrote them before the schema had a version."""
    card: dict[str, Any] = {
        "model": "smallnet",
        "model_sha256": SHA,
        "input": {"preprocessing": {"image_size": 32, "resize": "squash", "interpolation": "bilinear"}},
        "operating_point": {"threshold": 0.62, "rule": "Youden's J on the validation split", "chosen_on": "val"},
        "health": {"status": "healthy", "problems": []},
        "validation": {"auc": 0.97},
        "timings": {"fit_seconds": 12.5},
    }
    card.update(changes)
    return card


def test_an_unversioned_card_reads_as_the_current_version_and_keeps_its_other_fields() -> None:
    card = parse_card(_raw())
    assert card.schema_version == CARD_VERSION and card.kind == "trained"
    assert card.operating_point is not None and card.operating_point.threshold == 0.62
    assert card.extra("timings") == {"fit_seconds": 12.5}
    assert parse_card(_raw(members=[{"model": "a", "model_file": "a.keras", "model_sha256": SHA}])).kind == "ensemble"


def test_a_newer_card_version_is_refused_with_one_line() -> None:
    with pytest.raises(CxrError, match=r"card\.json: model card version 99 is newer .* upgrade cxr-pipeline") as err:
        parse_card(_raw(schema_version=99), "m.card.json")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"operating_point": {"threshold": 1.5, "rule": "x", "chosen_on": "val"}}, "operating_point.threshold"),
        ({"operating_point": {"threshold": "abc", "rule": "x"}}, "operating_point.threshold"),
        ({"health": {"status": "fine"}}, "health.status"),
        ({"model": None}, "model"),
        ({"schema_version": "one"}, "schema_version"),
    ],
)
def test_a_damaged_typed_field_is_named(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(CxrError) as err:
        parse_card(_raw(**changes), "m.card.json")
    assert field in str(err.value) and "\n" not in str(err.value)


def test_nan_is_not_a_threshold() -> None:
    raw = _raw(operating_point={"threshold": float("nan"), "rule": "x", "chosen_on": "val"})
    with pytest.raises(CxrError, match=r"operating_point\.threshold"):
        parse_card(raw)


def test_the_writer_checks_before_writing_and_round_trips(tmp_path: Path) -> None:
    target = tmp_path / "models" / "smallnet.card.json"
    target.parent.mkdir()
    with pytest.raises(CxrError):
        write_card(target, _raw(operating_point={"threshold": -1, "rule": "x"}))
    assert not target.exists()  # nothing half-written
    written = write_card(target, _raw(validation={"auc": float("nan")}))
    on_disk = json.loads(target.read_text())
    assert on_disk["schema_version"] == CARD_VERSION and on_disk["validation"] == {"auc": None}
    assert on_disk["timings"] == {"fit_seconds": 12.5}
    assert read_card(target) == written
    assert card_path_for(tmp_path / "models" / "smallnet.keras") == target


def test_reading_a_missing_or_broken_card_says_so(tmp_path: Path) -> None:
    with pytest.raises(CxrError, match="model card not found"):
        read_card(tmp_path / "none.card.json")
    (tmp_path / "bad.card.json").write_text("[1]")
    with pytest.raises(CxrError, match="JSON list, not an object"):
        read_card(tmp_path / "bad.card.json")


# ---------------------------------------------------------------- which threshold, and why
def _card(**changes: Any) -> ModelCard:
    return parse_card(_raw(**changes))


def test_the_threshold_comes_from_the_flag_then_the_record_then_the_card_then_half(tmp_path: Path) -> None:
    card = _card()
    assert model_threshold("smallnet", SHA, card, eval_dir=tmp_path) == (
        0.62,
        "Youden's J on the validation split (model card)",
    )
    record_operating_point("smallnet", SHA, {"threshold": 0.3, "rule": "fixed (evaluate.threshold)"}, tmp_path)
    value, source = model_threshold("smallnet", SHA, card, eval_dir=tmp_path)
    assert value == 0.3 and source.startswith("fixed (evaluate.threshold) (") and "operating_point.json" in source
    assert model_threshold("smallnet", SHA, card, given=0.9, eval_dir=tmp_path) == (0.9, "--threshold")
    # a record made for other bytes does not apply to this file
    assert model_threshold("smallnet", "cd" * 32, card, eval_dir=tmp_path).value == 0.62
    assert model_threshold("smallnet", "cd" * 32, _card(operating_point=None), eval_dir=tmp_path) == (
        0.5,
        "default 0.5 (no operating point in the card)",
    )


@pytest.mark.parametrize("bad", ['{"threshold": 2}', '{"threshold": true}', "not json", '{"rule": "x"}'])
def test_a_damaged_record_is_skipped_by_users_and_refused_by_the_report(tmp_path: Path, bad: str) -> None:
    (tmp_path / "smallnet").mkdir()
    (tmp_path / "smallnet" / "operating_point.json").write_text(bad)
    assert model_threshold("smallnet", SHA, _card(), eval_dir=tmp_path).value == 0.62
    with pytest.raises(DataError, match=r"operating_point\.json"):
        recorded_point("smallnet", tmp_path)
