"""Train / validation / test splits, and the leakage check that audits any split.

``seed`` reproduces the original notebook: pooled images, ``train_test_split(test_size=0.2,
random_state=42)``, then the first 20 % of the shuffled train rows as validation, which is what
Keras' ``flow_from_dataframe(subset='validation', validation_split=0.2)`` took.

``patient`` (default) keeps the source's official test split when it has one, otherwise holds
out a test fraction; validation is carved from the rest. Every cut is grouped — images that share
a patient id *or* identical bytes form one group and never straddle two splits — and stratified by
label.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from cxr import SPLITS
from cxr.errors import CxrError, DataError

log = logging.getLogger(__name__)

STRATEGIES = ("seed", "patient")


def group_ids(manifest: pd.DataFrame) -> np.ndarray:
    """Connected components over 'same patient' and 'same bytes' (union-find); one int per row.

    Two images are in one group when they share a non-empty ``patient_id`` or a ``sha256``, directly
    or through a chain of other images; an image with neither in common is a group of its own.

    Args:
        manifest: the manifest, with ``patient_id`` ("" when unknown) and ``sha256`` columns.

    Returns:
        (N,) int64 group ids in row order; each is the smallest row position of its group.
    """
    parent = list(range(len(manifest)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for column in ("patient_id", "sha256"):
        first: dict[str, int] = {}
        for i, key in enumerate(manifest[column].tolist()):
            if not key:
                continue
            if key in first:
                a, b = find(i), find(first[key])
                if a != b:
                    parent[max(a, b)] = min(a, b)
            else:
                first[key] = i
    return np.array([find(i) for i in range(len(manifest))], dtype=np.int64)


def grouped_holdout(labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of a held-out set of whole groups holding ~``fraction`` of each class.

    Groups are visited in a seeded random order and taken while they do not overshoot any class's
    target by more than half of their own size in that class; so each class lands within half a
    group of its target, and the result is deterministic for a given input and seed.

    Args:
        labels: (N,) integer class labels (0 normal, 1 pneumonia).
        groups: (N,) group ids from :func:`group_ids`.
        fraction: the share of each class to hold out, strictly between 0 and 1.
        seed: the order in which groups are tried.

    Returns:
        (N,) bool mask, True for the rows of the held-out groups.

    Raises:
        CxrError: ``fraction`` is not strictly between 0 and 1.
    """
    if not 0.0 < fraction < 1.0:
        raise CxrError(f"split fraction {fraction}: must be between 0 and 1")
    uniq, inverse = np.unique(groups, return_inverse=True)
    n_classes = int(labels.max()) + 1 if len(labels) else 1
    counts = np.zeros((len(uniq), n_classes), dtype=np.int64)
    np.add.at(counts, (inverse, labels.astype(np.int64)), 1)
    target = fraction * counts.sum(axis=0)
    taken = np.zeros(n_classes)
    chosen = np.zeros(len(uniq), dtype=bool)
    for g in np.random.default_rng(seed).permutation(len(uniq)):
        if np.all(taken >= target):
            break
        fits = (counts[g] == 0) | (taken + counts[g] <= target + counts[g] / 2.0)
        if np.all(fits):
            chosen[g] = True
            taken += counts[g]
    return chosen[inverse]


def _seed_split(manifest: pd.DataFrame, test_size: float, val_size: float, seed: int) -> pd.Series:
    split = pd.Series("train", index=manifest.index, dtype=object)
    train_idx, test_idx = train_test_split(manifest.index.to_numpy(), test_size=test_size, random_state=seed)
    split[test_idx] = "test"
    n_val = int(val_size * len(train_idx))  # Keras: rows [0, split*n) of the train frame
    split[train_idx[:n_val]] = "val"
    return split


