"""Hostile records: broken lineage lines and model cards (``cxr audit``), broken readers files
(``cxr agreement``), NaN on its way to JSON, and a retrain that fails after the shipped model's
history exists.

Every refusal is one ``cxr: error:`` line naming the input, exit status 1, no traceback; every
previous output stays byte-identical and no scratch file is left. ``audit`` and ``agreement``
import neither TensorFlow nor scikit-learn, so each subprocess costs about a second.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxr.config import EvaluateConfig, InputConfig, parse_params
from cxr.errors import DataError
from tests.hostile.harness import (
    assert_no_traceback,
    assert_refused,
    leftovers,
    run_cxr,
    snapshot,
)

LINEAGE = "lineage/models.jsonl"


# ----------------------------------------------------------------------------------------- audit

# (bytes of one lineage line, the reason the warning gives)
BROKEN_LINES = [
    (b"[1, 2, 3]", "not a JSON object"),
    (b'"just a string"', "not a JSON object"),
    (b"42", "not a JSON object"),
    (b"null", "not a JSON object"),
    (b'{"model": 5, "model_sha256": "ab"}', "'model' is missing or not a string"),
    (b'{"model": "x"}', "'model_sha256' is missing or not a string"),
    (b'{"model": "x", "model_sha256": "cd", "data": [1]}', "'data' is not an object"),
    (b'{"model": "x", "model_sha256": "cd", "run": "cli"}', "'run' is not an object"),
    (b'{"model": "x", "model_sha256": "cd", "metrics": {"validation": 3}}', "'metrics.validation' is not an object"),
    (b'{"model": "x", "model_sha256": "cd", "params": {"train": []}}', "'params.train' is not an object"),
    (b'{"model": "x", "model_sha256": "cd", "data": {"counts": {"train": 5}}}', "'data.counts' is not an object"),
    (b'{"model": "torn", "model_sha', "not valid JSON"),
    (b'\xff\xfe{"model": "latin-1 \xe9"}', "not UTF-8"),
]


def test_audit_skips_each_broken_lineage_line_with_one_warning(project: Path) -> None:
    log = project / LINEAGE
    good_lines = log.read_bytes().count(b"\n")
    with open(log, "ab") as handle:
        for line, _ in BROKEN_LINES:
            handle.write(line + b"\n")
    before = snapshot(project)

    outcome = run_cxr(["audit", "models/smallnet.keras"], project)
    assert_no_traceback(outcome)
    assert outcome.rc == 0 and "  verified" in outcome.out.splitlines()[0], outcome.describe()
    warnings = [line for line in outcome.err.splitlines() if "skipped" in line]
    assert len(warnings) == len(BROKEN_LINES), outcome.describe()
    for number, ((_, reason), warning) in enumerate(zip(BROKEN_LINES, warnings, strict=True), start=good_lines + 1):
        assert f"{LINEAGE} line {number}: skipped, {reason}" in warning, warning

    # --data reads the same log: the same warnings, the good record still found, nothing written
    manifest = json.loads((project / "models/smallnet.card.json").read_text())["data"]["manifest_sha256"]
    outcome = run_cxr(["audit", "--data", manifest[:6], "--json"], project)
    assert_no_traceback(outcome)
    assert outcome.rc == 0 and [r["model"] for r in json.loads(outcome.out)] == ["smallnet"], outcome.describe()
    assert snapshot(project) == before and leftovers(project) == []


@pytest.mark.parametrize(
    ("prefix", "why"),
    [("8", "too short"), ("abcde", "five digits"), ("ghijkl", "not hex"), ("12345z", "not hex"), ("", "empty")],
)
def test_audit_data_needs_six_hex_digits(project: Path, prefix: str, why: str) -> None:
    outcome = run_cxr(["audit", "--data", prefix], project) if prefix else run_cxr(["audit", "--data="], project)
    if prefix:
        line = assert_refused(outcome, f"--data {prefix}")
        assert "at least 6 hex digits" in line
    else:  # an empty --data is no --data: it asks for a model file or a hash
        assert_refused(outcome, "MODEL_FILE")


def test_audit_data_without_a_match_is_one_error_line(project: Path) -> None:
    line = assert_refused(run_cxr(["audit", "--data", "ffffff0000"], project), "ffffff0000")
    assert "no model in the lineage log" in line


@pytest.mark.parametrize(
    ("target", "names"),
    [("models/nothere.keras", ["models/nothere.keras", "no such model file"]), ("models", ["models", "not a file"])],
)
def test_audit_of_a_missing_model_or_a_folder_is_one_line(project: Path, target: str, names: list[str]) -> None:
    assert_refused(run_cxr(["audit", target], project), *names)


# (card bytes, the phrase the unverified status gives)
BROKEN_CARDS = [
    (b"{bad json", "is not valid JSON"),
    (b"[1, 2]", "is not a JSON object (a JSON list)"),
    (b'"a string"', "is not a JSON object (a JSON str)"),
    (b'{"model_sha256": 5}', "has no model_sha256 string"),
    (b"\xff\xfe\x00\x01", "is not UTF-8 text"),
    (b"", "is not valid JSON"),
]


@pytest.mark.parametrize(("card", "phrase"), BROKEN_CARDS, ids=[p for _, p in BROKEN_CARDS])
def test_audit_of_a_model_with_a_broken_card_is_unverified_with_the_reason(
    project: Path, card: bytes, phrase: str
) -> None:
    (project / "models/smallnet.card.json").write_bytes(card)
    before = snapshot(project)
    outcome = run_cxr(["audit", "models/smallnet.keras"], project)
    assert_no_traceback(outcome)
    assert outcome.rc == 1, outcome.describe()
    first = outcome.out.splitlines()[0]
    assert "unverified: " in first and f"its card models/smallnet.card.json {phrase}" in first, outcome.describe()
    assert snapshot(project) == before


def test_audit_json_of_a_card_that_is_a_folder(project: Path) -> None:
    card = project / "models/smallnet.card.json"
    card.unlink()
    card.mkdir()
    outcome = run_cxr(["audit", "--json", "models/smallnet.keras"], project)
    assert_no_traceback(outcome)
    result = json.loads(outcome.out)
    assert outcome.rc == 1 and result["verified"] is False
    assert result["problems"] == ["its card models/smallnet.card.json is not a file"]


# ------------------------------------------------------------------------------------- agreement

# (file name, content or None for a folder / nothing, the phrase of the refusal)
BROKEN_READERS = [
    ("single.csv", b"path,r1\na.jpeg,0\nb.jpeg,1\n", "kappa needs at least 2 readers"),
    ("empty.csv", b"", "empty file"),
    ("header.csv", b"path,r1,r2\n", "no rows below the header"),
    ("quote.csv", b'path,r1,r2\n"a.jpeg,0,1\nb.jpeg,1,0\n', "not a readable CSV"),
    ("binary.csv", bytes(range(256)) * 8, "binary content"),
    ("latin1.csv", "path,r\xe9ader,r2\na.jpeg,0,1\n".encode("latin-1"), "not UTF-8"),
    ("missing.csv", None, "no such readers file"),
    ("folder.csv", "folder", "is a folder"),
    ("dup-reader.csv", b"path,r1,r1\na.jpeg,0,1\nb.jpeg,1,0\n", "column 'r1' appears twice in the header"),
    ("dup-image.csv", b"path,r1,r2\na.jpeg,0,1\nb.jpeg,1,0\na.jpeg,0,1\n", "'a.jpeg' appears in more than one row"),
]


@pytest.mark.parametrize(("name", "content", "phrase"), BROKEN_READERS, ids=[n for n, _, _ in BROKEN_READERS])
def test_agreement_refuses_a_broken_readers_file_in_one_line(
    tmp_path: Path, name: str, content: bytes | str | None, phrase: str
) -> None:
    path = tmp_path / name
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    before = snapshot(tmp_path)
    outcome = run_cxr(["agreement", name, "--json"], tmp_path)  # the refusal comes before any output
    line = assert_refused(outcome, name)
    assert phrase in line and outcome.out == "", outcome.describe()
    assert snapshot(tmp_path) == before and leftovers(tmp_path) == []


def test_agreement_on_identical_labels_is_undefined_never_nan(tmp_path: Path) -> None:
    rows = "".join(f"im{i}.jpeg,PNEUMONIA,1,pn\n" for i in range(12))
    (tmp_path / "same.csv").write_text("path,r1,r2,r3\n" + rows)
    outcome = run_cxr(["agreement", "same.csv", "--json", "--bootstrap", "50"], tmp_path)
    assert_no_traceback(outcome)
    assert outcome.rc == 0 and "NaN" not in outcome.out, outcome.describe()
    result = json.loads(outcome.out, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert [c["kappa"] for c in result["cohen"]] == [None, None, None]
    assert result["fleiss"] == {"kappa": None, "ci95": None}

    outcome = run_cxr(["agreement", "same.csv", "--bootstrap", "50"], tmp_path)
    assert outcome.rc == 0 and "nan" not in outcome.out.lower(), outcome.describe()
    lines = outcome.out.splitlines()
    assert len(lines) == 4 and all("undefined" in line for line in lines), outcome.describe()


def test_agreement_intervals_read_a_to_b_with_real_minus_signs(tmp_path: Path) -> None:
    # two readers who disagree on almost every image: kappa and both ends of its CI are negative
    rows = "".join(f"im{i}.jpeg,{i % 2},{(i + 1) % 2}\n" for i in range(20)) + "im20.jpeg,1,1\n"
    (tmp_path / "neg.csv").write_text("path,r1,r2\n" + rows)
    outcome = run_cxr(["agreement", "neg.csv", "--bootstrap", "200"], tmp_path)
    assert_no_traceback(outcome)
    cohen, fleiss = outcome.out.splitlines()
    assert cohen.startswith("Cohen's kappa r1 vs r2: −0.909 (95% CI −") and " to −" in cohen, cohen
    assert fleiss.startswith("Fleiss' kappa (2 readers): −0.909 (95% CI −") and " to " in fleiss, fleiss
    assert "-" not in cohen.replace("Cohen's", ""), cohen  # no ASCII hyphen as a minus or a range dash


def test_kappas_are_none_when_undefined() -> None:
    from cxr.evaluation.agreement import agreement, cohen_kappa, fleiss_kappa

    assert fleiss_kappa(np.ones((5, 3), int)) is None
    assert fleiss_kappa(np.zeros((5, 2), int)) is None
    assert cohen_kappa(np.ones(6), np.ones(6)) is None
    assert cohen_kappa(np.zeros(6), np.ones(6)) == 0.0  # always opposite: defined, no better than chance
    readers = pd.DataFrame({"r1": [1] * 8, "r2": [1] * 8})
    result = agreement(readers, {"name": "m", "labels": np.array([0, 1] * 4)}, n_boot=30)
    assert [c["kappa"] for c in result["cohen"]] == [0.0, 0.0, None]
    assert result["fleiss"] == {"kappa": None, "ci95": None}


def test_reader_agreement_of_the_model_uses_its_shipped_threshold(tmp_path: Path, evaluated: Path) -> None:
    from cxr.evaluation.agreement import agreement_for_report

    eval_dir = tmp_path / "eval"
    shutil.copytree(evaluated / "reports/eval", eval_dir)
    predictions = pd.read_csv(eval_dir / "smallnet/predictions.csv", keep_default_na=False)
    readers = tmp_path / "readers.csv"
    readers.write_text(
        "path,r1,r2\n"
        + "".join(f"{p},{y},{y}\n" for p, y in zip(predictions["path"], predictions["label"], strict=True))
    )
    point_file = eval_dir / "smallnet/operating_point.json"
    point = json.loads(point_file.read_text())
    out = tmp_path / "agreement.json"
    # the shipped threshold, as evaluate recorded it: the model agrees with readers who give the truth
    result = agreement_for_report(readers, "smallnet", EvaluateConfig(threshold=0.01, bootstrap=20), out, eval_dir)
    assert result["threshold"] == {"value": point["threshold"], "rule": point["rule"]}
    assert [c["kappa"] for c in result["cohen"][:2]] == [1.0, 1.0]  # the test split is separable
    # a shipped threshold of 0 calls every image PNEUMONIA, whatever evaluate.threshold says
    point_file.write_text(json.dumps({**point, "threshold": 0.0}))
    result = agreement_for_report(readers, "smallnet", EvaluateConfig(threshold=0.99, bootstrap=20), out, eval_dir)
    assert result["threshold"]["value"] == 0.0
    assert [c["kappa"] for c in result["cohen"][:2]] == [0.0, 0.0]  # one label for all: no better than chance
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))

    point_file.unlink()
    with pytest.raises(DataError, match=r"operating_point\.json: not found; run the evaluate step"):
        agreement_for_report(readers, "smallnet", EvaluateConfig(bootstrap=20), out, eval_dir)


# ---------------------------------------------------------------------------------------- JSON


def test_json_files_never_hold_nan_and_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    from cxr.files import dumps_json, json_safe, write_json

    payload = {"kappa": float("nan"), "ci": [float("-inf"), np.float32(0.5)], "n": np.int64(3), "ok": True}
    assert json_safe(payload) == {"kappa": None, "ci": [None, 0.5], "n": 3, "ok": True}
    assert "NaN" not in dumps_json(payload) and "Infinity" not in dumps_json(payload)
    target = tmp_path / "out.json"
    write_json(target, payload)
    assert json.loads(target.read_text(), parse_constant=lambda c: pytest.fail(c)) == json_safe(payload)
    before = target.read_bytes()
    with pytest.raises(TypeError):
        write_json(target, {"not json": object()})
    assert target.read_bytes() == before and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------- failed retrain


def test_a_failed_retrain_leaves_the_shipped_model_and_its_history_byte_identical(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retrain interrupted after its first epoch (the old code had already emptied history.csv).

    Ctrl-C (KeyboardInterrupt) is the harshest failure inside ``fit``: any exception takes the same path.
    """
    error = KeyboardInterrupt
    import keras
    import yaml

    from cxr.training import train as train_module

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["smallnet"]["epochs"] = 3
    params["train"]["common"]["seed"] = 7  # another run key: a fresh run, not a resume
    shipped = project / "models/smallnet.keras"
    kept = ["models/smallnet.keras", "models/smallnet.card.json", LINEAGE]
    before = {k: v for k, v in snapshot(project).items() if k in kept or k.startswith("reports/")}
    assert {"reports/train/smallnet/history.csv", "reports/train/smallnet/curves.png"} <= set(before)

    class Dies(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: object = None) -> None:
            raise error("fit failed after an epoch")

    real_fit = train_module._fit

    def failing_fit(run, start, data, callbacks, verbose, policy):  # type: ignore[no-untyped-def]
        return real_fit(run, start, data, [*callbacks, Dies()], verbose, policy)

    monkeypatch.setattr(train_module, "_fit", failing_fit)
    monkeypatch.chdir(project)
    # scratch a killed earlier run left (its process is gone): removed by the next run of this model
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (project / f"reports/train/.smallnet.tmp-{dead.pid}").mkdir()
    (project / f"reports/train/.smallnet.tmp-{dead.pid}/history.csv").write_text("epoch\n0\n")
    (project / f"models/.smallnet.tmp-{dead.pid}.keras").write_bytes(b"half a model")
    assert len(leftovers(project)) == 2
    with pytest.raises(error, match="fit failed"):
        train_module.train("smallnet", parse_params(params))

    after = {k: v for k, v in snapshot(project).items() if k in kept or k.startswith("reports/")}
    assert after == before  # model, card, lineage, history, curves, metrics, summary: all byte-identical
    assert leftovers(project) == []
    # the failed run's own history is kept for a resume, outside the shipped reports
    run_history = list((project / "models/.work/smallnet").glob("history-*.csv"))
    assert len(run_history) == 1 and pd.read_csv(run_history[0])["epoch"].tolist() == [0]
    assert shipped.is_file()


