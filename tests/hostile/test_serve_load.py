"""``cxr serve`` under hostile clients (issue 19, part 2), on loopback, with bounded loops.

One real server (``python -m cxr serve --port 0``) for the module, with a memory bound of 2,560 MB
(``--max-memory-mb``): idle sockets and unfinished header blocks must not deny it; 64 concurrent
48 MB DICOM uploads must keep its peak memory under the bound; sixteen decompression-heavy PNGs must
not starve a small request.

Not the default 2,048 MB: what the server holds once the model is loaded (its resident memory, which
the budget is what is left of the bound after) is 714 MB with TensorFlow installed by pip and 824 MB
with the same files installed by uv (file pages of ``libtensorflow_cc.so`` the kernel maps in larger
pieces), and at 824 MB the large-image lane (three quarters of 2,048 − 824 − 512 MB) is 535 MB, under
the 576 MB one 24-megapixel DICOM decode costs: every upload is rightly answered 413. At 2,560 MB the
lane fits one such decode and not two, on either install, so the test still queues them.
"""

from __future__ import annotations

import io
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.factories import synthetic, write_dicom
from tests.hostile.harness import running_server

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

MAX_MEMORY_MB = 2560
STARTUP_S = 180


@pytest.fixture(scope="module")
def served(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int, Path]]:
    """(base URL, server pid, project) of ``cxr serve`` on a copy of the trained project."""
    root = tmp_path_factory.mktemp("serve-load") / "project"
    shutil.copytree(trained, root)
    options = ("--model", "smallnet", "--max-upload-mb", "60", "--max-memory-mb", str(MAX_MEMORY_MB))
    with running_server(root, *options) as (url, proc):
        yield url, proc.pid, root
    log = (root / "serve.log").read_text(errors="replace")
    assert "Traceback" not in log, log


def _peak_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MB."""
    with open(f"/proc/{pid}/status") as handle:
        return next(int(line.split()[1]) / 1024 for line in handle if line.startswith("VmHWM:"))


def _small_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(synthetic(np.random.default_rng(3), bright=True, size=224)).save(buffer, "JPEG")
    return buffer.getvalue()


def _predict_small(url: str, timeout: float = 60) -> tuple[int, float]:
    started = time.monotonic()
    response = httpx.post(f"{url}/predict?name=small.jpeg", content=_small_jpeg(), timeout=timeout)
    return response.status_code, time.monotonic() - started


def test_idle_sockets_and_unfinished_headers_do_not_deny_the_service(served: tuple[str, int, Path]) -> None:
    url, _, _ = served
    host, port = url.removeprefix("http://").split(":")
    held: list[socket.socket] = []
    try:
        for _ in range(64):  # connect and say nothing
            held.append(socket.create_connection((host, int(port)), timeout=5))
        for i in range(70):  # a header block that never ends
            sock = socket.create_connection((host, int(port)), timeout=5)
            sock.sendall(f"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow-{i}: ".encode())
            held.append(sock)
        health = httpx.get(f"{url}/health", timeout=10)
        assert health.status_code == 200, health.text
        status, _ = _predict_small(url)
        assert status == 200
        # the oldest of them were closed to make room; the rest are closed at the header deadline
        deadline = time.monotonic() + 30
        open_ones = list(held)
        while open_ones and time.monotonic() < deadline:
            still = []
            for sock in open_ones:
                sock.settimeout(0.05)
                try:
                    if sock.recv(1024) == b"":
                        continue
                except TimeoutError:
                    still.append(sock)
                    continue
                except OSError:
                    continue
            open_ones = still
        assert not open_ones, f"{len(open_ones)} idle connections still open after 30 s"
    finally:
        for sock in held:
            sock.close()


def _dicom_48mb(folder: Path) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 4000, (4900, 4900), dtype=np.uint16)
    return write_dicom(folder / "big.dcm", pixels, WindowCenter="2000", WindowWidth="1000").read_bytes()


def test_64_concurrent_48mb_dicoms_keep_the_peak_under_the_bound(served: tuple[str, int, Path], tmp_path: Path) -> None:
    url, pid, root = served
    data = _dicom_48mb(tmp_path)
    statuses: list[int] = []
    retry_after: list[str | None] = []
    lock = threading.Lock()

    def upload(i: int) -> None:
        try:
            response = httpx.post(
                f"{url}/predict?name=big{i}.dcm",
                content=data,
                headers={"Content-Type": "application/dicom"},
                timeout=120,
            )
            code, after = response.status_code, response.headers.get("retry-after")
            assert response.headers["content-type"] == "application/json"
        except httpx.TransportError:
            code, after = -1, None
        with lock:
            statuses.append(code)
            retry_after.append(after)

    small: list[tuple[int, float]] = []
    with ThreadPoolExecutor(64) as pool:
        futures = [pool.submit(upload, i) for i in range(64)]
        time.sleep(1.0)
        small.append(_predict_small(url))
        for future in futures:
            future.result()
    peak = _peak_mb(pid)
    print(f"peak {peak:.0f} MB; answers {sorted(statuses)}")  # for the record (pytest -s shows it)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 1, statuses
    assert all(after == "1" for code, after in zip(statuses, retry_after, strict=True) if code == 503)
    assert small[0][0] == 200, small
    budget = re.search(r"decode budget .*", (root / "serve.log").read_text(errors="replace"))
    assert peak < MAX_MEMORY_MB, (
        f"peak {peak:.0f} MB over the {MAX_MEMORY_MB} MB bound; the server's {budget and budget.group(0)}; "
        f"{statuses.count(200)} answered 200"
    )
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def _png_declaring(width: int, height: int) -> bytes:
    """A small PNG announcing width × height RGBA 16-bit pixels, all zero (compresses to almost nothing)."""
    import tensorflow as tf

    return tf.io.encode_png(tf.zeros((height, width, 4), tf.uint16), compression=9).numpy()


def test_large_decodes_do_not_starve_a_small_request(served: tuple[str, int, Path]) -> None:
    url, _, _ = served
    heavy = _png_declaring(7000, 7000)  # 49 megapixels: under the pixel cap, heavy to decode
    finished: list[float] = []
    started = time.monotonic()

    def upload(i: int) -> Any:
        response = httpx.post(f"{url}/predict?name=heavy{i}.png", content=heavy, timeout=300)
        finished.append(time.monotonic() - started)
        return response.status_code

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(upload, i) for i in range(16)]
        time.sleep(1.0)
        status, took = _predict_small(url)
        codes = [f.result() for f in futures]
    assert status == 200
    assert set(codes) <= {200, 413, 503}, codes
    # the small request has its own lane: it is answered before the heavy ones are all done
    assert 1.0 + took < max(finished), (took, sorted(finished))
