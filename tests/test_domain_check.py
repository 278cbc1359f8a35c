"""The content half of the domain guard (issue 16): Mahalanobis distance of penultimate features,
fitted at training time, shipped and verified beside the model, and applied by predict and serve."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.common.domain import DomainModel, fit_domain, load_domain
from cxr.config import EvaluateConfig, parse_params
from cxr.errors import CxrError
from tests.factories import chdir, prepared_project, small_params, synthetic

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def test_the_threshold_is_the_validation_percentile_and_far_points_score_above_one() -> None:
    rng = np.random.default_rng(0)
    cov = np.diag([1.0, 4.0, 0.25, 1.0])
    train, val = rng.multivariate_normal(np.zeros(4), cov, 2000), rng.multivariate_normal(np.zeros(4), cov, 400)
    model = fit_domain(train, val, percentile=99.0)
    assert np.mean(model.scores(val) <= 1.0) == pytest.approx(0.99, abs=0.0026)  # by construction
    fresh = rng.multivariate_normal(np.zeros(4), cov, 2000)
    assert np.mean(model.scores(fresh) <= 1.0) > 0.97  # new draws of the same distribution stay in
    far = np.array([[0, 0, 3.0, 0], [6.0, 0, 0, 0]])  # 6 std along the narrow axis; 6 along a unit one
    assert (model.scores(far) > 1.0).all()
    # the covariance matters: 3 units along the wide axis is an ordinary film, along the narrow one it is not
    assert model.scores(np.array([[0, 3.0, 0, 0]]))[0] < 1.0 < model.scores(np.array([[0, 0, 3.0, 0]]))[0]


def test_the_statistics_round_trip_without_pickles_and_bad_files_are_refused(tmp_path: Path) -> None:
    model = DomainModel(np.zeros(3), np.eye(3), 2.5, 99.5)
    path = tmp_path / "m.domain.npz"
    path.write_bytes(model.to_bytes())
    loaded = load_domain(path)
    assert loaded.threshold == 2.5 and np.array_equal(loaded.precision, np.eye(3))
    assert model.to_bytes() == model.to_bytes()  # deterministic bytes: a stable sha256 in the card
    np.savez(path, mean=np.zeros(3), precision=np.eye(2), threshold=1.0, percentile=99.5)
    with pytest.raises(ValueError):
        load_domain(path)


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small synthetic project with smallnet trained and its content check shipped."""
    from cxr.training.train import train

    params = small_params()
    params["train"]["common"]["domain_check"] = True
    root = prepared_project(tmp_path_factory.mktemp("domain") / "p", params, hostile=False)
    with chdir(root):
        train("smallnet", parse_params(params))
    return root


def _png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def test_training_ships_the_statistics_beside_the_model_and_names_them_in_the_card(checked: Path) -> None:
    from cxr.provenance.hashing import sha256_file

    card = json.loads((checked / "models/smallnet.card.json").read_text())
    domain = card["domain"]
    sidecar = checked / "models/smallnet.domain.npz"
    assert domain["sha256"] == sha256_file(sidecar) and domain["file"] == "models/smallnet.domain.npz"
    assert domain["percentile"] == 99.5 and domain["threshold"] == load_domain(sidecar).threshold > 0
    assert domain["dimensions"] == 32  # SmallNet's Dense(32): the input of its output layer


