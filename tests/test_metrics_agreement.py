"""Clinical metrics (threshold metrics, Youden, patient bootstrap, paired AUC test, calibration) and
reader agreement (Cohen's and Fleiss' kappa, the readers CSV, the ``cxr agreement`` command)."""

from __future__ import annotations

import json
from itertools import combinations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from cxr.common.metrics import (
    at_threshold,
    bootstrap,
    calibration_bins,
    interval,
    paired_auc_test,
    threshold_free,
    youden_threshold,
)
from cxr.errors import DataError
from cxr.evaluation.agreement import agreement, fleiss_kappa, read_readers

# --------------------------------------------------------------------------------------------- metrics

LABELS = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
PROBS = np.array([0.9, 0.8, 0.5, 0.3, 0.7, 0.4, 0.2, 0.1, 0.55, 0.05])  # 0.5 sits exactly on the threshold


def test_at_threshold_counts_and_ratios_by_hand():
    result = at_threshold(LABELS, PROBS, 0.5)
    # predicted positive: 0.9, 0.8, 0.5 (≥ threshold), 0.7, 0.55 → TP 3, FN 1, FP 2, TN 4
    assert result["confusion"] == {"tn": 4, "fp": 2, "fn": 1, "tp": 3}
    assert result["threshold"] == 0.5
    assert result["sensitivity"] == pytest.approx(3 / 4)
    assert result["specificity"] == pytest.approx(4 / 6)
    assert result["ppv"] == pytest.approx(3 / 5)
    assert result["npv"] == pytest.approx(4 / 5)
    assert result["f1"] == pytest.approx(2 * (3 / 5) * (3 / 4) / (3 / 5 + 3 / 4))
    assert result["balanced_accuracy"] == pytest.approx((3 / 4 + 4 / 6) / 2)
    assert result["accuracy"] == pytest.approx(7 / 10)


def test_at_threshold_undefined_ratios_are_none():
    result = at_threshold(LABELS, PROBS, 0.95)  # nothing predicted positive
    assert result["confusion"] == {"tn": 6, "fp": 0, "fn": 4, "tp": 0}
    assert result["ppv"] is None and result["sensitivity"] == 0.0 and result["specificity"] == 1.0
    only_negatives = at_threshold(np.zeros(4), np.array([0.1, 0.6, 0.2, 0.3]), 0.5)
    assert only_negatives["sensitivity"] is None and only_negatives["balanced_accuracy"] is None
    assert only_negatives["specificity"] == pytest.approx(3 / 4)


def test_threshold_free_metrics():
    result = threshold_free(LABELS, PROBS)
    assert result["auc"] == pytest.approx(roc_auc_score(LABELS, PROBS))
    assert result["brier"] == pytest.approx(np.mean((PROBS - LABELS) ** 2))
    assert result["n"] == 10 and result["positives"] == 4
    assert threshold_free(np.ones(3), np.array([0.2, 0.5, 0.9]))["auc"] is None


def test_youden_threshold_separates_separable_data():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(50), np.ones(50)]
    probs = np.r_[rng.uniform(0.05, 0.3, 50), rng.uniform(0.6, 0.95, 50)]
    threshold = youden_threshold(labels, probs)
    assert probs[labels == 0].max() < threshold <= probs[labels == 1].min()
    result = at_threshold(labels, probs, threshold)
    assert result["sensitivity"] == 1.0 and result["specificity"] == 1.0


def test_youden_threshold_maximises_j_on_overlapping_data():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    probs = np.clip(0.35 + 0.3 * labels + rng.normal(0, 0.2, 300), 0, 1)
    threshold = youden_threshold(labels, probs)

    def j(t: float) -> float:
        r = at_threshold(labels, probs, t)
        return r["sensitivity"] + r["specificity"] - 1

    best = max(j(t) for t in np.unique(probs))
    assert j(threshold) == pytest.approx(best)
    assert 0.0 <= threshold <= 1.0


def _image_bootstrap(labels: np.ndarray, probs: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """AUCs of a plain bootstrap over images, drawn the way a per-image resampler would draw them."""
    rng = np.random.default_rng(seed)
    out = np.full(n_boot, np.nan)
    for b in range(n_boot):
        idx = rng.integers(0, len(labels), len(labels))
        if labels[idx].min() != labels[idx].max():
            out[b] = roc_auc_score(labels[idx], probs[idx])
    return out


def test_bootstrap_with_one_group_per_image_is_an_image_bootstrap():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 60)
    probs = np.clip(0.3 + 0.4 * labels + rng.normal(0, 0.25, 60), 0, 1)
    expected = _image_bootstrap(labels, probs, 200, seed=7)
    distinct = bootstrap(labels, [probs], [f"p{i}" for i in range(60)], 0.5, 200, seed=7)[0]
    unnamed = bootstrap(labels, [probs], [""] * 60, 0.5, 200, seed=7)[0]  # no patient id: each image alone
    np.testing.assert_allclose(distinct["auc"], expected)
    np.testing.assert_allclose(unnamed["auc"], expected)


