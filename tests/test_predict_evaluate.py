"""Scoring with a small trained project: ``cxr predict``, the card-driven loader, ``cxr evaluate``
(test metrics, DVC metrics, per-model files, Youden threshold from validation) and Grad-CAM ``explain``.

The project (synthetic dark NORMAL / bright PNEUMONIA images → prepare → train smallnet → evaluate →
explain) is the session-wide ``trained`` / ``evaluated`` fixture of ``conftest.py``, shared with
``test_audit``, ``test_report`` and ``test_external_ensemble``; tests that write into it work on a copy.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from sklearn.metrics import roc_auc_score

import cxr.inference.predict
from cxr.common.metrics import youden_threshold
from cxr.common.model_card import card_path_for
from cxr.config import parse_params
from cxr.errors import CxrError
from cxr.evaluation.evaluate import evaluate_models
from cxr.evaluation.explain import OUTCOMES, outcome, select
from cxr.inference.gradcam import border_fraction
from cxr.inference.loading import load, load_image, predict_images
from tests.factories import IMAGE_SIZE, chdir, small_params, synthetic, write_dicom

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode="L").save(path, format="PNG")
    return path


def assert_png(path: Path, min_side: int = 32) -> None:
    assert path.is_file() and path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.load()
        assert min(image.size) >= min_side
        assert np.asarray(image.convert("L")).std() > 1  # not a blank canvas


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(11)
    return {
        "dark": png(tmp_path / "in" / "dark.png", synthetic(rng, False)),
        "bright": png(tmp_path / "in" / "bright.png", synthetic(rng, True)),
        "bright_dcm": write_dicom(tmp_path / "in" / "bright_scan.dcm", synthetic(rng, True)),
    }


def json_lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------- predict


def test_predict_json_one_object_per_image(trained, images, cli):
    model = trained / "models/smallnet.keras"
    code, out, err = cli(["predict", "--model", str(model), *map(str, images.values()), "--json"])
    assert code == 0 and err == ""
    records = json_lines(out)
    assert [r["path"] for r in records] == [str(p) for p in images.values()]
    card = json.loads(card_path_for(model).read_text())
    shipped = card["operating_point"]["threshold"]  # Youden's J on validation, chosen at training time
    assert card["operating_point"]["chosen_on"] == "val" and 0 < shipped < 1
    for record in records:
        assert record["label"] in ("NORMAL", "PNEUMONIA")
        assert 0.0 <= record["probability"] <= 1.0
        assert record["threshold"] == shipped and "model card" in record["threshold_source"]
        assert record["label"] == ("PNEUMONIA" if record["probability"] >= shipped else "NORMAL")
        assert record["model_sha256"] == card["model_sha256"] and record["verified_model"] is True
        assert record["card_model_sha256"] == card["model_sha256"]
    at_half = {Path(r["path"]).name: "PNEUMONIA" if r["probability"] >= 0.5 else "NORMAL" for r in records}
    assert at_half == {"dark.png": "NORMAL", "bright.png": "PNEUMONIA", "bright_scan.dcm": "PNEUMONIA"}


def test_predict_bad_files_get_one_error_line_each(trained, images, tmp_path, cli):
    text = tmp_path / "bad" / "letter.jpeg"
    text.parent.mkdir()
    text.write_text("Dear doctor, this is not a radiograph.\n")
    missing = tmp_path / "bad" / "missing.png"
    cine = write_dicom(tmp_path / "bad" / "cine.dcm", np.zeros((3, 16, 16), np.uint8), frames=3)
    argv = [str(images["dark"]), str(text), str(missing), str(images["bright"]), str(cine)]
    code, out, err = cli(["predict", "--model", str(trained / "models/smallnet.keras"), "--json", *argv])
    assert code != 0
    assert [r["path"] for r in json_lines(out)] == [str(images["dark"]), str(images["bright"])]
    lines = err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("cxr: error: ") for line in lines)
    for bad, reason in (
        (text, "not a readable JPEG/PNG/BMP image"),
        (missing, "file not found"),
        (cine, "multi-frame"),
    ):
        naming = [line for line in lines if str(bad) in line]
        assert len(naming) == 1 and reason in naming[0]


def test_predict_exit_status_of_the_command(trained, tmp_path):
    """The process's exit status (not just main's return value)."""
    bad = tmp_path / "bad.png"
    bad.write_text("no")
    proc = subprocess.run(
        [sys.executable, "-m", "cxr", "predict", "--model", str(trained / "models/smallnet.keras"), str(bad)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 1 and proc.stdout == ""
    naming = [line for line in proc.stderr.splitlines() if str(bad) in line]
    assert len(naming) == 1 and naming[0].startswith(f"cxr: error: {bad}: not a readable JPEG/PNG/BMP image")
    assert "Traceback" not in proc.stderr


def test_predict_expands_folders(trained, tmp_path, cli):
    rng = np.random.default_rng(12)
    folder = tmp_path / "folder"
    expected = [
        png(folder / "a.png", synthetic(rng, False)),
        folder / "sub" / "b.jpeg",
        write_dicom(folder / "sub" / "c.dcm", synthetic(rng, True)),
    ]
    Image.fromarray(synthetic(rng, True)).save(expected[1], format="JPEG")
    png(folder / ".hidden" / "d.png", synthetic(rng, False))
    (folder / "notes.txt").write_text("not an image")
    code, out, _ = cli(["predict", "--model", str(trained / "models/smallnet.keras"), str(folder), "--json"])
    assert code == 0
    assert [r["path"] for r in json_lines(out)] == [str(p) for p in sorted(expected)]


def test_predict_human_format(trained, images, cli):
    code, out, _ = cli(["predict", "--model", str(trained / "models/smallnet.keras"), *map(str, images.values())])
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 3
    for path, line in zip(images.values(), lines, strict=True):
        assert line.startswith(f"{path}: ")
        assert re.search(r"prediction: (NORMAL|PNEUMONIA)  P\(Pneumonia\): 0\.\d{4}$", line), line


def test_predict_model_by_name_from_the_project(trained, images, cli, monkeypatch):
    monkeypatch.chdir(trained)
    code, out, _ = cli(["predict", "--model", "smallnet", str(images["dark"]), "--json", "--threshold", "0.99"])
    assert code == 0
    [record] = json_lines(out)
    assert record["threshold"] == 0.99 and record["label"] == "NORMAL"


def test_png_and_equivalent_dicom_predict_alike(trained, tmp_path):
    """A half dark / half bright image: the DICOM stretch (mean ± 2.5 std) is the identity on it."""
    rng = np.random.default_rng(13)
    pixels = np.where(np.arange(IMAGE_SIZE)[None, :] < IMAGE_SIZE // 2, 30, 220) + rng.normal(0, 10, (32, 32))
    pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    pixels[0, 0], pixels[-1, -1] = 0, 255
    as_png = png(tmp_path / "scan.png", pixels)
    as_dcm = write_dicom(tmp_path / "scan.dcm", pixels)
    lm = load(trained / "models/smallnet.keras")
    a, b = load_image(as_png, lm.input), load_image(as_dcm, lm.input)
    np.testing.assert_array_equal(a, b)
    probs = predict_images(lm.model, np.stack([a, b]))
    assert abs(probs[0] - probs[1]) < 1e-5


def test_predict_gradcam_writes_an_overlay_per_image(trained, images, tmp_path, cli):
    out_dir = tmp_path / "cams"
    code, out, _ = cli(
        [
            "predict",
            "--model",
            str(trained / "models/smallnet.keras"),
            *map(str, images.values()),
            "--json",
            "--gradcam",
            str(out_dir),
        ]
    )
    assert code == 0
    records = json_lines(out)
    assert len(records) == 3
    written = sorted(out_dir.iterdir())
    assert sorted(p.name for p in written) == sorted(Path(r["gradcam"]).name for r in records)
    assert all(p.name.endswith(".gradcam.png") for p in written)
    for record in records:
        assert Path(record["gradcam"]).parent == out_dir
        assert Path(record["gradcam"]).name.startswith(Path(record["path"]).stem + "-")
        assert_png(Path(record["gradcam"]), min_side=200)


def test_predict_gradcam_overlays_of_same_named_images_do_not_collide(trained, tmp_path, cli):
    rng = np.random.default_rng(14)
    first = png(tmp_path / "x" / "scan.png", synthetic(rng, False))
    second = write_dicom(tmp_path / "y" / "scan.dcm", synthetic(rng, True))
    code, out, _ = cli(
        [
            "predict",
            "--model",
            str(trained / "models/smallnet.keras"),
            str(first),
            str(second),
            "--json",
            "--gradcam",
            str(tmp_path / "cams"),
        ]
    )
    assert code == 0
    overlays = {r["gradcam"] for r in json_lines(out)}
    assert len(overlays) == 2 and len(list((tmp_path / "cams").iterdir())) == 2


def test_predict_writes_to_the_current_stdout(trained, images):
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        failures = cxr.inference.predict.predict(trained / "models/smallnet.keras", [images["dark"]], as_json=True)
    assert failures == 0
    assert buffer.getvalue().strip(), "predict wrote to the sys.stdout of import time"
    assert json.loads(buffer.getvalue())["path"] == str(images["dark"])


# ------------------------------------------------------------------------------------------ the loader


def _copy_model(trained: Path, folder: Path, name: str = "m") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}.keras"
    shutil.copy(trained / "models/smallnet.keras", target)
    shutil.copy(trained / "models/smallnet.card.json", card_path_for(target))
    return target


def test_load_takes_the_preprocessing_from_the_card(trained, tmp_path):
    model = _copy_model(trained, tmp_path / "copy")
    original = load(model)
    assert original.verified and original.input.image_size == IMAGE_SIZE
    card = json.loads(card_path_for(model).read_text())
    assert original.card.to_json() == card  # the card as written, through the one reader
    assert (original.input.resize, original.input.interpolation) == ("squash", "bilinear")
    # a wide image (64 × 32): squashed it fills the square, letter-boxed it gets black bands
    wide = png(tmp_path / "wide.png", np.full((32, 64), 200, np.uint8))
    assert load_image(wide, original.input).min() == 200
    card["input"]["preprocessing"].update(resize="pad", interpolation="area")
    card_path_for(model).write_text(json.dumps(card))
    lm = load(model)
    assert (lm.input.image_size, lm.input.resize, lm.input.interpolation) == (IMAGE_SIZE, "pad", "area")
    assert lm.verified  # the card is not part of the model's bytes
    image = load_image(wide, lm.input)
    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)  # 64 × 32 letter-boxed into 32 × 32: bands of 8 rows
    assert (image[:7] == 0).all() and (image[25:] == 0).all() and (image[9:23] == 200).all()
    # a card whose image size is not the model's input size describes another model
    card["input"]["preprocessing"].update(image_size=40)
    card_path_for(model).write_text(json.dumps(card))
    with pytest.raises(CxrError, match=r"image_size=40 but m\.keras takes 32×32×3 images"):
        load(model)


def test_a_model_that_does_not_match_its_card_is_refused_unless_allowed(trained, tmp_path, images, cli):
    model = _copy_model(trained, tmp_path / "copy")
    with open(model, "ab") as handle:
        handle.write(b"\0")  # still a loadable zip, but not the bytes the card describes
    with pytest.raises(CxrError, match="unverified model"):
        load(model)
    lm = load(model, allow_unverified=True)
    assert lm.verified is False and lm.sha256 != lm.card.model_sha256
    code, out, err = cli(["predict", "--model", str(model), str(images["dark"]), "--json"])
    assert code == 1 and out == "" and err.count("cxr: error:") == 1 and "--allow-unverified" in err
    code, out, err = cli(["predict", "--model", str(model), str(images["dark"]), "--json", "--allow-unverified"])
    record = json_lines(out)[0]
    assert code == 0 and record["verified_model"] is False
    assert record["model_sha256"] == lm.sha256 and record["card_model_sha256"] == lm.card.model_sha256
    assert "unverified model used as asked" in err and len(err.strip().splitlines()) == 1


def test_load_without_model_or_card_names_the_problem(trained, tmp_path):
    with pytest.raises(CxrError, match="model file not found"):
        load(tmp_path / "absent.keras")
    model = _copy_model(trained, tmp_path / "copy")
    card_path_for(model).unlink()
    with pytest.raises(CxrError, match="model card not found"):
        load(model)


# -------------------------------------------------------------------------------------------- evaluate


def _labelled_folder(root: Path, n: int = 6, seed: int = 21) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        png(root / "NORMAL" / f"IM-{9000 + i:04d}-0001.png", synthetic(rng, False))
        png(root / "PNEUMONIA" / f"person{900 + i}_virus_{i}.png", synthetic(rng, True))
    return root


def test_evaluate_command_on_a_labelled_folder(trained, tmp_path, cli, monkeypatch):
    data = _labelled_folder(tmp_path / "outside" / "test")
    (data / "NORMAL" / "broken.jpeg").write_text("truncated")
    monkeypatch.chdir(trained)
    code, out, _ = cli(["evaluate", "--model", "smallnet", "--data", str(tmp_path / "outside"), "--json"])
    assert code == 0
    [result] = json_lines(out)
    assert {"auc", "sensitivity", "specificity", "ci95", "n", "skipped"} <= set(result)
    assert result["n"] == 12 and [s["path"] for s in result["skipped"]] == [str(data / "NORMAL" / "broken.jpeg")]
    # the AUC of independently computed predictions
    lm = load(trained / "models/smallnet.keras")
    files = sorted((data / "NORMAL").glob("*.png")) + sorted((data / "PNEUMONIA").glob("*.png"))
    probs = predict_images(lm.model, np.stack([load_image(f, lm.input) for f in files]))
    assert result["auc"] == pytest.approx(roc_auc_score([0] * 6 + [1] * 6, probs))
    assert result["auc"] > 0.9
    low, high = result["ci95"]["auc"]
    assert low <= result["auc"] <= high
    card = json.loads((trained / "models/smallnet.card.json").read_text())
    assert result["at_threshold"]["threshold"] == card["operating_point"]["threshold"]  # the shipped one
    assert "model card" in result["threshold_source"]


def _split(root: Path, split: str) -> pd.DataFrame:
    frame = pd.read_csv(root / "data/prepared/splits.csv", keep_default_na=False, dtype={"patient_id": str})
    return frame[frame["split"] == split]


def test_evaluate_writes_dvc_metrics_and_per_model_files(evaluated):
    metrics = json.loads((evaluated / "reports/metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["threshold"] == 0.5 and metrics["comparison"] == []
    m = metrics["models"]["smallnet"]
    test = _split(evaluated, "test")
    assert m["n"] == len(test)
    predictions = pd.read_csv(
        evaluated / "reports/eval/smallnet/predictions.csv", keep_default_na=False, dtype={"patient_id": str}
    )
    assert list(predictions.columns) == ["path", "label", "patient_id", "probability"]
    assert predictions["path"].tolist() == test["path"].tolist()
    assert predictions["patient_id"].tolist() == test["patient_id"].tolist()
    assert m["auc"] == pytest.approx(roc_auc_score(predictions["label"], predictions["probability"]), abs=1e-5)
    assert m["auc"] > 0.9
    low, high = m["ci95"]["auc"]
    assert low <= m["auc"] <= high
    assert set(m["ci95"]) == {"auc", "sensitivity", "specificity", "accuracy"}
    assert 0 < m["youden_threshold"] < 1
    folder = evaluated / "reports/eval/smallnet"
    for name in ("roc.csv", "pr.csv", "calibration.csv", "metrics.json"):
        assert (folder / name).is_file()
    for name in ("confusion.png", "roc.png", "pr.png", "calibration.png"):
        assert_png(folder / name, min_side=200)
    roc = pd.read_csv(folder / "roc.csv")
    assert list(roc.columns) == ["fpr", "tpr", "threshold"] and roc["fpr"].iloc[0] == 0 and roc["tpr"].iloc[-1] == 1
    calibration = pd.read_csv(folder / "calibration.csv")
    assert calibration["count"].sum() == len(test)
    detail = json.loads((folder / "metrics.json").read_text())
    assert detail["verified"] is True and detail["at_threshold"]["confusion"]["tp"] + detail["at_threshold"][
        "confusion"
    ]["fn"] == int(test["label"].sum())


def test_youden_threshold_comes_from_the_validation_split(evaluated):
    lm = load(evaluated / "models/smallnet.keras")
    metrics = json.loads((evaluated / "reports/metrics.json").read_text())["models"]["smallnet"]
    val = _split(evaluated, "val")
    with chdir(evaluated):
        val_probs = predict_images(lm.model, np.stack([load_image(p, lm.input) for p in val["path"]]))
    on_val = youden_threshold(val["label"].to_numpy(), val_probs)
    predictions = pd.read_csv(evaluated / "reports/eval/smallnet/predictions.csv")
    on_test = youden_threshold(predictions["label"].to_numpy(), predictions["probability"].to_numpy())
    assert metrics["youden_threshold"] == pytest.approx(on_val, abs=1e-6)
    assert on_val != pytest.approx(on_test, abs=1e-6)  # otherwise this test could not tell them apart
    assert metrics["youden_threshold"] != pytest.approx(on_test, abs=1e-6)


def test_evaluate_compares_models_pairwise(evaluated, tmp_path):
    root = tmp_path / "p"
    shutil.copytree(evaluated, root)
    shutil.copy(root / "models/smallnet.keras", root / "models/twin.keras")
    card = json.loads((root / "models/smallnet.card.json").read_text())
    (root / "models/twin.card.json").write_text(json.dumps(card))
    params = small_params()
    params["evaluate"]["bootstrap"] = 50
    config = parse_params(params)
    with chdir(root):
        summary = evaluate_models(["smallnet", "twin"], config.evaluate, config.input)
    [comparison] = summary["comparison"]
    assert (comparison["a"], comparison["b"]) == ("smallnet", "twin")
    assert comparison["auc_difference"] == 0 and comparison["p_value"] == 1.0
    assert json.loads((root / "reports/metrics.json").read_text())["comparison"] == [comparison]
    assert (root / "reports/eval/twin/predictions.csv").is_file()


# --------------------------------------------------------------------------------------------- explain


def test_explain_writes_gallery_and_border_summary(evaluated):
    summary = json.loads((evaluated / "reports/gradcam/summary.json").read_text())
    assert summary["border_margin"] == 0.125
    assert summary["uniform_border_fraction"] == pytest.approx(1 - (1 - 2 * 0.125) ** 2)
    m = summary["models"]["smallnet"]
    assert m["layer"] == "conv3" and m["images"] == len(_split(evaluated, "test"))
    assert 0.0 <= m["border_fraction_mean"] <= 1.0
    assert m["border_to_uniform_ratio"] == pytest.approx(m["border_fraction_mean"] / 0.4375, abs=2e-3)
    assert_png(evaluated / "reports/gradcam/smallnet.png", min_side=200)
    assert m["gallery"] == "reports/gradcam/smallnet.png"
    predictions = pd.read_csv(evaluated / "reports/eval/smallnet/predictions.csv")
    by_path = dict(
        zip(predictions["path"], zip(predictions["label"], predictions["probability"], strict=True), strict=True)
    )
    counts: dict[str, int] = {}
    for example in m["examples"]:
        label, probability = by_path[example["path"]]
        assert example["outcome"] == outcome(label, probability, m["threshold"])
        assert example["label"] == ("PNEUMONIA" if label else "NORMAL")
        counts[example["outcome"]] = counts.get(example["outcome"], 0) + 1
    assert all(n <= 2 for n in counts.values()) and sum(counts.values()) >= 2


def _outcome_frame() -> pd.DataFrame:
    rows = []
    for kind, label, probability in (("TP", 1, 0.9), ("FP", 0, 0.8), ("TN", 0, 0.1), ("FN", 1, 0.2)):
        rows += [{"path": f"{kind}{i}.jpeg", "label": label, "probability": probability - i / 100} for i in range(5)]
    rows += [{"path": "edge.jpeg", "label": 0, "probability": 0.5}]  # at the threshold: a false positive
    return pd.DataFrame(rows).sample(frac=1, random_state=0).reset_index(drop=True)


def test_select_picks_up_to_n_of_each_outcome_deterministically():
    frame = _outcome_frame()
    chosen = select(frame, 0.5, 2, seed=3)
    assert chosen["outcome"].tolist() == ["TP", "TP", "FP", "FP", "TN", "TN", "FN", "FN"]
    assert all(p.startswith(o) or p == "edge.jpeg" for p, o in zip(chosen["path"], chosen["outcome"], strict=True))
    pd.testing.assert_frame_equal(chosen, select(frame, 0.5, 2, seed=3))
    picks = {tuple(select(frame, 0.5, 2, seed=s)["path"]) for s in range(6)}
    assert len(picks) > 1  # the seed matters
    everything = select(frame, 0.5, 10, seed=3)
    assert len(everything) == len(frame) and set(everything["path"]) == set(frame["path"])
    assert everything["outcome"].value_counts().to_dict() == {"FP": 6, "TP": 5, "TN": 5, "FN": 5}
    only_tn = select(frame[frame["path"].str.startswith("TN")], 0.5, 2, seed=3)
    assert only_tn["outcome"].tolist() == ["TN", "TN"] and set(OUTCOMES) >= set(only_tn["outcome"])


def test_outcome_names():
    assert [outcome(1, 0.7, 0.5), outcome(0, 0.5, 0.5), outcome(0, 0.2, 0.5), outcome(1, 0.49, 0.5)] == [
        "TP",
        "FP",
        "TN",
        "FN",
    ]


@pytest.mark.parametrize("size", [32, 48, 64])
def test_border_fraction(size):
    margin = 0.125
    band = round(size * margin)
    border = np.ones((size, size))
    border[band : size - band, band : size - band] = 0
    assert border_fraction(border, margin) == 1.0
    uniform = np.full((size, size), 0.3)
    assert border_fraction(uniform, margin) == pytest.approx(1 - (1 - 2 * margin) ** 2)
    centre = 1 - border
    assert border_fraction(centre, margin) == 0.0
    assert np.isnan(border_fraction(np.zeros((size, size)), margin))


def test_params_of_the_small_project_are_what_the_tests_assume(trained):
    params = yaml.safe_load((trained / "params.yaml").read_text())
    assert params == small_params()
    card = json.loads((trained / "models/smallnet.card.json").read_text())
    assert card["input"]["preprocessing"]["image_size"] == IMAGE_SIZE
    assert card["health"]["status"] == "healthy"
    assert card["precision_policy"] == "float32"