def test_predict_gives_no_verdict_for_an_image_unlike_the_training_films(checked: Path, tmp_path: Path, cli) -> None:
    rng = np.random.default_rng(3)
    film = _png(tmp_path / "film.png", synthetic(rng, True))
    checker = _png(tmp_path / "checker.png", (np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8))
    noise = _png(tmp_path / "noise.png", rng.integers(0, 256, (32, 32)).astype(np.uint8))
    with chdir(checked):
        code, out, err = cli(["predict", "--model", "smallnet", "--json", str(film), str(checker), str(noise)])
        records = {Path(r["path"]).name: r for r in map(json.loads, out.splitlines())}
        assert code == 0 and err == ""
        assert records["film.png"]["in_domain"] is True and records["film.png"]["label"] in ("NORMAL", "PNEUMONIA")
        for name in ("checker.png", "noise.png"):
            r = records[name]
            assert (r["label"], r["probability"], r["in_domain"]) == ("OUT_OF_DOMAIN", None, False)
            assert r["ood_score"] > 1
        code, out, _ = cli(["predict", "--model", "smallnet", str(checker)])
        assert "OUT_OF_DOMAIN: unlike the training films (domain score" in out and "no verdict" in out
        code, out, _ = cli(["predict", "--model", "smallnet", "--json", "--allow-outside-intended-use", str(checker)])
        restored = json.loads(out)
        assert restored["label"] in ("NORMAL", "PNEUMONIA") and restored["in_domain"] is False


def test_statistics_that_are_not_the_cards_are_refused_in_one_line(checked: Path, tmp_path: Path) -> None:
    import shutil

    from cxr.inference.loading import load

    copy = tmp_path / "copy"
    shutil.copytree(checked / "models", copy)
    sidecar = copy / "smallnet.domain.npz"
    sidecar.write_bytes(DomainModel(np.zeros(32), np.eye(32) * 1e-9, 1e9).to_bytes())  # "everything is in"
    with pytest.raises(CxrError, match=r"smallnet\.domain\.npz: domain statistics not the file the card names"):
        load(copy / "smallnet.keras")
    assert load(copy / "smallnet.keras", allow_unverified=True).domain is None  # warned, no check
    sidecar.unlink()
    with pytest.raises(CxrError, match="domain statistics missing"):
        load(copy / "smallnet.keras")


def test_serve_answers_out_of_domain_with_200_and_no_verdict(checked: Path) -> None:
    from fastapi.testclient import TestClient

    from cxr.inference.loading import load
    from cxr.serving.app import create_app

    buffer = io.BytesIO()
    Image.fromarray((np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)).save(buffer, format="PNG")
    with TestClient(create_app(load(checked / "models/smallnet.keras"), 0.5, "test")) as client:
        answer = client.post("/predict", files={"file": ("checker.png", buffer.getvalue())})
    record = answer.json()
    assert answer.status_code == 200 and record["label"] == "OUT_OF_DOMAIN" and record["probability"] is None
    assert record["in_domain"] is False and record["ood_score"] > 1


def test_evaluate_and_the_report_count_the_images_of_a_set_outside_the_domain(checked: Path) -> None:
    from cxr.evaluation.evaluate import evaluate_models
    from cxr.reporting.report import render

    rng = np.random.default_rng(9)
    folder = checked / "odd_site"
    for class_name, bright in (("NORMAL", False), ("PNEUMONIA", True)):
        for i in range(4):
            _png(folder / class_name / f"film-{i}.png", synthetic(rng, bright))
            _png(folder / class_name / f"noise-{i}.png", rng.integers(0, 256, (32, 32)).astype(np.uint8))
    params = small_params()
    params["evaluate"].update(external={"odd_site": "odd_site"}, bootstrap=20)
    config = parse_params(params)
    with chdir(checked):
        summary = evaluate_models(["smallnet"], config.evaluate, config.input)
        html = Path(render(["smallnet"])["html"]).read_text()
    domain = summary["external"]["odd_site"]["models"]["smallnet"]["domain"]
    assert domain["n"] == 16 and 8 <= domain["flagged"] <= 10  # the 8 noise images, and at most 2 films
    assert domain["p95_score"] > 1 and domain["share_flagged"] == round(domain["flagged"] / 16, 4)
    assert "id='out-of-domain-odd_site-smallnet'" in html