def _clustered(n_patients: int = 10, per_patient: int = 20) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every image of a patient has the patient's label and the same prediction."""
    rng = np.random.default_rng(3)
    patient_labels = np.array([0, 1] * (n_patients // 2))
    patient_probs = np.clip(0.35 + 0.3 * patient_labels + rng.normal(0, 0.2, n_patients), 0.01, 0.99)
    labels = np.repeat(patient_labels, per_patient)
    probs = np.repeat(patient_probs, per_patient)
    groups = [f"patient{p}" for p in range(n_patients) for _ in range(per_patient)]
    return labels, probs, groups


def test_bootstrap_resamples_patients_as_blocks():
    labels, probs, groups = _clustered()
    by_patient = bootstrap(labels, [probs], groups, 0.5, 400, seed=1)[0]
    by_image = bootstrap(labels, [probs], [f"i{i}" for i in range(len(labels))], 0.5, 400, seed=1)[0]
    # 10 patients of 20 images each: a resample holds whole patients, so accuracy moves in tenths
    accuracy = by_patient["accuracy"][np.isfinite(by_patient["accuracy"])]
    assert accuracy.size > 300
    np.testing.assert_allclose(accuracy * 10, np.round(accuracy * 10), atol=1e-9)
    image_accuracy = by_image["accuracy"][np.isfinite(by_image["accuracy"])]
    assert not np.allclose(image_accuracy * 10, np.round(image_accuracy * 10))
    # ... and the interval reflects 10 independent patients, not 200 independent images
    width = np.diff(interval(by_patient["auc"]))[0]
    image_width = np.diff(interval(by_image["auc"]))[0]
    assert width > 2 * image_width


def test_bootstrap_intervals_contain_the_estimate_and_are_seeded():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 120)
    probs = np.clip(0.3 + 0.4 * labels + rng.normal(0, 0.2, 120), 0, 1)
    groups = [f"p{i // 3}" for i in range(120)]
    first = bootstrap(labels, [probs], groups, 0.5, 300, seed=42)[0]
    again = bootstrap(labels, [probs], groups, 0.5, 300, seed=42)[0]
    other = bootstrap(labels, [probs], groups, 0.5, 300, seed=43)[0]
    point = {
        "auc": roc_auc_score(labels, probs),
        **{k: at_threshold(labels, probs, 0.5)[k] for k in ("sensitivity", "specificity", "accuracy")},
    }
    for key, value in point.items():
        np.testing.assert_array_equal(first[key], again[key])
        assert not np.array_equal(first[key], other[key])
        low, high = interval(first[key])
        assert low <= value <= high and low < high


def test_interval_needs_enough_finite_samples():
    assert interval(np.r_[np.arange(9.0), np.full(50, np.nan)]) is None
    assert interval(np.arange(101.0)) == pytest.approx([2.5, 97.5])


def test_paired_auc_test_separates_better_from_identical_models():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 200)
    good = np.clip(0.25 + 0.5 * labels + rng.normal(0, 0.15, 200), 0, 1)
    weak = np.clip(0.45 + 0.1 * labels + rng.normal(0, 0.25, 200), 0, 1)
    groups = [f"p{i // 2}" for i in range(200)]
    samples = bootstrap(labels, [good, weak, good.copy()], groups, 0.5, 200, seed=0)
    auc_good, auc_weak = roc_auc_score(labels, good), roc_auc_score(labels, weak)
    assert auc_good - auc_weak > 0.2

    better = paired_auc_test(samples[0]["auc"], samples[1]["auc"], auc_good, auc_weak)
    assert better["auc_difference"] == pytest.approx(auc_good - auc_weak)
    assert better["p_value"] == pytest.approx(1 / 200)  # never below the bootstrap's resolution
    assert better["ci95"][0] > 0

    same = paired_auc_test(samples[0]["auc"], samples[2]["auc"], auc_good, auc_good)
    assert same["auc_difference"] == 0 and same["p_value"] == 1.0 and same["ci95"] == [0.0, 0.0]


