"""Compare training recipes on an external labelled set: train each through the real ``cxr train``,
then score it on the validation split and on the external folder.

Each recipe is a list of ``-S key=value`` overrides. Results go to ``--out`` as one JSON line per
recipe (a finished recipe is skipped on a rerun, so the run can be interrupted). The external set
is only *scored*: training, early stopping and epoch choice see the train and validation splits.

    python benchmarks/recipes.py --workspace /tmp/exp --external ../shared/data/chest_xray_224_external_val \
        --recipe baseline: --recipe heavy:input.augment.rotation_deg=20,input.augment.zoom=0.2

The workspace must hold ``data/prepared/splits.csv`` (``cxr fetch`` + ``cxr prepare`` there).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]


def _score(model_path: Path, splits_csv: Path, external: Path, cache_dir: str, n_boot: int) -> dict:
    from cxr.common.metrics import at_threshold, bootstrap, interval, threshold_free, youden_threshold
    from cxr.evaluation.evaluate import labelled_folder
    from cxr.inference.loading import iter_images, load, predict_images
    from cxr.training.input_pipeline import load_images, read_split

    lm = load(model_path)
    cfg = lm.cached_input(cache_dir)
    paths, val_labels, key = read_split(splits_csv, "val")
    val_probs = predict_images(lm.model, load_images(paths, key, cfg, "val"))
    youden = youden_threshold(val_labels, val_probs)
    files, labels, groups = labelled_folder(external)
    images = np.stack([img for _, img, err in iter_images(files, lm.input) if err is None])
    probs = predict_images(lm.model, images)
    out = {
        "val_auc": threshold_free(val_labels, val_probs)["auc"],
        "val_youden": youden,
        **{f"ext_{k}": v for k, v in threshold_free(labels, probs).items()},
    }
    for name, thr in (("0.5", 0.5), ("youden", youden)):
        m = at_threshold(labels, probs, thr)
        ci = bootstrap(labels, [probs], groups, thr, n_boot, 42)[0]
        out[f"ext_at_{name}"] = {k: m[k] for k in ("threshold", "sensitivity", "specificity", "accuracy")}
        out[f"ext_at_{name}"]["ci95"] = {k: interval(ci[k]) for k in ("sensitivity", "specificity", "accuracy")}
        if name == "0.5":
            out["ext_auc_ci95"] = interval(ci["auc"])
    np.save(model_path.with_suffix(".external.npy"), probs)
    np.save(model_path.with_suffix(".val.npy"), val_probs)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, required=True, help="folder with data/prepared/splits.csv")
    parser.add_argument("--external", type=Path, required=True, help="labelled folder (NORMAL/, PNEUMONIA/)")
    parser.add_argument(
        "--recipe",
        action="append",
        required=True,
        help="NAME:key=value,key=value (the model is train.models' first unless model=...)",
    )
    parser.add_argument("--out", type=Path, default=Path("recipes.jsonl"))
    parser.add_argument("--bootstrap", type=int, default=500)
    args = parser.parse_args(argv)
    done = set()
    if args.out.is_file():
        done = {json.loads(line)["recipe"] for line in args.out.read_text().splitlines() if line.strip()}
    ws = args.workspace.resolve()
    for spec in args.recipe:
        name, _, rest = spec.partition(":")
        if name in done:
            print(f"{name}: already measured, skipped", file=sys.stderr)
            continue
        overrides = [kv for kv in rest.split(",") if kv]
        model = next((kv.split("=", 1)[1] for kv in overrides if kv.startswith("model=")), "cxrnet")
        overrides = [kv for kv in overrides if not kv.startswith("model=")]
        models_dir = ws / "recipes" / name / "models"
        cmd = [
            sys.executable,
            "-m",
            "cxr",
            "train",
            "--model",
            model,
            "--models",
            str(models_dir),
            "--reports",
            str(ws / "recipes" / name / "reports"),
            "--params",
            str(ROOT / "params.yaml"),
        ]
        for kv in overrides:
            cmd += ["-S", kv]
        started = time.perf_counter()
        if (models_dir / f"{model}.card.json").is_file():  # trained by an interrupted run: score it
            print(f"{name}: model already trained, scoring it", file=sys.stderr)
        else:
            subprocess.run(cmd, cwd=ws, check=True)
        seconds = time.perf_counter() - started
        card = json.loads((models_dir / f"{model}.card.json").read_text())
        result = _score(
            models_dir / f"{model}.keras",
            ws / "data/prepared/splits.csv",
            args.external.resolve(),
            str(ws / "data/cache"),
            args.bootstrap,
        )
        row = {
            "recipe": name,
            "model": model,
            "overrides": overrides,
            "train_seconds": round(seconds),
            "epochs_run": card["epochs_run"],
            "best_epoch": card["best_epoch"],
            **result,
        }
        with open(args.out, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        a5, ay = row["ext_at_0.5"], row["ext_at_youden"]
        print(
            f"{name}: ext AUC {row['ext_auc']:.3f} Brier {row['ext_brier']:.3f} | @0.5 sens {a5['sensitivity']:.3f} "
            f"spec {a5['specificity']:.3f} acc {a5['accuracy']:.3f} | @val-Youden {ay['threshold']:.2f} "
            f"sens {ay['sensitivity']:.3f} spec {ay['specificity']:.3f} acc {ay['accuracy']:.3f} "
            f"| {seconds:.0f}s",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
