"""Requests per second and latency of ``cxr serve`` for single images, one client and several at once.

    python benchmarks/serve_speed.py --model models/smallnet.keras --data ../shared/data/chest_xray_224 -n 200

Starts the real server (``python -m cxr serve --port 0``) in a subprocess, waits for ``/health``,
warms it up, then posts ``-n`` images spread over the folder (one image per request, multipart, as
``curl -F file=@…`` does) from 1 client and from each ``--clients`` count, each client on its own
keep-alive connection. Prints one JSON object per client count: requests/s over the whole run and
the p50 / p95 latency of a request, in milliseconds, plus the server's start-up time. Then the
same images through ``POST /predict/batch``, ``--batch-files`` a request, from one and two clients.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from imutils import paths as imutils_paths

REPO_ROOT = Path(__file__).resolve().parents[1]


def start_server(
    model: str, log_file: Path, extra: list[str] | None = None
) -> tuple[subprocess.Popen[bytes], str, float]:
    """``cxr serve`` on a free port, with ``extra`` options; (process, URL, seconds until ``/health`` answered)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    started = time.perf_counter()
    with open(log_file, "wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cxr", "serve", "--model", model, "--port", "0", *(extra or [])],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
        )
    deadline = time.monotonic() + 300
    url = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = re.search(r"on (http://127\.0\.0\.1:\d+)", log_file.read_text(errors="replace"))
        url = url or (found.group(1) if found else None)
        if url:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    return proc, url, time.perf_counter() - started
            except httpx.TransportError:
                pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"cxr serve did not start:\n{log_file.read_text(errors='replace')}")


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0–100) by linear interpolation."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    low, high = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def run_threads(client: Callable[[Any], None], shares: list[Any]) -> float:
    """Run ``client(share)`` in one thread per share, all at once; the wall-clock seconds until all end."""
    threads = [threading.Thread(target=client, args=(share,)) for share in shares]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - began


def run(url: str, payloads: list[tuple[str, bytes]], clients: int) -> dict[str, float | int]:
    """Post every payload once, spread over ``clients`` threads; throughput and latency figures."""
    latencies: list[float] = []
    lock = threading.Lock()
    shares = [payloads[i::clients] for i in range(clients)]

    def client(share: list[tuple[str, bytes]]) -> None:
        mine = []
        with httpx.Client(base_url=url, timeout=120) as http:
            for name, data in share:
                began = time.perf_counter()
                response = http.post("/predict", files={"file": (name, data)})
                mine.append(time.perf_counter() - began)
                if response.status_code != 200:
                    raise SystemExit(f"{name}: {response.status_code} {response.text}")
        with lock:
            latencies.extend(mine)

    wall = run_threads(client, shares)
    return {
        "clients": clients,
        "requests": len(latencies),
        "requests_per_s": round(len(latencies) / wall, 1),
        "latency_ms_p50": round(1000 * statistics.median(latencies), 1),
        "latency_ms_p95": round(1000 * percentile(latencies, 95), 1),
    }


def run_batches(url: str, payloads: list[tuple[str, bytes]], per_batch: int, clients: int) -> dict[str, float | int]:
    """Post the payloads through ``POST /predict/batch``, ``per_batch`` files a request, from ``clients``
    threads; images per second and the latency of one batch."""
    batches = [payloads[i : i + per_batch] for i in range(0, len(payloads), per_batch)]
    shares = [batches[i::clients] for i in range(clients)]
    latencies: list[float] = []
    lock = threading.Lock()

    def client(share: list[list[tuple[str, bytes]]]) -> None:
        mine = []
        with httpx.Client(base_url=url, timeout=300) as http:
            for batch in share:
                began = time.perf_counter()
                response = http.post("/predict/batch", files=[("files", (n, d)) for n, d in batch])
                mine.append(time.perf_counter() - began)
                if response.status_code != 200 or any("error" in r for r in response.json()["results"]):
                    raise SystemExit(f"batch: {response.status_code} {response.text[:300]}")
        with lock:
            latencies.extend(mine)

    wall = run_threads(client, shares)
    return {
        "endpoint": "/predict/batch",
        "files_per_request": per_batch,
        "clients": clients,
        "images": len(payloads),
        "images_per_s": round(len(payloads) / wall, 1),
        "batch_latency_ms_p50": round(1000 * statistics.median(latencies), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model name or .keras file (with its card)")
    parser.add_argument("--data", required=True, help="a folder of images")
    parser.add_argument("-n", type=int, default=200, help="requests per run (images spread over the folder)")
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 8], help="concurrent client counts")
    parser.add_argument("--batch-files", type=int, default=16, help="files per /predict/batch request (0: skip)")
    args = parser.parse_args()
    files = sorted(imutils_paths.list_images(args.data))
    step = max(1, len(files) // args.n)
    chosen = (files[::step] * (args.n // max(1, len(files[::step])) + 1))[: args.n]
    payloads = [(Path(f).name, Path(f).read_bytes()) for f in chosen]
    with tempfile.TemporaryDirectory() as tmp:
        proc, url, startup_s = start_server(args.model, Path(tmp) / "serve.log")
        try:
            run(url, payloads[:20], 1)  # warm-up: TensorFlow builds its kernels on the first calls
            mean_kb = statistics.mean(len(d) for _, d in payloads) / 1000
            print(json.dumps({"model": args.model, "startup_s": round(startup_s, 1), "mean_upload_kb": round(mean_kb)}))
            for clients in [1, *args.clients]:
                print(json.dumps(run(url, payloads, clients)), flush=True)
            if args.batch_files:
                for clients in (1, 2):
                    print(json.dumps(run_batches(url, payloads, args.batch_files, clients)), flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
