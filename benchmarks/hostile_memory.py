"""Peak memory of ``cxr predict`` and ``cxr serve`` on the worst input each accepts and each refuses.

    python benchmarks/hostile_memory.py --project . --model cxrnet --clients 64

The worst accepted input is a 16-bit DICOM of ``--dicom-side``² pixels with a window (4900² = 24
megapixels, 48 MB: a flat-panel film is about 18 megapixels); the worst refused inputs are a 350 KB
PNG announcing 49,000² pixels (a decompression bomb, refused from its header) and a file over the
200 MB byte cap (refused from ``stat``). ``cxr predict`` runs once per input in its own process
(peak resident memory from ``wait4``). ``cxr serve`` (``--max-memory-mb``) receives ``--clients``
concurrent uploads of the refused inputs, then of the accepted one; its peak is the server
process's ``VmHWM`` after each phase. One JSON object per figure.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def _png_bomb(side: int) -> bytes:
    """A valid PNG header announcing side × side 8-bit gray pixels, then a small zero stream."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    body = zlib.compress(b"\0" * (side + 1) * 64, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def inputs(folder: Path, side: int) -> dict[str, tuple[Path, bool]]:
    """name → (file, accepted)."""
    from tests.factories import write_dicom

    pixels = np.random.default_rng(0).integers(0, 4000, (side, side), dtype=np.uint16)
    dicom = write_dicom(folder / "film.dcm", pixels, WindowCenter="2000", WindowWidth="1000")
    bomb = folder / "bomb.png"
    bomb.write_bytes(_png_bomb(49_000))
    oversize = folder / "oversize.jpeg"
    with open(oversize, "wb") as handle:  # sparse: 210 MB on paper, nothing on disk
        handle.truncate(210_000_000)
    return {"dicom": (dicom, True), "png_bomb": (bomb, False), "over_byte_cap": (oversize, False)}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", "CXR_NO_PROGRESS": "1"}


def predict_peak(project: Path, model: str, path: Path) -> tuple[int, float]:
    """(exit status, peak resident MB) of ``cxr predict`` on one file."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cxr", "predict", "--model", model, str(path)],
        cwd=project,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024


def _vm_hwm(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        return next(int(line.split()[1]) / 1024 for line in handle if line.startswith("VmHWM:"))


def serve_phase(url: str, pid: int, payload: bytes, name: str, clients: int) -> dict[str, object]:
    """``clients`` concurrent uploads of one payload; status counts and the server's peak after."""
    import httpx

    counts: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def upload() -> None:
        try:
            code = str(httpx.post(f"{url}/predict?name={name}", content=payload, timeout=300).status_code)
        except httpx.TransportError as exc:
            code = type(exc).__name__
        with lock:
            counts[code] += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=upload) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {
        "statuses": dict(counts),
        "seconds": round(time.perf_counter() - started, 1),
        "peak_mb": round(_vm_hwm(pid)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", default=".", help="a project with a trained model")
    parser.add_argument("--model", default="cxrnet")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--dicom-side", type=int, default=4900)
    parser.add_argument("--max-memory-mb", type=float, default=2048.0)
    args = parser.parse_args()
    project = Path(args.project).resolve()
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from serve_speed import start_server

    with tempfile.TemporaryDirectory(prefix="cxr-hostile-memory-") as tmp:
        files = inputs(Path(tmp), args.dicom_side)
        for name, (path, accepted) in files.items():
            rc, peak = predict_peak(project, args.model, path)
            row = {"tool": "predict", "input": name, "accepted": accepted, "rc": rc, "peak_mb": round(peak)}
            print(json.dumps(row), flush=True)
        os.chdir(project)
        proc, url, _ = start_server(
            args.model, Path(tmp) / "serve.log", extra=["--max-memory-mb", str(args.max_memory_mb)]
        )
        try:
            baseline = _vm_hwm(proc.pid)
            print(json.dumps({"tool": "serve", "input": "idle", "peak_mb": round(baseline)}), flush=True)
            for name in ("png_bomb", "dicom"):  # refused first: VmHWM only grows
                path, accepted = files[name]
                row = serve_phase(url, proc.pid, path.read_bytes(), path.name, args.clients)
                bound = {"max_memory_mb": args.max_memory_mb, "clients": args.clients}
                print(json.dumps({"tool": "serve", "input": name, "accepted": accepted, **bound, **row}), flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)


if __name__ == "__main__":
    main()
