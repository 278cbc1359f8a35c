"""Hostile input to ``cxr predict``: file names that forge output lines, bad files among good ones,
broken and mismatched models and cards, bad thresholds and Grad-CAM folders (decode bombs and sparse
files: ``test_decode_caps.py``).

A run that meets bad files among good ones keeps going: one ``cxr: error:`` line per bad file, each
naming it (control characters escaped), the good ones predicted, exit status 1. A run that cannot
start (bad model, card, threshold, folder) is refused with one line naming the input. Never a
traceback or TensorFlow's C++ log (``E0000 … cuInit``, ``jpeg_mem.cc``), never a changed model or
report, never a scratch file.

Each TensorFlow run costs about 8 s, so the bad images share one run; refusals that come before
TensorFlow is imported (card, hash, threshold, folders) cost about a second each.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cxr.safe_text import printable
from tests.factories import synthetic, write_dicom
from tests.hostile.harness import (
    Outcome,
    assert_no_traceback,
    assert_refused,
    leftovers,
    run_cxr,
    snapshot,
    unprivileged_prefix,
)

MODEL = "models/smallnet.keras"
CARD = "models/smallnet.card.json"
NOISE = ("E0000", "cuInit", "cuda_platform", "jpeg_mem", "Traceback", "absl::")
# a file name that, printed raw, forges a NORMAL line for an image the model calls PNEUMONIA
FORGED = "scan1.jpeg: prediction: NORMAL  P(Pneumonia): 0.0100\nscan2.jpeg"


def _png(path: Path, bright: bool, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(synthetic(np.random.default_rng(seed), bright), mode="L").save(path, format="PNG")
    return path


def _assert_quiet(outcome: Outcome) -> None:
    for marker in NOISE:
        assert marker not in outcome.err + outcome.out, f"{marker!r} in the output\n{outcome.describe()}"


def _unchanged(project: Path, before: dict[str, str]) -> None:
    assert snapshot(project / "models") | snapshot(project / "reports") == before
    assert leftovers(project) == []


def _outputs(project: Path) -> dict[str, str]:
    return snapshot(project / "models") | snapshot(project / "reports")


# ------------------------------------------------------------- bad files among good ones: one run


def test_bad_files_among_good_ones_one_line_each_and_the_good_ones_predicted(project: Path, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    good = [
        _png(inbox / "dark.png", bright=False, seed=1),
        _png(inbox / FORGED, bright=True, seed=2),  # the model scores it PNEUMONIA
        _png(inbox / "\x1b[2J\x1b]0;owned\x07clear.png", bright=False, seed=3),  # terminal escapes
        _png(inbox / os.fsdecode(b"r\xf6ntgen.png"), bright=False, seed=4),  # not UTF-8
    ]
    letter = inbox / "letter.jpeg"
    letter.write_text("Dear doctor, this is not a radiograph.\n")
    bad_named = inbox / "bad\nname.jpeg"
    bad_named.write_text("not an image either")
    empty_folder = tmp_path / "nothing here"
    empty_folder.mkdir()
    marked = tmp_path / "marked.dcm"
    marked.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 500)  # DICOM marker, then garbage
    film = write_dicom(tmp_path / "film.dcm", np.full((64, 64), 900, np.uint16))
    film.write_bytes(film.read_bytes()[:-3000])  # pixel data cut short
    bad = {
        letter: "not a readable JPEG/PNG/BMP image",
        bad_named: "not a readable JPEG/PNG/BMP image",
        write_dicom(tmp_path / "cine.dcm", np.zeros((3, 16, 16), np.uint8), frames=3): "multi-frame",
        marked: "not a readable DICOM file (End of file reached",
        film: "unreadable pixel data",
        tmp_path / "missing.png": "file not found",
        empty_folder: "no image files in this folder",
    }
    before = _outputs(project)

    outcome = run_cxr(["predict", "--model", MODEL, *good, *bad], project)

    assert outcome.rc == 1, outcome.describe()
    assert_no_traceback(outcome)
    _assert_quiet(outcome)
    lines = outcome.out.splitlines()
    assert [line.rpartition(": prediction: ")[0] for line in lines] == [printable(p) for p in good], outcome.describe()
    assert ": prediction: PNEUMONIA  P(Pneumonia): " in lines[1], lines[1]  # the forged name, escaped
    assert "\\n" in lines[1] and not any(line.startswith("scan2.jpeg") for line in lines)
    assert "\x1b" not in outcome.out + outcome.err
    errors = outcome.err.splitlines()
    assert len(errors) == len(bad) and all(line.startswith("cxr: error: ") for line in errors), outcome.describe()
    for (path, reason), line in zip(bad.items(), errors, strict=True):
        assert line.startswith(f"cxr: error: {printable(path)}: ") and reason in line, line
    _unchanged(project, before)


def _strict_json(text: str) -> list[dict[str, Any]]:
    def no_constants(name: str) -> Any:
        raise AssertionError(f"{name} in JSON output")

    return [json.loads(line, parse_constant=no_constants) for line in text.splitlines()]


def test_an_unverified_model_is_used_only_when_allowed_and_both_hashes_are_reported(
    project: Path, tmp_path: Path
) -> None:
    model = project / MODEL
    with open(model, "ab") as handle:
        handle.write(b"\0")  # still a loadable zip, but not the bytes its card names
    claimed = json.loads((project / CARD).read_text())["model_sha256"]
    actual = hashlib.sha256(model.read_bytes()).hexdigest()
    image = _png(tmp_path / "in" / FORGED, bright=True)
    latin1 = _png(tmp_path / "in" / os.fsdecode(b"r\xf6ntgen.png"), bright=False)  # a name that is not UTF-8
    overlays = tmp_path / "overlays"
    before = _outputs(project)

    outcome = run_cxr(
        ["predict", "--model", MODEL, "--json", "--allow-unverified", "--gradcam", overlays, image, latin1], project
    )

    assert outcome.rc == 0, outcome.describe()
    _assert_quiet(outcome)
    forged, odd = _strict_json(outcome.out)
    assert forged["path"] == str(image) and forged["label"] == "PNEUMONIA"
    assert odd["path"] == str(tmp_path / "in" / "r\\xf6ntgen.png")  # escaped, not a lone surrogate
    for record in (forged, odd):
        assert record["model_sha256"] == actual and record["card_model_sha256"] == claimed
        assert record["verified_model"] is False
    (warning,) = outcome.err.splitlines()
    assert "unverified model used as asked" in warning and claimed[:12] in warning and actual[:12] in warning
    made = sorted(str(p) for p in overlays.iterdir())
    assert made == sorted([forged["gradcam"], odd["gradcam"]])
    assert all(Path(p).name.isprintable() and p.endswith(".gradcam.png") for p in made)
    _unchanged(project, before)


# ------------------------------------------------------------- refusals before TensorFlow: one line


def _card(project: Path) -> dict[str, Any]:
    return json.loads((project / CARD).read_text())


def _write_card(project: Path, card: Any) -> None:
    (project / CARD).write_text(card if isinstance(card, str) else json.dumps(card))


def _preprocessing(**changes: Any) -> Any:
    def change(project: Path) -> None:
        card = _card(project)
        card["input"]["preprocessing"].update(changes)
        _write_card(project, card)

    return change


def _card_without(key: str) -> Any:
    def change(project: Path) -> None:
        card = _card(project)
        card.pop(key)
        _write_card(project, card)

    return change


def _model_bytes(data: bytes) -> Any:
    """Replace the model file, with a card that names the new bytes (so the hash check passes)."""

    def change(project: Path) -> None:
        (project / MODEL).write_bytes(data)
        _write_card(project, {**_card(project), "model_sha256": hashlib.sha256(data).hexdigest()})

    return change


def _append_to_model(project: Path) -> None:
    with open(project / MODEL, "ab") as handle:
        handle.write(b"\0")


def _model_is_a_folder(project: Path) -> None:
    (project / MODEL).unlink()
    (project / MODEL).mkdir()


BROKEN_MODELS = {
    # case: (how to break the project, what the one line names, what it says)
    "card not JSON": (lambda p: _write_card(p, "{not json"), CARD, "not valid JSON"),
    "card a list": (lambda p: _write_card(p, "[1, 2]"), CARD, "JSON list, not an object"),
    "card image_size text": (_preprocessing(image_size="abc"), CARD, "image_size='abc': expected a whole number"),
    "card resize bogus": (_preprocessing(resize="bogus"), CARD, "resize='bogus': choose one of squash, pad"),
    "card unknown step": (_preprocessing(invert=True), CARD, "unknown step invert"),
    "card one channel": (_preprocessing(channels=1), CARD, "channels=1"),
    "card without preprocessing": (_card_without("input"), CARD, "no input.preprocessing"),
    "card names other bytes": (_append_to_model, MODEL, "(--allow-unverified uses it anyway)"),
    "card without model_sha256": (_card_without("model_sha256"), MODEL, "has no model_sha256"),
    "no card": (lambda p: (p / CARD).unlink(), CARD, "model card not found"),
    "model a folder": (_model_is_a_folder, MODEL, "a folder, not a model file"),
    "model empty": (_model_bytes(b""), MODEL, "not a Keras model file"),
    "model garbage": (_model_bytes(b"\x89HDF\r\n garbage"), MODEL, "not a Keras model file"),
}


@pytest.mark.parametrize("case", list(BROKEN_MODELS))
def test_a_broken_model_or_card_is_refused_with_one_line_naming_it(case: str, project: Path, tmp_path: Path) -> None:
    breaking, named, says = BROKEN_MODELS[case]
    breaking(project)
    image = _png(tmp_path / "in" / "dark.png", bright=False)
    before = _outputs(project)

    outcome = run_cxr(["predict", "--model", MODEL, image], project)

    line = assert_refused(outcome, named)
    assert says in line, line
    assert outcome.out == "", outcome.describe()
    _unchanged(project, before)


def test_a_card_whose_size_is_not_the_models_input_is_refused(project: Path, tmp_path: Path) -> None:
    _preprocessing(image_size=64)(project)
    before = _outputs(project)

    image = _png(tmp_path / "dark.png", bright=False)
    outcome = run_cxr(["predict", "--model", MODEL, image], project)
    line = assert_refused(outcome, MODEL, "unverified model")  # the card is not the one recorded at training
    assert "input.preprocessing.image_size: 64 (recorded 32)" in line, line

    outcome = run_cxr(["predict", "--model", MODEL, "--allow-unverified", image], project)
    line = assert_refused(outcome, CARD)
    assert "image_size=64 but smallnet.keras takes 32×32×3 images" in line, line
    _assert_quiet(outcome)
    _unchanged(project, before)


def test_an_unreadable_model_file_is_refused(project: Path, tmp_path: Path) -> None:
    if unprivileged_prefix() is None:
        pytest.skip("running as root without user namespaces: root reads a file whatever its mode")
    (project / MODEL).chmod(0)
    outcome = run_cxr(
        ["predict", "--model", MODEL, _png(tmp_path / "dark.png", bright=False)], project, unprivileged=True
    )
    assert "Permission denied" in assert_refused(outcome, MODEL)


@pytest.mark.parametrize("value", ["nan", "5", "-1", "inf", "half"])
def test_a_threshold_that_is_not_a_probability_is_refused_by_the_parser(value: str, project: Path) -> None:
    outcome = run_cxr(["predict", "--model", MODEL, "--threshold", value, "x.png"], project)
    assert outcome.rc == 2 and outcome.out == "", outcome.describe()
    assert_no_traceback(outcome)
    (line,) = [line for line in outcome.err.splitlines() if "error:" in line]
    assert f"argument --threshold: {value} is not a" in line and "from 0 to 1" in line, line


def test_a_gradcam_folder_that_is_a_file_is_refused(project: Path, tmp_path: Path) -> None:
    existing = tmp_path / "overlays.png"
    existing.write_bytes(b"a file, not a folder")
    outcome = run_cxr(["predict", "--model", MODEL, "--gradcam", existing, _png(tmp_path / "a.png", False)], project)
    assert "exists and is not a folder" in assert_refused(outcome, str(existing))
    assert existing.read_bytes() == b"a file, not a folder"


def test_a_folder_without_images_is_one_line_and_exit_1(project: Path, tmp_path: Path) -> None:
    empty = tmp_path / "scans"
    (empty / "notes").mkdir(parents=True)
    (empty / "notes" / "readme.txt").write_text("no images here")
    outcome = run_cxr(["predict", "--model", MODEL, "--json", empty], project)
    assert "no image files in this folder" in assert_refused(outcome, str(empty))
    assert outcome.out == ""
