"""Prediction throughput of ``cxr predict``'s code path, after model load, and the load time.

    python benchmarks/predict_speed.py --model models/smallnet.keras --data ../shared/data/chest_xray_224 -n 100

Loads the model (timed), then runs ``cxr predict``'s code path (decode, batched inference, JSON
output; model already loaded) on ``-n`` images spread over the folder, --repeats times, and prints
one JSON object with the median images/s.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time

from imutils import paths as imutils_paths

from cxr.inference.loading import load
from cxr.inference.predict import predict


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("-n", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    files = sorted(imutils_paths.list_images(args.data))
    step = max(1, len(files) // args.n)
    files = files[::step][: args.n]
    started = time.perf_counter()
    loaded = load(args.model)
    load_s = time.perf_counter() - started
    rates = []
    for _ in range(args.repeats + 1):  # the first pass warms TensorFlow's kernels up
        sink = io.StringIO()
        started = time.perf_counter()
        failures = predict(loaded, files, as_json=True, out=sink)
        rates.append(len(files) / (time.perf_counter() - started))
        assert failures == 0 and len(sink.getvalue().splitlines()) == len(files)
    print(
        json.dumps(
            {
                "model": args.model,
                "images": len(files),
                "model_load_s": round(load_s, 2),
                "images_per_s": round(statistics.median(rates[1:]), 1),
                "runs_images_per_s": [round(r, 1) for r in rates[1:]],
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