def _patient_split(manifest: pd.DataFrame, test_size: float, val_size: float, seed: int) -> tuple[pd.Series, int]:
    labels = manifest["label"].to_numpy()
    groups = group_ids(manifest)
    split = pd.Series("train", index=manifest.index, dtype=object)
    dropped = 0
    official_test = (manifest["source_split"] == "test").to_numpy()
    if official_test.any():
        split[official_test] = "test"
        # Images elsewhere that share a patient or bytes with the official test set would leak:
        # keep the official test set intact and leave them out of train/val.
        test_groups = set(groups[official_test])
        leak = ~official_test & np.isin(groups, list(test_groups))
        split[leak] = "excluded"
        dropped = int(leak.sum())
    else:
        held = grouped_holdout(labels, groups, test_size, seed)
        split[held] = "test"
    rest = (split == "train").to_numpy()
    val = np.zeros(len(manifest), dtype=bool)
    val[rest] = grouped_holdout(labels[rest], groups[rest], val_size, seed + 1)
    split[val] = "val"
    return split, dropped


def assign_splits(
    manifest: pd.DataFrame, strategy: str, test_size: float = 0.2, val_size: float = 0.2, seed: int = 42
) -> tuple[pd.Series, dict[str, Any]]:
    """Split column (train/val/test, or 'excluded' for leak-prone rows) and a summary.

    ``seed`` reproduces the notebook: an image-level, unstratified ``train_test_split`` for test,
    then the first ``val_size`` of the shuffled train rows as validation; it ignores the source's
    own split folders. ``patient`` keeps the source's ``test`` folder as the test split when there
    is one, leaving out (``excluded``) other images that share a patient or bytes with it;
    otherwise it holds out ``test_size`` by whole groups. Validation is then ``val_size`` of the
    rest, by whole groups too; both cuts are balanced per class.

    Args:
        manifest: the usable images (``label``, ``class_name``, ``source_split``, ``patient_id``,
            ``sha256``).
        strategy: ``seed`` or ``patient``.
        test_size: the test fraction (unused by ``patient`` when the source has a test folder).
        val_size: the validation fraction of what is left after the test split.
        seed: the random seed of both cuts.

    Returns:
        The split per manifest row (same index), and a summary: ``strategy``, ``seed``,
        ``counts`` (images per split and class), ``excluded_for_test_overlap`` and ``leakage``
        (:func:`leakage`).

    Raises:
        CxrError: an unknown strategy, or a fraction not strictly between 0 and 1 (``patient``).
        DataError: the manifest is empty.
    """
    if strategy not in STRATEGIES:
        raise CxrError(f"split.strategy={strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if manifest.empty:
        raise DataError("no usable images to split")
    dropped = 0
    if strategy == "seed":
        split = _seed_split(manifest, test_size, val_size, seed)
    else:
        split, dropped = _patient_split(manifest, test_size, val_size, seed)
    summary = {
        "strategy": strategy,
        "seed": seed,
        "counts": {
            s: {c: int(n) for c, n in manifest.loc[split == s, "class_name"].value_counts().sort_index().items()}
            for s in SPLITS
        },
        "excluded_for_test_overlap": dropped,
        "leakage": leakage(manifest, split),
    }
    return split, summary


def leakage(manifest: pd.DataFrame, split: pd.Series) -> dict[str, Any]:
    """Patients and identical files shared between each pair of splits (should all be zero).

    Args:
        manifest: the images, with ``patient_id`` and ``sha256``.
        split: each row's split, aligned with ``manifest``; rows outside train/val/test are ignored.

    Returns:
        ``patients_shared`` and ``hashes_shared`` (counts per split pair, e.g. ``train-test``),
        ``train_val_images_sharing_with_test`` (images a test-set leak would touch) and ``clean``
        (True when no patient or hash is shared by any pair).
    """
    report: dict[str, Any] = {}
    for key, name in (("patient_id", "patients_shared"), ("sha256", "hashes_shared")):
        sets = {s: set(manifest.loc[(split == s) & (manifest[key] != ""), key]) for s in SPLITS}
        report[name] = {f"{a}-{b}": len(sets[a] & sets[b]) for a, b in itertools.combinations(SPLITS, 2)}
    ids_test = set(manifest.loc[split == "test", "patient_id"]) - {""}
    hashes_test = set(manifest.loc[split == "test", "sha256"])
    in_train = split.isin(["train", "val"])
    report["train_val_images_sharing_with_test"] = int(
        (in_train & (manifest["patient_id"].isin(ids_test) | manifest["sha256"].isin(hashes_test))).sum()
    )
    report["clean"] = all(v == 0 for d in (report["patients_shared"], report["hashes_shared"]) for v in d.values())
    return report
