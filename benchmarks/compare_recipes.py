"""Apply the pre-registered decision rule (``benchmarks/PREREGISTRATION.md``) to recipes that
``benchmarks/recipes.py`` trained and scored: each candidate against the baseline on the selection
set, by a paired patient bootstrap of the AUC difference.

A candidate is one recipe, or the mean P(pneumonia) of several (``--ensemble NAME=a+b+c``: members
must share preprocessing). Every candidate is scored at its own validation-chosen threshold (the
highest threshold keeping validation sensitivity ``--target-sensitivity``, as the pipeline ships),
with 95 % CIs from patient resamples. Prints a Markdown table and writes JSON to ``--out``.

    python benchmarks/compare_recipes.py --workspace /tmp/exp \\
        --external ../shared/data/chest_xray_224_external_val --baseline baseline \\
        --ensemble seeds3=baseline+seed43+seed44
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from cxr.common.metrics import at_threshold, bootstrap, interval, paired_auc_test, threshold_free
from cxr.common.thresholds import validation_operating_point


def _probs(workspace: Path, recipe: str, model: str) -> tuple[np.ndarray, np.ndarray]:
    base = workspace / "recipes" / recipe / "models" / f"{model}.keras"
    return np.load(base.with_suffix(".val.npy")), np.load(base.with_suffix(".external.npy"))


def candidates(workspace: Path, rows: dict[str, dict[str, Any]], ensembles: list[str]) -> dict[str, dict[str, Any]]:
    """``{name: {val, ext, members, train_seconds}}`` for every recipe and every requested ensemble."""
    out = {}
    for name, row in rows.items():
        val, ext = _probs(workspace, name, row["model"])
        out[name] = {"val": val, "ext": ext, "members": [name], "train_seconds": row["train_seconds"]}
    for spec in ensembles:
        name, _, members = spec.partition("=")
        parts = members.split("+")
        missing = [m for m in parts if m not in out]
        if missing:
            raise SystemExit(f"--ensemble {spec}: no recipe {', '.join(missing)} in the results")
        out[name] = {
            "val": np.mean([out[m]["val"] for m in parts], axis=0),
            "ext": np.mean([out[m]["ext"] for m in parts], axis=0),
            "members": parts,
            "train_seconds": sum(out[m]["train_seconds"] for m in parts),
        }
    return out


def compare(
    cands: dict[str, dict[str, Any]],
    val_labels: np.ndarray,
    labels: np.ndarray,
    groups: list[str],
    baseline: str,
    target: float,
    n_boot: int,
) -> list[dict[str, Any]]:
    """Each candidate's selection-set figures and its paired AUC difference from ``baseline``."""
    names = list(cands)
    samples = bootstrap(labels, [cands[n]["ext"] for n in names], groups, 0.5, n_boot, 42)
    base_i = names.index(baseline)
    base_auc = threshold_free(labels, cands[baseline]["ext"])["auc"]
    results = []
    for i, name in enumerate(names):
        c = cands[name]
        point = validation_operating_point(val_labels, c["val"], target)
        cut = point["threshold"] if point else 0.5
        at = at_threshold(labels, c["ext"], cut)
        ci = bootstrap(labels, [c["ext"]], groups, cut, n_boot, 42)[0]
        free = threshold_free(labels, c["ext"])
        diff = paired_auc_test(samples[i]["auc"], samples[base_i]["auc"], free["auc"], base_auc)
        low = (diff["ci95"] or [None])[0]
        results.append(
            {
                "candidate": name,
                "members": c["members"],
                "train_seconds": c["train_seconds"],
                "val_auc": threshold_free(val_labels, c["val"])["auc"],
                "auc": free["auc"],
                "auc_ci95": interval(samples[i]["auc"]),
                "brier": free["brier"],
                "threshold": cut,
                **{k: at[k] for k in ("sensitivity", "specificity", "accuracy")},
                **{f"{k}_ci95": interval(ci[k]) for k in ("sensitivity", "specificity", "accuracy")},
                "auc_minus_baseline": diff,
                "passes_rule": name != baseline and low is not None and low > 0,
            }
        )
    return results


def _ci(pair: list[float] | None) -> str:
    return f"{pair[0]:.3f}–{pair[1]:.3f}" if pair else "—"


def markdown(results: list[dict[str, Any]], baseline: str) -> str:
    lines = [
        f"| candidate | train s | val AUC | AUC (95 % CI) | AUC − {baseline} (95 % CI) | Brier | threshold | "
        "sensitivity | specificity (95 % CI) | accuracy | passes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        d = r["auc_minus_baseline"]
        diff = "—" if r["candidate"] == baseline else f"{d['auc_difference']:+.3f} ({_ci(d['ci95'])})"
        lines.append(
            f"| {r['candidate']} | {r['train_seconds']} | {r['val_auc']:.4f} | {r['auc']:.3f} ({_ci(r['auc_ci95'])}) "
            f"| {diff} | {r['brier']:.3f} | {r['threshold']:.2f} | {r['sensitivity']:.3f} | "
            f"{r['specificity']:.3f} ({_ci(r['specificity_ci95'])}) | {r['accuracy']:.3f} | "
            f"{'yes' if r['passes_rule'] else 'no'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from cxr.evaluation.evaluate import labelled_folder
    from cxr.training.input_pipeline import read_split

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, required=True, help="where recipes.py ran")
    parser.add_argument("--external", type=Path, required=True, help="the selection set recipes.py scored")
    parser.add_argument("--results", type=Path, default=None, help="recipes.py's JSON lines (default: recipes.jsonl)")
    parser.add_argument("--baseline", default="baseline")
    parser.add_argument("--ensemble", action="append", default=[], help="NAME=recipe+recipe+...")
    parser.add_argument("--target-sensitivity", type=float, default=0.9)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("comparison.json"))
    args = parser.parse_args(argv)
    results_file = args.results or args.workspace / "recipes.jsonl"
    rows = {}
    for line in results_file.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["recipe"]] = row
    if args.baseline not in rows:
        raise SystemExit(f"--baseline {args.baseline}: not among the results ({', '.join(rows)})")
    cands = candidates(args.workspace, rows, args.ensemble)
    _, val_labels, _ = read_split(args.workspace / "data/prepared/splits.csv", "val")
    _, labels, groups = labelled_folder(args.external.resolve())
    results = compare(cands, val_labels, labels, groups, args.baseline, args.target_sensitivity, args.bootstrap)
    args.out.write_text(json.dumps(results, indent=1, default=float))
    print(markdown(results, args.baseline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
