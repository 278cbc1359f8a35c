"""Input pipeline throughput: the notebook's ImageDataGenerator versus cxr's tf.data pipeline.

    python benchmarks/input_pipeline.py --data ../shared/data/chest_xray_224

Measured in one run, on the same files, with the notebook's augmentation (rotation ±5°, shifts
±10 %): the notebook's generator (after one untimed batch), our cold first epoch (every image
decoded into an empty cache, then one augmented epoch; ``cold_first_use_images_per_s`` also counts
TensorFlow tracing the pipeline for the first time in the process, a fixed ~1 s that dominates
small sets) and our warm epochs (cache present; median of --epochs). The last line is one JSON
object with ``cold_images_per_s`` and ``warm_images_per_s``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import labelled_files, notebook_generator

from cxr.training.input_pipeline import InputConfig, load_images, make_dataset


def _epoch(ds) -> int:
    n = 0
    for _, y in ds:
        n += int(y.shape[0])
    return n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--limit", type=int, default=None, help="use at most this many images")
    parser.add_argument("--epochs", type=int, default=3, help="warm epochs to time")
    parser.add_argument("--repeats", type=int, default=3, help="notebook passes and cold epochs to time")
    parser.add_argument(
        "--notebook-images", type=int, default=2048, help="images to pull through the notebook's generator (it is slow)"
    )
    args = parser.parse_args()
    frame = labelled_files(args.data, args.limit)
    labels = (frame["labels"] == "pn").to_numpy("float32")
    paths = frame["paths"].tolist()

    with contextlib.redirect_stdout(io.StringIO()):  # "Found N validated image filenames"
        gen = notebook_generator(frame, subset=None)
    next(gen)  # warm-up batch, not timed (both pipelines get one)
    want = min(args.notebook_images, len(frame))
    notebook_rates = []
    for _ in range(args.repeats):
        started, seen = time.perf_counter(), 0
        while seen < want:
            x, _ = next(gen)
            seen += len(x)
        notebook_rates.append(seen / (time.perf_counter() - started))
    notebook = statistics.median(notebook_rates)

    with tempfile.TemporaryDirectory() as cache:
        cfg = InputConfig(cache_dir=cache)
        # Cold in a fresh process: includes TensorFlow building and tracing the pipeline once.
        started = time.perf_counter()
        images = load_images(paths, "first-use", cfg, "train")
        cold_n = _epoch(make_dataset(images, labels, cfg, shuffle=True, augment=True, seed=1))
        first_use = cold_n / (time.perf_counter() - started)
        # Cold cache, traced process: every JPEG decoded again into a new cache, then one augmented
        # epoch — what each first epoch on new data costs in a running pipeline.
        cold_rates = []
        for repeat in range(args.repeats):
            started = time.perf_counter()
            images = load_images(paths, f"bench-{repeat}", cfg, "train")
            cold_n = _epoch(make_dataset(images, labels, cfg, shuffle=True, augment=True, seed=1))
            cold_rates.append(cold_n / (time.perf_counter() - started))
        cold = statistics.median(cold_rates)
        images = load_images(paths, "bench", cfg, "train")  # warm: the cache file is reused
        rates = []
        for epoch in range(args.epochs):
            ds = make_dataset(images, labels, cfg, shuffle=True, augment=True, seed=epoch)
            started = time.perf_counter()
            n = _epoch(ds)
            rates.append(n / (time.perf_counter() - started))
    result = {
        "data": str(args.data),
        "images": len(paths),
        "notebook_images_per_s": round(notebook, 1),
        "notebook_runs_images_per_s": [round(r, 1) for r in notebook_rates],
        "cold_runs_images_per_s": [round(r, 1) for r in cold_rates],
        "cold_images_per_s": round(cold, 1),
        "cold_first_use_images_per_s": round(first_use, 1),
        "warm_images_per_s": round(statistics.median(rates), 1),
        "warm_epochs_images_per_s": [round(r, 1) for r in rates],
        "cold_vs_notebook": round(cold / notebook, 2),
        "warm_vs_notebook": round(statistics.median(rates) / notebook, 2),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