def test_vgg16_with_a_center_crop_builds_on_the_cropped_side() -> None:
    from cxr.errors import CxrError
    from cxr.training.models import build_model

    model = build_model("vgg16", 64, {"weights": "none"}, center_crop=0.25)  # 64 px, 16 px bands: 32 px
    assert tuple(model.input.shape[1:]) == (64, 64, 3) and model.output.shape[-1] == 1
    with pytest.raises(CxrError, match="VGG16 needs at least 32 px"):
        build_model("vgg16", 40, {"weights": "none"}, center_crop=0.2)


def test_explain_skips_the_ensemble_with_one_line(evaluated: Path, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    from cxr.evaluation.explain import explain_models

    logger = logging.getLogger("cxr.evaluation.explain")  # the cxr loggers may not propagate to caplog's root
    caplog.set_level(logging.INFO, logger=logger.name)
    logger.addHandler(caplog.handler)
    try:
        summary = explain_models(
            ["ensemble"],
            EvaluateConfig(gradcam_per_outcome=1, seed=1, border_margin=0.125),
            InputConfig(cache_dir=str(evaluated / "data/cache")),
            splits_csv=evaluated / "data/prepared/splits.csv",
            models_dir=evaluated / "models",
            eval_dir=evaluated / "reports/eval",
            out_dir=tmp_path / "gradcam",
        )
    finally:
        logger.removeHandler(caplog.handler)
    assert summary["models"] == {}
    assert [r.message for r in caplog.records if "ensemble" in r.message and "Grad-CAM" in r.message]


def test_validation_youden_is_not_the_cards_sensitivity_threshold(tmp_path: Path) -> None:
    from cxr.common.model_card import parse_card
    from cxr.common.thresholds import validation_youden

    card = {
        "model": "m",
        "input": {"preprocessing": {"image_size": 32, "resize": "squash", "interpolation": "bilinear"}},
        "model_sha256": "ab" * 32,
        "operating_point": {
            "threshold": 0.93,
            "rule": "highest threshold with validation sensitivity ≥ 0.9",
            "chosen_on": "val",
        },
    }
    sha = "ab" * 32
    assert validation_youden(parse_card(card), "m", sha, tmp_path) is None
    (tmp_path / "m").mkdir()
    (tmp_path / "m/metrics.json").write_text(json.dumps({"model_sha256": sha, "youden_threshold": 0.41}))
    assert validation_youden(parse_card(card), "m", sha, tmp_path) == 0.41
    assert validation_youden(parse_card(card), "m", "cd" * 32, tmp_path) is None  # recorded for other bytes
    card["operating_point"] = {"threshold": 0.37, "rule": "Youden's J on the validation split", "chosen_on": "val"}
    assert validation_youden(parse_card(card), "m", sha, tmp_path) == 0.37
    assert not math.isnan(validation_youden(parse_card(card), "m", sha, tmp_path) or 0.0)
