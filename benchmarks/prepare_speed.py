"""Benchmark the prepare step: wall time and peak memory as the file count grows.

    python benchmarks/prepare_speed.py --data ../shared/data/chest_xray_224 [--repeats 3]

Copies the folder into a temporary ``data/raw``, then runs ``cxr prepare`` in a fresh process
per size (first N files per class folder, N growing) and per repeat. Prints one JSON line per
measurement and, last, a summary with the median wall time of the full set and the peak RSS per
size: memory should stay flat as the file count grows, because files are streamed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cxr.config import DataConfig
from cxr.data.fetch import fetch

CHILD = """
import resource, sys, time
from cxr.config import PrepareConfig, SplitConfig
from cxr.data.prepare import prepare
t = time.perf_counter()
prepare("data/raw", SplitConfig(strategy="patient", seed=42), PrepareConfig(min_images_per_class=1))
wall = time.perf_counter() - t
print(wall, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def subset(src: Path, dst: Path, fraction: float) -> int:
    total = 0
    for folder in sorted(p for p in src.rglob("*") if p.is_dir()):
        files = sorted(p for p in folder.iterdir() if p.is_file())
        keep = files[: max(1, round(len(files) * fraction))] if files else []
        for f in keep:
            target = dst / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
        total += len(keep)
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder in Kaggle layout")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    runs: dict[int, list[tuple[float, float]]] = {}  # file count -> [(prepare_s, peak_rss_mb)]
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "all"
        fetch(DataConfig(source="dir", dir=args.data), raw_dir=staged, record_path=Path(tmp) / "f.json")
        for fraction in (0.25, 0.5, 1.0):
            work = Path(tmp) / f"w{fraction}"
            n = subset(staged, work / "data/raw", fraction)
            for _ in range(args.repeats):
                t = time.perf_counter()
                out = subprocess.run(
                    [sys.executable, "-c", CHILD], cwd=work, capture_output=True, text=True, check=True
                ).stdout.split()
                process_s = time.perf_counter() - t
                wall, rss = float(out[0]), float(out[1])
                runs.setdefault(n, []).append((wall, rss))
                print(
                    json.dumps(
                        {
                            "files": n,
                            "prepare_s": round(wall, 2),
                            "process_s": round(process_s, 2),
                            "peak_rss_mb": round(rss),
                        }
                    )
                )
    full = max(runs)
    summary = {
        "files_full": full,
        "median_prepare_s_full": round(statistics.median(w for w, _ in runs[full]), 2),
        "peak_rss_mb_by_files": {n: round(statistics.median(r for _, r in v)) for n, v in runs.items()},
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
