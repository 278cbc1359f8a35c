"""Training throughput: the notebook's recipe versus cxr's pipeline, in one run.

    python benchmarks/train_throughput.py --data ../shared/data/chest_xray_224 --model smallnet

Both train the same architecture at the same ``--image-size`` (default 224, the notebook's),
``--steps`` batches of ``--batch-size`` per round, rounds alternating:
- notebook: ImageDataGenerator (decode + augment every batch), float32;
- cxr: cached uint8 tf.data pipeline with the same augmentation, precision ``--precision``
  (auto: bfloat16 where the CPU has it).
The last line is one JSON object with ``images_per_s`` (cxr), ``notebook_images_per_s``, their
ratio, the achieved GFLOP/s for SmallNet (~1.1 GFLOP per image per training step) and the peak RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import labelled_files, notebook_generator

from cxr.runtime import configure
from cxr.training.input_pipeline import InputConfig, load_images, make_dataset
from cxr.training.models import build_model
from cxr.training.train import compile_model

GFLOP_PER_IMAGE_STEP = {"smallnet": 1.1}


def _timed(model, data, steps: int, batch_size: int) -> float:
    started = time.perf_counter()
    model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
    return steps * batch_size / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default="smallnet")
    parser.add_argument("--steps", type=int, default=20, help="timed batches per round")
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed rounds")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", default="auto", help="auto | float32 | bfloat16")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=224, help="both set-ups train at this size")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    frame = labelled_files(args.data, args.limit)
    cfg_model = {"weights": "none"}

    # Both set-ups are built first, then timed alternately (--repeats rounds), so machine noise
    # (this is a shared VM) hits both alike; medians and their ratio are reported.
    configure(seed=42, deterministic=False, precision="float32")
    with contextlib.redirect_stdout(io.StringIO()):
        gen = notebook_generator(frame, batch_size=args.batch_size, subset=None, image_size=args.image_size)
    notebook_model = build_model(args.model, args.image_size, cfg_model)
    compile_model(notebook_model, 1e-3)
    notebook_model.fit(gen, steps_per_epoch=args.warmup, epochs=1, verbose=0)

    policy = configure(seed=42, deterministic=False, precision=args.precision)
    labels = (frame["labels"] == "pn").to_numpy("float32")
    notebook_rates, rates = [], []
    with tempfile.TemporaryDirectory() as cache:
        # the model is built at the size the dataset yields (with today's default of 160 px, a 224-px
        # model fed the 160-px dataset crashed this benchmark: issue 18)
        cfg = InputConfig(cache_dir=cache, image_size=args.image_size, batch_size=args.batch_size)
        images = load_images(frame["paths"].tolist(), "bench", cfg, "train")
        ds = make_dataset(images, labels, cfg, shuffle=True, augment=True, seed=1).repeat()
        model = build_model(args.model, cfg.image_size, cfg_model)
        compile_model(model, 1e-3)
        model.fit(ds, steps_per_epoch=args.warmup, epochs=1, verbose=0)
        for _ in range(args.repeats):
            notebook_rates.append(_timed(notebook_model, gen, args.steps, args.batch_size))
            rates.append(_timed(model, ds, args.steps, args.batch_size))
    notebook, ours = statistics.median(notebook_rates), statistics.median(rates)

    flops = GFLOP_PER_IMAGE_STEP.get(args.model)
    result = {
        "model": args.model,
        "images": len(frame),
        "steps": args.steps,
        "image_size": args.image_size,
        "precision": policy,
        "notebook_images_per_s": round(notebook, 1),
        "images_per_s": round(ours, 1),
        "notebook_runs_images_per_s": [round(r, 1) for r in notebook_rates],
        "runs_images_per_s": [round(r, 1) for r in rates],
        "speedup_vs_notebook": round(ours / notebook, 2),
        "gflop_per_s": round(ours * flops, 1) if flops else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