def test_calibration_bins_fractions():
    labels = np.array([0, 1, 0, 1, 1, 0, 1])
    probs = np.array([0.05, 0.05, 0.15, 0.95, 1.0, 0.95, 0.55])
    bins = calibration_bins(labels, probs)
    assert [(b["bin_low"], b["count"]) for b in bins] == [(0.0, 2), (0.1, 1), (0.5, 1), (0.9, 3)]
    by_low = {round(b["bin_low"], 1): b for b in bins}
    assert by_low[0.0]["fraction_positive"] == 0.5 and by_low[0.0]["mean_predicted"] == pytest.approx(0.05)
    assert by_low[0.1]["fraction_positive"] == 0.0
    assert by_low[0.5]["fraction_positive"] == 1.0
    assert by_low[0.9]["fraction_positive"] == pytest.approx(2 / 3)  # 1.0 falls in the last, closed bin
    assert by_low[0.9]["mean_predicted"] == pytest.approx((0.95 + 1.0 + 0.95) / 3)
    assert sum(b["count"] for b in bins) == len(labels)


def test_calibration_bins_put_a_value_on_an_edge_in_the_bin_it_starts():
    bins = calibration_bins(np.array([1, 0, 1]), np.array([0.3, 0.6, 0.7]))
    assert [round(b["bin_low"], 6) for b in bins] == [0.3, 0.6, 0.7]


# ------------------------------------------------------------------------------------------- agreement


def test_fleiss_kappa_by_hand():
    ratings = np.array([[1, 1, 1], [1, 1, 0], [0, 0, 0], [1, 0, 0]])
    # P_i = 1, 1/3, 1, 1/3 → P̄ = 2/3; p(1) = p(0) = 1/2 → P_e = 1/2; κ = (2/3 − 1/2) / (1 − 1/2) = 1/3
    assert fleiss_kappa(ratings) == pytest.approx(1 / 3)


def test_fleiss_kappa_worked_example():
    """10 subjects, 5 raters; raters saying 'pneumonia' per subject: 5 4 4 3 0 1 5 2 0 3.

    P_i = 1, .6, .6, .4, 1, .6, 1, .4, 1, .4 → P̄ = 0.7; p = 27/50 = 0.54 → P_e = 0.54² + 0.46² = 0.5032;
    κ = (0.7 − 0.5032) / (1 − 0.5032) = 0.1968 / 0.4968 = 0.39614 (rounded).
    """
    positives = [5, 4, 4, 3, 0, 1, 5, 2, 0, 3]
    ratings = np.array([[1] * k + [0] * (5 - k) for k in positives])
    rng = np.random.default_rng(0)
    shuffled = np.array([rng.permutation(row) for row in ratings])  # which reader said what does not matter
    assert fleiss_kappa(ratings) == pytest.approx(0.1968 / 0.4968)
    assert fleiss_kappa(ratings) == pytest.approx(0.39614, abs=1e-5)
    assert fleiss_kappa(shuffled) == pytest.approx(fleiss_kappa(ratings))


def test_fleiss_kappa_for_two_readers_is_scotts_pi():
    rng = np.random.default_rng(6)
    a = rng.integers(0, 2, 80)
    b = np.where(rng.random(80) < 0.8, a, 1 - a)
    observed = (a == b).mean()
    pooled = (a.sum() + b.sum()) / 160
    expected = pooled**2 + (1 - pooled) ** 2
    assert fleiss_kappa(np.stack([a, b], axis=1)) == pytest.approx((observed - expected) / (1 - expected))


def test_perfect_agreement_is_one():
    column = np.array([0, 1, 1, 0, 1, 0, 0, 1])
    assert fleiss_kappa(np.stack([column] * 4, axis=1)) == pytest.approx(1.0)
    # one class only: chance agreement is already 1, so kappa is 0/0: undefined (None), never NaN or 1.0
    assert fleiss_kappa(np.ones((5, 3), int)) is None
    readers = pd.DataFrame({"r1": column, "r2": column})
    result = agreement(readers, {"name": "model", "labels": column}, n_boot=50)
    assert [c["kappa"] for c in result["cohen"]] == pytest.approx([1.0, 1.0, 1.0])
    assert result["fleiss"]["kappa"] == pytest.approx(1.0)


