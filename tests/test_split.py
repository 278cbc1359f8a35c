"""Split strategies: the notebook's seed split, and grouped, stratified patient splits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import train_test_split

from cxr.data.split import assign_splits, group_ids, grouped_holdout, leakage
from cxr.errors import CxrError


def synthetic_manifest(n_patients: int = 300, seed: int = 0, official_test: int = 0) -> pd.DataFrame:
    """Patients with 1–4 images each, ~3:1 pneumonia, a few byte-identical files across patients."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = int(rng.random() < 0.74)
        for i in range(int(rng.integers(1, 5))):
            rows.append(
                {
                    "path": f"data/raw/p{p}_{i}.jpeg",
                    "label": label,
                    "class_name": ["NORMAL", "PNEUMONIA"][label],
                    "source_split": "test" if p < official_test else "train",
                    "patient_id": f"person{p}",
                    "sha256": f"h{p}_{i}",
                }
            )
    frame = pd.DataFrame(rows)
    # identical bytes across two different patients of the same class: must be grouped too
    frame.loc[5, "sha256"] = frame.loc[40, "sha256"] = "shared-bytes"
    return frame


def test_group_ids_join_patients_and_identical_bytes():
    frame = pd.DataFrame({"patient_id": ["a", "a", "b", "c", "", ""], "sha256": ["1", "2", "2", "3", "4", "4"]})
    groups = group_ids(frame)
    assert groups[0] == groups[1] == groups[2]  # a–a by patient, a–b by bytes
    assert groups[3] != groups[0]
    assert groups[4] == groups[5]  # no patient id, identical bytes
    assert len({groups[0], groups[3], groups[4]}) == 3


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.35])
def test_grouped_holdout_is_grouped_stratified_and_deterministic(fraction):
    frame = synthetic_manifest()
    labels, groups = frame["label"].to_numpy(), group_ids(frame)
    held = grouped_holdout(labels, groups, fraction, seed=7)
    assert not set(groups[held]) & set(groups[~held])
    for label in (0, 1):
        want = fraction * (labels == label).sum()
        assert abs(held[labels == label].sum() - want) <= 4  # within one group (≤ 4 images)
    assert np.array_equal(held, grouped_holdout(labels, groups, fraction, seed=7))
    assert not np.array_equal(held, grouped_holdout(labels, groups, fraction, seed=8))


def test_grouped_holdout_rejects_bad_fraction():
    with pytest.raises(CxrError):
        grouped_holdout(np.array([0, 1]), np.array([0, 1]), 1.5, seed=0)


def test_patient_strategy_has_zero_leakage_and_all_splits():
    frame = synthetic_manifest()
    split, summary = assign_splits(frame, "patient", test_size=0.2, val_size=0.2, seed=42)
    assert summary["leakage"]["clean"]
    assert set(split) == {"train", "val", "test"}
    for s in ("train", "val", "test"):
        assert set(frame.loc[split == s, "label"]) == {0, 1}
    assert abs((split == "test").mean() - 0.2) < 0.03
    again, _ = assign_splits(frame, "patient", seed=42)
    assert again.equals(split)


def test_patient_strategy_keeps_official_test_and_drops_what_would_leak():
    frame = synthetic_manifest(official_test=60)
    # one train image of a test patient (same person id) must not reach train/val
    leaky = frame.index[frame["source_split"] == "train"][0]
    frame.loc[leaky, "patient_id"] = "person0"
    split, summary = assign_splits(frame, "patient", seed=1)
    assert (split[frame["source_split"] == "test"] == "test").all()
    assert (split[frame["source_split"] != "test"] != "test").all()
    assert split[leaky] == "excluded" and summary["excluded_for_test_overlap"] >= 1
    assert summary["leakage"]["clean"]


def test_seed_strategy_reproduces_the_notebook_split():
    frame = synthetic_manifest()
    split, summary = assign_splits(frame, "seed", test_size=0.2, val_size=0.2, seed=42)
    train_idx, test_idx = train_test_split(frame.index.to_numpy(), test_size=0.2, random_state=42)
    assert set(split[split == "test"].index) == set(test_idx)
    n_val = int(0.2 * len(train_idx))
    assert list(split[split == "val"].index.sort_values()) == sorted(train_idx[:n_val])
    # an image-level split of multi-image patients leaks, and the report says so
    assert not summary["leakage"]["clean"]
    assert summary["leakage"]["patients_shared"]["train-test"] > 0


def test_leakage_counts_shared_patients_and_hashes():
    frame = pd.DataFrame({"patient_id": ["a", "a", "b", ""], "sha256": ["1", "2", "3", "3"]})
    report = leakage(frame, pd.Series(["train", "test", "val", "test"]))
    assert report["patients_shared"] == {"train-val": 0, "train-test": 1, "val-test": 0}
    assert report["hashes_shared"] == {"train-val": 0, "train-test": 0, "val-test": 1}
    assert report["train_val_images_sharing_with_test"] == 2
    assert report["clean"] is False