def test_the_ensemble_checks_every_member_and_keeps_the_worst_score(checked: Path, tmp_path: Path, cli) -> None:
    from cxr.inference.loading import load
    from cxr.provenance.hashing import sha256_file
    from cxr.training.ensemble import build_ensemble
    from cxr.training.train import train

    params = small_params()
    params["train"]["common"]["domain_check"] = True
    params["train"]["models"] = ["smallnet", "cxrnet"]
    params["train"]["cxrnet"].update(epochs=2, widths=[8, 8, 8, 8])
    params["ensemble"] = {"members": ["smallnet", "cxrnet"]}
    rng = np.random.default_rng(4)
    film = _png(tmp_path / "film.png", synthetic(rng, False))
    checker = _png(tmp_path / "checker.png", (np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8))
    with chdir(checked):
        train("cxrnet", parse_params(params))
        card = build_ensemble(parse_params(params))
        sidecar = Path("ensemble/ensemble.domain.npz")
        assert card["domain"]["members"] == ["smallnet", "cxrnet"]
        assert card["domain"]["sha256"] == sha256_file(sidecar) and card["domain"]["file"] == sidecar.as_posix()
        lm = load("ensemble/ensemble.keras")
        members = [load(f"models/{m}.keras") for m in ("smallnet", "cxrnet")]
        from cxr.inference.loading import load_image

        images = np.stack([load_image(p, lm.input) for p in (film, checker)])
        _, scores = lm.score(images)
        np.testing.assert_allclose(scores, np.max([m.score(images)[1] for m in members], axis=0), rtol=1e-5)
        code, out, _ = cli(["predict", "--model", "ensemble", "--json", str(film), str(checker)])
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["in_domain"] for r in records] == [True, False]
    assert records[1]["label"] == "OUT_OF_DOMAIN"


def test_grad_cam_shows_in_domain_films_and_reader_agreement_marks_the_others(checked: Path, tmp_path: Path) -> None:
    import pandas as pd

    from cxr.evaluation.agreement import agreement_for_report
    from cxr.evaluation.evaluate import evaluate_models
    from cxr.evaluation.explain import explain_models

    params = small_params()
    params["evaluate"].update(external={}, bootstrap=20)
    config = parse_params(params)
    with chdir(checked):
        summary = evaluate_models(["smallnet"], config.evaluate, config.input)
        explained = explain_models(["smallnet"], config.evaluate, config.input)
        record = json.loads(Path("reports/eval/smallnet/domain.json").read_text())
        predictions = pd.read_csv("reports/eval/smallnet/predictions.csv", keep_default_na=False)
    test = summary["models"]["smallnet"]["domain"]
    assert test["n"] == len(predictions) and test["flagged"] == len(record["flagged_paths"])
    assert explained["models"]["smallnet"]["out_of_domain_skipped"] == test["flagged"]
    shown = {e["path"] for e in explained["models"]["smallnet"]["examples"]}
    assert not shown & set(record["flagged_paths"])
    # a film the check flags stays in the readers' comparison, marked
    victim = predictions["path"].iloc[0]
    (checked / "reports/eval/smallnet/domain.json").write_text(json.dumps({**record, "flagged_paths": [victim]}))
    readers = tmp_path / "readers.csv"
    readers.write_text(
        "path,r1,r2\n"
        + "".join(f"{p},{y},{y}\n" for p, y in zip(predictions["path"], predictions["label"], strict=True))
    )
    result = agreement_for_report(
        readers, "smallnet", EvaluateConfig(bootstrap=10), tmp_path / "a.json", checked / "reports/eval"
    )
    assert result["out_of_domain"] == {"images": 1, "paths": [victim]}


def test_a_model_without_a_check_still_ships_the_file_dvc_declares(trained: Path) -> None:
    """``domain_check: false`` (the small project's setting): the sidecar says so; the card has no domain."""
    card = json.loads((trained / "models/smallnet.card.json").read_text())
    assert card["domain"] is None
    with np.load(trained / "models/smallnet.domain.npz", allow_pickle=False) as data:
        assert list(data.files) == ["no_check"]
