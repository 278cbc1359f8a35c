"""External validation sets, the shipped-threshold rule, the ensemble and predict's default threshold,
on the small synthetic project (conftest's ``evaluated``, copied before anything is written)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from cxr.common.metrics import youden_threshold
from cxr.common.thresholds import threshold_rule
from cxr.config import EvaluateConfig, InputConfig, parse_params
from cxr.data.external_sets import external_sets, index_external, load_external
from cxr.errors import CxrError, DataError
from cxr.evaluation.evaluate import evaluate_models
from cxr.inference.loading import load, load_image, model_file, predict_images
from cxr.training.ensemble import build_ensemble, evaluated_models, members_of
from cxr.training.train import TrainConfig, train
from tests.factories import chdir, small_params, synthetic

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def write_external(root: Path, n: int = 6, seed: int = 7, corrupt: bool = True, wrapper: str = "test") -> Path:
    """A labelled folder from "another hospital": slightly shifted intensities, Kaggle layout."""
    rng = np.random.default_rng(seed)
    base = root / wrapper if wrapper else root
    for i in range(n):
        for class_name, name, bright in (
            ("NORMAL", f"IM-{900 + i:04d}-0001.jpeg", False),
            ("PNEUMONIA", f"person{900 + i}_virus_{i}.jpeg", True),
        ):
            path = base / class_name / name
            path.parent.mkdir(parents=True, exist_ok=True)
            image = np.clip(synthetic(rng, bright).astype(int) + 15, 0, 255).astype(np.uint8)
            Image.fromarray(image, mode="L").save(path, format="JPEG")
    if corrupt:
        (base / "PNEUMONIA" / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


@pytest.fixture
def project(evaluated: Path, tmp_path: Path) -> Path:
    root = tmp_path / "project"
    shutil.copytree(evaluated, root)
    write_external(root / "site_b")
    return root


def _params(rule: str = "validation", **extra: object) -> dict:
    params = small_params()
    params["evaluate"].update(external={"site_b": "site_b"}, threshold_source=rule, **extra)
    return params


def _sections(rule: str = "validation", **extra: object) -> tuple[EvaluateConfig, InputConfig]:
    """The ``evaluate`` and ``input`` sections of :func:`_params`, as ``evaluate_models`` takes them."""
    config = parse_params(_params(rule, **extra))
    return config.evaluate, config.input


# ------------------------------------------------------------------------------------------- index


def test_index_lists_every_readable_image_and_each_unreadable_one_with_its_reason(tmp_path):
    folder = write_external(tmp_path / "ext")
    splits = tmp_path / "splits.csv"
    pneumonia = sorted((folder / "test/PNEUMONIA").glob("person*.jpeg"))
    from cxr.provenance.hashing import sha256_file

    # only train and validation images count: the test split is scored, not learned from
    pd.DataFrame(
        {
            "path": ["x.jpeg", "y.jpeg", "z.jpeg"],
            "sha256": [sha256_file(pneumonia[0]), "0" * 64, sha256_file(pneumonia[2])],
            "patient_id": ["person999", "person901", "person902"],
            "split": ["train", "val", "test"],
        }
    ).to_csv(splits, index=False)
    summary = index_external("site_b", folder, tmp_path / "index", splits)
    assert summary["images"] == 12 and summary["class_counts"] == {"NORMAL": 6, "PNEUMONIA": 6}
    assert summary["prevalence"] == 0.5
    [bad] = summary["excluded"]
    assert (bad["path"].endswith("broken.jpeg") and "not an image" in bad["reason"]) or "corrupt" in bad["reason"]
    overlap = summary["overlap_with_training"]
    assert overlap["identical_files"] == 1 and overlap["shared_patient_ids"] == 1
    assert overlap["shared_patient_examples"] == ["person901"]
    rows = pd.read_csv(tmp_path / "index/site_b.csv", keep_default_na=False)
    assert list(rows.columns) == ["path", "label", "class_name", "patient_id", "sha256"]
    assert rows["label"].tolist() == [0] * 6 + [1] * 6
    assert set(rows.loc[rows["label"] == 1, "patient_id"]) == {f"person{900 + i}" for i in range(6)}
    assert json.loads((tmp_path / "index/site_b.json").read_text()) == summary


def test_an_index_that_no_longer_describes_its_folder_is_refused(tmp_path):
    folder = write_external(tmp_path / "ext", corrupt=False)
    index_external("site_b", folder, tmp_path / "index", tmp_path / "none.csv")
    loaded = load_external("site_b", folder, tmp_path / "index")
    assert len(loaded.paths) == 12 and loaded.prevalence == 0.5
    victim = Path(loaded.paths[3])
    victim.write_bytes(victim.read_bytes() + b"\x00")
    with pytest.raises(DataError, match="changed since the set was indexed"):
        load_external("site_b", folder, tmp_path / "index")


def test_a_set_without_both_classes_is_refused(tmp_path):
    folder = tmp_path / "ext"
    write_external(folder, corrupt=False)
    shutil.rmtree(folder / "test/NORMAL")
    with pytest.raises(DataError, match="both classes"):
        index_external("site_b", folder, tmp_path / "index")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"test": "x"}, "must start with a letter"),
        ({"1st": "x"}, "must start with a letter"),
        (["x"], "expected a mapping"),
        ({"ok": 3}, "expected a folder path"),
    ],
)
def test_external_set_names_are_checked(value, message):
    with pytest.raises(CxrError, match=message):
        external_sets(EvaluateConfig(external=value))


def test_threshold_rules_are_checked():
    site_b = {"site_b": "b"}
    assert threshold_rule(EvaluateConfig(), []) == ("validation", None)
    assert threshold_rule(EvaluateConfig(threshold_source="fixed"), []) == ("fixed", None)
    rule = EvaluateConfig(external=site_b, threshold_source="external:site_b")
    assert threshold_rule(rule, ["site_b"]) == ("external", "site_b")
    with pytest.raises(CxrError, match="no external set named 'site_c'"):  # refused as the section is read
        threshold_rule(EvaluateConfig(external=site_b, threshold_source="external:site_c"), ["site_b"])
    with pytest.raises(CxrError, match="choose one of"):
        threshold_rule(EvaluateConfig(threshold_source="test"), [])


# ---------------------------------------------------------------------------------------- evaluate


def _external_predictions(root: Path, model: str = "smallnet") -> pd.DataFrame:
    return pd.read_csv(root / f"reports/eval/{model}/external-site_b/predictions.csv", keep_default_na=False)


def test_evaluate_scores_each_external_set_at_the_validation_threshold(project):
    with chdir(project):
        summary = evaluate_models(["smallnet"], *_sections())
    card = json.loads((project / "models/smallnet.card.json").read_text())
    shipped = card["operating_point"]["threshold"]
    ext = summary["external"]["site_b"]
    m = ext["models"]["smallnet"]
    assert ext["n"] == 12 and ext["prevalence"] == 0.5 and ext["folder"] == "site_b"
    assert m["threshold"] == shipped and m["threshold_chosen_on_this_set"] is False
    predictions = _external_predictions(project)
    assert len(predictions) == 12 and not predictions["path"].str.contains("broken").any()
    assert m["auc"] == pytest.approx(roc_auc_score(predictions["label"], predictions["probability"]), abs=1e-6)
    predicted = predictions["probability"] >= shipped
    normal = predictions["label"] == 0
    assert m["specificity"] == pytest.approx((~predicted[normal]).mean())
    assert m["sensitivity"] == pytest.approx(predicted[~normal].mean())
    assert set(m["ci95"]) >= {"auc", "sensitivity", "specificity"} and m["calibration"]["ece"] >= 0
    assert summary["models"]["smallnet"]["operating_point"]["chosen_on"] == "val"
    on_disk = json.loads((project / "reports/metrics.json").read_text())
    assert on_disk["external"]["site_b"]["models"]["smallnet"]["auc"] == m["auc"]
    assert (project / "data/external/site_b.csv").is_file()  # indexed on first use (no DVC)
    for plot in ("roc.png", "pr.png", "calibration.png", "confusion.png"):
        assert (project / "reports/eval/smallnet/external-site_b" / plot).is_file()


def test_a_threshold_chosen_on_an_external_set_is_labelled_and_shipped_to_predict(project, cli):
    with chdir(project):
        summary = evaluate_models(["smallnet"], *_sections("external:site_b"))
        predictions = _external_predictions(project)
        expected = youden_threshold(predictions["label"].to_numpy(), predictions["probability"].to_numpy())
        m = summary["external"]["site_b"]["models"]["smallnet"]
        assert m["threshold"] == pytest.approx(expected) and m["threshold_chosen_on_this_set"] is True
        point = json.loads((project / "reports/eval/smallnet/operating_point.json").read_text())
        assert point["chosen_on"] == "site_b" and point["threshold"] == pytest.approx(expected)
        assert summary["models"]["smallnet"]["threshold"] == pytest.approx(expected)  # test split: same cut
        lm = load("models/smallnet.keras")
        assert lm.threshold()[0] == pytest.approx(expected)
        image = str(sorted(Path("site_b/test/NORMAL").glob("*.jpeg"))[0])
        code, out, _ = cli(["predict", "--model", "smallnet", image, "--json"])
        record = json.loads(out)
        assert code == 0 and record["threshold"] == pytest.approx(expected)
        assert "external set site_b" in record["threshold_source"]
        code, out, _ = cli(["predict", "--model", "smallnet", image, "--json", "--threshold", "0.25"])
        assert json.loads(out)["threshold"] == 0.25 and json.loads(out)["threshold_source"] == "--threshold"
        # an operating point recorded for other model bytes is not used
        point["model_sha256"] = "0" * 64
        (project / "reports/eval/smallnet/operating_point.json").write_text(json.dumps(point))
        card = json.loads(Path("models/smallnet.card.json").read_text())
        assert lm.threshold()[0] == card["operating_point"]["threshold"]


def test_a_fixed_threshold_rule_uses_evaluate_threshold(project):
    with chdir(project):
        summary = evaluate_models(["smallnet"], *_sections("fixed", threshold=0.3))
    assert summary["models"]["smallnet"]["threshold"] == 0.3
    assert summary["external"]["site_b"]["models"]["smallnet"]["threshold"] == 0.3


def test_report_summary_puts_external_sets_first(project):
    from cxr.reporting.report import render, summary_rows

    with chdir(project):
        evaluate_models(["smallnet"], *_sections())
        result = render(["smallnet"])
        html = Path(result["html"]).read_text()
        from cxr.reporting.report import collect

        rows = summary_rows(collect(["smallnet"]))
    assert [r["set"] for r in rows] == ["site_b", "test"]
    assert rows[0]["n"] == 12 and rows[0]["prevalence"] == 0.5
    assert html.index("<h2>Summary</h2>") < html.index("<h2>Data</h2>")
    import html as html_lib

    rule = json.loads((project / "reports/metrics.json").read_text())["models"]["smallnet"]["operating_point"]["rule"]
    assert "external: site_b" in html and html_lib.escape(rule) in html
    assert "| external: site_b | smallnet | 12 |" in result["markdown"]


# ---------------------------------------------------------------------------------------- ensemble


@pytest.fixture
def two_models(project: Path) -> Path:
    params = small_params()
    params["train"]["models"] = ["smallnet", "cxrnet"]
    params["train"]["cxrnet"].update(epochs=2, widths=[8, 8, 8, 8])
    with chdir(project):
        train("cxrnet", parse_params(params))
    return project


def test_the_ensemble_is_the_mean_of_its_members_and_ships_like_a_model(two_models, cli):
    params = small_params()
    params["train"]["models"] = ["smallnet", "cxrnet"]
    params["ensemble"] = {"members": ["smallnet", "cxrnet"]}
    params["evaluate"].update(external={"site_b": "site_b"})
    config = parse_params(params)
    with chdir(two_models):
        card = build_ensemble(config)
        assert [m["model"] for m in card["members"]] == ["smallnet", "cxrnet"]
        assert card["operating_point"]["chosen_on"] == "val" and card["health"]["status"] == "healthy"
        ensemble = load(model_file("ensemble"))
        assert ensemble.verified and ensemble.path == Path("ensemble/ensemble.keras")
        files = sorted(Path("site_b/test/PNEUMONIA").glob("person*.jpeg"))
        images = np.stack([load_image(f, ensemble.input) for f in files])
        members = [predict_images(load(f"models/{m}.keras").model, images) for m in ("smallnet", "cxrnet")]
        np.testing.assert_allclose(predict_images(ensemble.model, images), np.mean(members, axis=0), atol=1e-5)
        assert evaluated_models(config) == ["smallnet", "cxrnet", "ensemble"]
        summary = evaluate_models(evaluated_models(config), config.evaluate, config.input)
        assert set(summary["external"]["site_b"]["models"]) == {"smallnet", "cxrnet", "ensemble"}
        assert len(summary["external"]["site_b"]["comparison"]) == 3
        code, out, _ = cli(["predict", "--model", "ensemble", str(files[0]), "--json"])
        record = json.loads(out)
        assert code == 0 and record["model_sha256"] == card["model_sha256"] and record["verified_model"] is True
        lineage = [json.loads(line) for line in Path("lineage/models.jsonl").read_text().splitlines()]
        assert lineage[-1]["model"] == "ensemble" and len(lineage[-1]["members"]) == 2


def test_ensemble_members_are_checked(two_models):
    params = small_params()
    params["train"]["models"] = ["smallnet", "cxrnet"]
    for members, message in (
        (["smallnet", "vgg16"], "not in train.models"),
        (["smallnet"], "at least two"),
        (["smallnet", "smallnet"], "twice"),
    ):
        params["ensemble"] = {"members": members}
        with pytest.raises(CxrError, match=message):
            members_of(parse_params(params))
    params["ensemble"] = {"members": []}
    with chdir(two_models):
        assert build_ensemble(parse_params(params)) is None
        assert json.loads(Path("ensemble/ensemble.json").read_text()) == {"enabled": False, "members": []}
        assert evaluated_models(parse_params(params)) == ["smallnet", "cxrnet"]
        # a member whose bytes differ from its card is refused
        params["ensemble"] = {"members": ["smallnet", "cxrnet"]}
        with open("models/cxrnet.keras", "ab") as handle:
            handle.write(b"\0")
        with pytest.raises(CxrError, match="differs from its card"):
            build_ensemble(parse_params(params))


def test_sensitivity_target_rule_picks_the_highest_threshold_that_keeps_it(project):
    from cxr.common.metrics import sensitivity_threshold
    from cxr.common.thresholds import validation_operating_point

    labels = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    probs = np.array([0.1, 0.3, 0.6, 0.2, 0.5, 0.55, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99])
    assert sensitivity_threshold(labels, probs, 0.9) == 0.5  # one of ten may be missed: 0.2
    assert sensitivity_threshold(labels, probs, 0.8) == 0.55
    assert sensitivity_threshold(labels, probs, 0.99) == 0.2
    assert validation_operating_point(labels, probs)["rule"] == "Youden's J on the validation split"
    assert validation_operating_point(np.ones(4), np.full(4, 0.5)) is None
    params = small_params()
    params["train"]["common"]["target_sensitivity"] = 0.9
    with chdir(project):
        card = train("smallnet", parse_params(params))  # the card carries the rule's threshold, rule and set
        point = card["operating_point"]
        assert point["chosen_on"] == "val" and "sensitivity ≥ 0.9" in point["rule"]
        val = pd.read_csv("data/prepared/splits.csv", keep_default_na=False).query("split == 'val'")
        lm = load("models/smallnet.keras")
        val_probs = predict_images(lm.model, np.stack([load_image(p, lm.input) for p in val["path"]]))
        assert point["threshold"] == pytest.approx(
            sensitivity_threshold(val["label"].to_numpy(), val_probs, 0.9), abs=1e-6
        )
        summary = evaluate_models(["smallnet"], *_sections())
        assert summary["models"]["smallnet"]["operating_point"] == point  # evaluate ships the card's
    for bad in (1.5, 0):
        params["train"]["common"]["target_sensitivity"] = bad
        with pytest.raises(CxrError, match="target_sensitivity"):
            TrainConfig.from_params(params["train"], "smallnet")


def test_evaluate_command_prints_one_line_per_model_and_data_set(project, cli, monkeypatch):
    import yaml

    monkeypatch.chdir(project)
    Path("params.yaml").write_text(yaml.safe_dump(_params()))
    code, out, _ = cli(["evaluate"])
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 2
    assert lines[0].startswith("smallnet on external site_b: n=12 AUC ") and " at threshold " in lines[0]
    assert lines[1].startswith("smallnet on test split: n=")


# ------------------------------------------------------------------------------ selection / confirmation


def test_a_selection_set_says_how_many_configurations_were_compared_on_it(project):
    from cxr.reporting.report import render

    with chdir(project):
        summary = evaluate_models(["smallnet"], *_sections(compared={"site_b": 7}))
        result = render(["smallnet"])
        html = Path(result["html"]).read_text()
    assert summary["external"]["site_b"]["role"] == "selection"
    assert summary["external"]["site_b"]["configurations_compared"] == 7
    assert json.loads((project / "reports/metrics.json").read_text())["external"]["site_b"]["role"] == "selection"
    assert "id='selection-site_b'" in html and "7 configurations were compared on it" in html
    assert "- site_b: selection set, 7 configurations compared on it" in result["markdown"]
    assert not (project / "lineage/confirmation.jsonl").exists()  # nothing to record for a selection set


def test_a_confirmation_set_is_flagged_once_settings_change_after_its_first_scoring(project):
    from cxr.reporting.report import render

    confirm = {"roles": {"site_b": "confirmation"}}
    log = project / "lineage/confirmation.jsonl"
    with chdir(project):
        first = evaluate_models(["smallnet"], *_sections(**confirm))
        again = evaluate_models(["smallnet"], *_sections(**confirm))
        html = Path(render(["smallnet"])["html"]).read_text()
        assert "id='confirmation-site_b'" in html and "no longer confirmatory" not in html
        changed = evaluate_models(["smallnet"], *_sections("fixed", threshold=0.3, **confirm))
        result = render(["smallnet"])
        html = Path(result["html"]).read_text()
    roles = [s["external"]["site_b"] for s in (first, again, changed)]
    assert [r["role"] for r in roles] == ["confirmation"] * 3
    assert [r["changed_after_first_scored"] for r in roles] == [False, False, True]
    assert roles[0]["first_scored"] == roles[2]["first_scored"]  # the first scoring is kept, not replaced
    assert roles[0]["settings_sha256"] == roles[1]["settings_sha256"] != roles[2]["settings_sha256"]
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert (
        len(lines) == 1 and lines[0]["set"] == "site_b" and lines[0]["settings_sha256"] == roles[0]["settings_sha256"]
    )
    assert "class='warn' id='confirmation-site_b'" in html and "no longer confirmatory" in html
    assert "- site_b: confirmation set, settings changed after its first scoring" in result["markdown"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"roles": {"site_c": "selection"}}, r"evaluate\.roles\.site_c: no external set named 'site_c'"),
        ({"roles": {"site_b": "final"}}, r"evaluate\.roles\.site_b='final': choose one of selection, confirmation"),
        ({"compared": {"site_b": 0}}, r"evaluate\.compared\.site_b=0: give the number"),
        ({"roles": {"site_b": "confirmation"}, "compared": {"site_b": 3}}, "never used to compare"),
    ],
)
def test_set_roles_are_checked_in_one_line(extra, message):
    from cxr.config import ConfigError, parse_section
    from cxr.config import EvaluateConfig as Section

    with pytest.raises(ConfigError, match=message):
        parse_section(Section, {"external": {"site_b": "b"}, **extra}, "evaluate")