def test_cohen_kappa_equals_sklearn_for_every_pair():
    rng = np.random.default_rng(7)
    truth = rng.integers(0, 2, 60)
    readers = pd.DataFrame(
        {
            name: np.where(rng.random(60) < acc, truth, 1 - truth)
            for name, acc in (("ann", 0.9), ("bob", 0.8), ("cy", 0.7))
        }
    )
    model = np.where(rng.random(60) < 0.85, truth, 1 - truth)
    result = agreement(readers, {"name": "smallnet", "labels": model}, n_boot=60, seed=3)
    expected_pairs = [f"smallnet vs {c}" for c in readers] + [f"{a} vs {b}" for a, b in combinations(readers, 2)]
    assert [c["pair"] for c in result["cohen"]] == expected_pairs
    columns = {"smallnet": model, **{c: readers[c].to_numpy() for c in readers}}
    for entry in result["cohen"]:
        a, b = entry["pair"].split(" vs ")
        assert entry["kappa"] == pytest.approx(cohen_kappa_score(columns[a], columns[b]))
        low, high = entry["ci95"]
        assert low <= entry["kappa"] <= high
    assert result["fleiss"]["kappa"] == pytest.approx(fleiss_kappa(readers.to_numpy()))
    assert result["images"] == 60 and result["readers"] == ["ann", "bob", "cy"]
    assert agreement(readers, {"name": "smallnet", "labels": model}, n_boot=60, seed=3) == result


def test_read_readers_accepts_numbers_and_class_names(tmp_path):
    path = tmp_path / "readers.csv"
    path.write_text("path,r1,r2,r3\na.jpeg,0,NORMAL,normal\nb.jpeg,1,PNEUMONIA, Pneumonia \nc.jpeg,1,pn,0\n")
    keys, labels = read_readers(path)
    assert keys.tolist() == ["a.jpeg", "b.jpeg", "c.jpeg"]
    assert labels.to_dict("list") == {"r1": [0, 1, 1], "r2": [0, 1, 1], "r3": [0, 1, 0]}
    assert all(dtype.kind == "i" for dtype in labels.dtypes)


@pytest.mark.parametrize(("cell", "row"), [("maybe", 3), ("", 3), ("2", 3)])
def test_read_readers_names_the_bad_cell(tmp_path, cell, row):
    path = tmp_path / "readers.csv"
    path.write_text(f"image,r1,r2\nx.jpeg,0,1\ny.jpeg,1,{cell}\nz.jpeg,0,0\n")
    with pytest.raises(DataError) as info:
        read_readers(path)
    message = str(info.value)
    assert f"row {row}, column 'r2'" in message and repr(cell) in message and "\n" not in message


def test_read_readers_needs_a_key_and_readers(tmp_path):
    no_key = tmp_path / "no_key.csv"
    no_key.write_text("r1,r2\n0,1\n")
    with pytest.raises(DataError, match="key column"):
        read_readers(no_key)
    no_readers = tmp_path / "no_readers.csv"
    no_readers.write_text("path\na.jpeg\n")
    with pytest.raises(DataError, match="no reader columns"):
        read_readers(no_readers)


def test_agreement_command_prints_one_json_object(tmp_path, cli):
    path = tmp_path / "readers.csv"
    rows = ["path,r1,r2,r3"] + [
        f"im{i}.jpeg,{i % 2},{'PNEUMONIA' if i % 3 else 'NORMAL'},{int(i % 4 < 2)}" for i in range(30)
    ]
    path.write_text("\n".join(rows) + "\n")
    code, out, _ = cli(["agreement", str(path), "--json", "--bootstrap", "30"])
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    _, readers = read_readers(path)
    assert result["readers"] == ["r1", "r2", "r3"] and result["images"] == 30
    assert [c["pair"] for c in result["cohen"]] == ["r1 vs r2", "r1 vs r3", "r2 vs r3"]
    assert result["cohen"][0]["kappa"] == pytest.approx(cohen_kappa_score(readers["r1"], readers["r2"]))
    assert result["fleiss"]["kappa"] == pytest.approx(fleiss_kappa(readers.to_numpy()))

    code, out, _ = cli(["agreement", str(path), "--bootstrap", "20"])
    assert code == 0 and "Cohen's kappa r1 vs r2:" in out and "Fleiss' kappa (3 readers):" in out


def test_agreement_command_bad_cell_is_one_error_line(tmp_path, cli):
    path = tmp_path / "readers.csv"
    path.write_text("path,r1,r2\na.jpeg,0,1\nb.jpeg,yes,0\n")
    code, out, err = cli(["agreement", str(path), "--json"])
    assert code == 1 and out == ""
    assert err.strip().splitlines() == [f"cxr: error: {path}: row 3, column 'r1': 'yes' is not 0/1/NORMAL/PNEUMONIA"]
