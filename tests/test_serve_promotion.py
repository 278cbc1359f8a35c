"""``cxr serve`` follows the champion: a promotion or a rollback during a stream of requests is picked
up without a restart, no request fails, and every response names the model that scored it."""

from __future__ import annotations

import io
import itertools
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.factories import REPO_ROOT, chdir, small_params, synthetic

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", "CXR_NO_PROGRESS": "1"}


@pytest.fixture
def project(trained: Path, tmp_path: Path) -> Iterator[tuple[Path, str, str]]:
    """A copy of the trained project with a second stored version (another seed), not shipped."""
    from cxr.config import parse_params
    from cxr.provenance import model_store
    from cxr.provenance.hashing import sha256_file
    from cxr.training.train import train

    root = tmp_path / "project"
    shutil.copytree(trained, root)
    params = small_params()
    params["train"]["common"]["seed"] = 11
    with chdir(root):
        first = sha256_file(root / "models/smallnet.keras")
        model_store.champion(model_store.Shipped("smallnet"))  # the shipped model is a stored version too
        train("smallnet", parse_params(params), install=False)
        second = model_store.latest("smallnet").sha256
    assert first != second
    yield root, first, second


def _start(root: Path) -> tuple[subprocess.Popen[bytes], str]:
    log_path = root / "serve.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cxr", "serve", "--model", "smallnet", "--port", "0", "--watch", "0.2"],
            cwd=root,
            env=_env(),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"cxr serve exited:\n{log_path.read_text(errors='replace')}")
        found = re.search(r"on (http://127\.0\.0\.1:\d+)", log_path.read_text(errors="replace"))
        if found:
            try:
                if httpx.get(f"{found.group(1)}/health", timeout=5).status_code == 200:
                    return proc, found.group(1)
            except httpx.TransportError:
                pass
        time.sleep(0.2)
    proc.kill()
    pytest.fail("cxr serve did not start")


def _wait_for(url: str, sha: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if httpx.get(f"{url}/health", timeout=5).json()["model_sha256"] == sha:
            return
        time.sleep(0.1)
    pytest.fail(f"the server did not pick up {sha[:12]}")


def test_a_promotion_and_a_rollback_during_a_stream_of_requests(project, cli):
    root, first, second = project
    buffer = io.BytesIO()
    Image.fromarray(synthetic(np.random.default_rng(1), bright=True, size=48), mode="L").save(buffer, format="PNG")
    image = buffer.getvalue()
    proc, url = _start(root)
    answers: dict[int, list[tuple[int, str | None]]] = {0: [], 1: [], 2: []}
    stop = threading.Event()

    def stream(client_id: int) -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                reply = client.post(f"{url}/predict", files={"file": ("x.png", image, "image/png")})
                answers[client_id].append((reply.status_code, reply.json().get("model_sha256")))

    try:
        workers = [threading.Thread(target=stream, args=(i,)) for i in answers]
        for worker in workers:
            worker.start()
        time.sleep(1.0)
        with chdir(root):
            assert cli(["models", "promote", second[:12]])[0] == 0
        _wait_for(url, second)
        time.sleep(0.5)
        with chdir(root):
            assert cli(["models", "rollback", "smallnet"])[0] == 0
        _wait_for(url, first)
        time.sleep(0.5)
        stop.set()
        for worker in workers:
            worker.join()
        reload = httpx.post(f"{url}/reload", timeout=30).json()
        assert reload["reloaded"] is False and reload["model_sha256"] == first
    finally:
        stop.set()
        proc.terminate()
        proc.wait(timeout=30)
    for client_answers in answers.values():
        assert {status for status, _ in client_answers} == {200}, client_answers[:5]
        named = [sha for _, sha in client_answers]
        # each client's answers follow the swaps: the first model, the second, the first again
        changes = [named[0]] + [b for a, b in itertools.pairwise(named) if a != b]
        assert changes == [first, second, first]
    log = (root / "serve.log").read_text(errors="replace")
    assert "Traceback" not in log and log.count("now serving smallnet") == 2
