"""``cxr serve``: a real server on a free loopback port, driven by a real HTTP client.

The server (``python -m cxr serve --port 0``) starts once for the module on a copy of the shared
trained project, with a small upload cap so the oversize case is cheap. Good JPEG, PNG and DICOM
uploads must give ``cxr predict --json``'s records; bad ones a 4xx with a one-line JSON reason.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.factories import REPO_ROOT, synthetic, write_dicom
from tests.hostile.harness import assert_refused, run_cxr, running_server

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("python_multipart")

UPLOAD_CAP_MB = 0.2  # 200 kB (the server's --max-upload-mb): the oversize upload stays cheap


def _png_bomb(width: int, height: int, complete: bool = False) -> bytes:
    """A gray PNG whose header claims ``width`` × ``height`` pixels: 70 bytes in all, or (``complete``)
    every row, of zeros, which deflate packs about 1000:1 (8000 × 8000 → 62 kB for 64 megapixels)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    if complete:
        packer, row = zlib.compressobj(9), b"\0" * (width + 1)  # a filter byte, then the row's pixels
        pixels = b"".join([packer.compress(row) for _ in range(height)] + [packer.flush()])
    else:
        pixels = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def _encoded(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def project(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the trained project plus three images to upload: a JPEG, a PNG and a DICOM."""
    root = tmp_path_factory.mktemp("serve") / "project"
    shutil.copytree(trained, root)
    rng = np.random.default_rng(7)
    uploads = root / "uploads"
    uploads.mkdir()
    (uploads / "bright.jpeg").write_bytes(_encoded(synthetic(rng, bright=True, size=48), "JPEG"))
    (uploads / "dark.png").write_bytes(_encoded(synthetic(rng, bright=False, size=40), "PNG"))
    write_dicom(uploads / "scan.dcm", (synthetic(rng, bright=True, size=64).astype(np.uint16) * 16))
    ct = uploads.parent / "uploads-outside"  # not among the uploads the CLI predicts
    ct.mkdir()
    write_dicom(
        ct / "ct.dcm", synthetic(rng, bright=True, size=64), modality="CT", sop_class="1.2.840.10008.5.1.4.1.1.2"
    )
    return root


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", "CXR_NO_PROGRESS": "1"}


@pytest.fixture(scope="module")
def cli_run(project: Path) -> Iterator[subprocess.Popen[str]]:
    """``cxr predict --json`` on the uploads, started before the server so the two start-ups overlap."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cxr", "predict", "--model", "smallnet", "--json", "uploads"],
        cwd=project,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


@pytest.fixture(scope="module")
def server(project: Path, cli_run: subprocess.Popen[str]) -> Iterator[str]:
    """``cxr serve`` on a free loopback port (``--port 0``); its base URL once ``/health`` answers."""
    with running_server(project, "--model", "smallnet", "--max-upload-mb", str(UPLOAD_CAP_MB)) as (url, _):
        yield url
    log = (project / "serve.log").read_text(errors="replace")
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def cli_records(cli_run: subprocess.Popen[str]) -> dict[str, dict[str, Any]]:
    """``cxr predict --json``'s records for the three uploads, by file name."""
    out, err = cli_run.communicate(timeout=300)
    assert cli_run.returncode == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    return {Path(r["path"]).name: r for r in records}


def _assert_same_record(served: dict[str, Any], cli: dict[str, Any], name: str) -> None:
    assert set(served) == set(cli), (served, cli)
    assert served["path"] == name
    assert served["probability"] == pytest.approx(cli["probability"], abs=2e-6)
    for key in set(cli) - {"path", "probability"}:
        assert served[key] == cli[key], key


def _assert_one_line_error(response: Any, status: int | tuple[int, ...]) -> str:
    statuses = status if isinstance(status, tuple) else (status,)
    assert response.status_code in statuses, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and "\n" not in body["error"], body
    assert "Traceback" not in response.text and 'File "' not in response.text, response.text
    return body["error"]


def test_health_and_model_card(server: str, project: Path) -> None:
    card = json.loads((project / "models/smallnet.card.json").read_text())
    sha = card["model_sha256"]
    health = httpx.get(f"{server}/health").json()
    assert health == {
        "status": "ok",
        "model": "smallnet",
        "model_sha256": sha,
        "card_model_sha256": sha,
        "verified_model": True,
    }
    model = httpx.get(f"{server}/model").json()
    assert model["card"] == card  # passed through whole, intended use included
    assert model["model_sha256"] == sha and model["verified_model"] is True
    assert model["limits"]["max_upload_bytes"] == int(UPLOAD_CAP_MB * 1e6)
    assert model["limits"]["max_image_pixels"] > 0


def test_predict_gives_the_cli_record_for_jpeg_png_and_dicom(server: str, project: Path, cli_records) -> None:
    uploads = project / "uploads"
    with httpx.Client(base_url=server, timeout=60) as client:
        for name in ("bright.jpeg", "dark.png", "scan.dcm"):
            data = (uploads / name).read_bytes()
            as_form = client.post("/predict", files={"file": (name, data)})
            assert as_form.status_code == 200, as_form.text
            _assert_same_record(as_form.json(), cli_records[name], name)
            raw = client.post("/predict", params={"name": name}, content=data)
            assert raw.status_code == 200, raw.text
            _assert_same_record(raw.json(), cli_records[name], name)
        # a DICOM sent raw without a name is recognised by its 'DICM' marker
        unnamed = client.post("/predict", content=(uploads / "scan.dcm").read_bytes())
        assert unnamed.status_code == 200, unnamed.text
        assert unnamed.json()["probability"] == pytest.approx(cli_records["scan.dcm"]["probability"], abs=2e-6)


def test_bad_uploads_get_a_one_line_4xx_and_the_server_keeps_serving(server: str, project: Path) -> None:
    jpeg = (project / "uploads/bright.jpeg").read_bytes()
    cap = int(UPLOAD_CAP_MB * 1e6)
    with httpx.Client(base_url=server, timeout=60) as client:
        reason = _assert_one_line_error(client.post("/predict", files={"file": ("notes.txt", b"not an image\n")}), 422)
        assert "notes.txt" in reason
        _assert_one_line_error(client.post("/predict", files={"file": ("cut.jpeg", jpeg[: len(jpeg) // 2])}), 422)
        _assert_one_line_error(client.post("/predict", content=b"%PDF-1.4 \x00\x01 pretending"), 422)
        assert "empty" in _assert_one_line_error(client.post("/predict", content=b""), 400)
        _assert_one_line_error(client.post("/predict", files={"file": ("empty.png", b"")}), 400)
        # pixel bombs: refused from the header, before a pixel is decoded (input.max_image_pixels)
        for bomb in (_png_bomb(100_000, 100_000), _png_bomb(20_000, 20_000), _png_bomb(8000, 8000, complete=True)):
            assert len(bomb) < cap
            assert "megapixel" in _assert_one_line_error(
                client.post("/predict", files={"file": ("bomb.png", bomb)}), 422
            )
        bad_dicom = b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff" + b"1.2" * 10
        _assert_one_line_error(client.post("/predict", files={"file": ("bad.dcm", bad_dicom)}), 422)
        # a CT slice is refused from its metadata, with the field and what is expected
        ct = project / "uploads-outside" / "ct.dcm"
        reason = _assert_one_line_error(client.post("/predict", files={"file": ("ct.dcm", ct.read_bytes())}), 422)
        assert "ct.dcm: Modality CT: outside intended use" in reason
        # too large: refused from Content-Length, and from the running count of a chunked body
        assert "limit" in _assert_one_line_error(client.post("/predict", content=b"\xff" * (cap + 1)), 413)
        # far beyond the socket buffers: the server drops the rest of the body, so the answer still arrives
        _assert_one_line_error(client.post("/predict", content=b"\xff" * 3_000_000), 413)
        chunks = (b"\xff" * 65536 for _ in range(cap // 65536 + 2))
        _assert_one_line_error(client.post("/predict", content=chunks), 413)
        _assert_one_line_error(client.post("/predict", files={"file": ("big.jpeg", b"\xff" * (cap + 1))}), 413)
        # malformed requests
        _assert_one_line_error(client.post("/predict", files={"other": ("a.txt", b"x")}, data={"x": "1"}), (400, 422))
        _assert_one_line_error(client.post("/predict", data={"file": "text, not a file"}), 422)
        _assert_one_line_error(
            client.post("/predict", content=b"garbage", headers={"content-type": "multipart/form-data; boundary=zz"}),
            400,
        )
        _assert_one_line_error(client.post("/predict", files=[("a", ("a.png", b"1")), ("b", ("b.png", b"2"))]), 400)
        _assert_one_line_error(client.get("/predict"), 405)
        _assert_one_line_error(client.get("/nowhere"), 404)
        good = client.post("/predict", files={"file": ("bright.jpeg", jpeg)})
        assert good.status_code == 200, good.text


def test_concurrent_requests_agree_with_the_cli(server: str, project: Path, cli_records) -> None:
    names = ["bright.jpeg", "dark.png", "scan.dcm"]
    payloads = {name: (project / "uploads" / name).read_bytes() for name in names}

    def client_run(worker: int) -> list[tuple[str, int, dict[str, Any]]]:
        results = []
        with httpx.Client(base_url=server, timeout=120) as client:
            for i in range(4):
                name = names[(worker + i) % len(names)]
                response = client.post("/predict", files={"file": (name, payloads[name])})
                results.append((name, response.status_code, response.json()))
        return results

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = [r for batch in pool.map(client_run, range(8)) for r in batch]
    assert len(results) == 32
    for name, status, record in results:
        assert status == 200, record
        _assert_same_record(record, cli_records[name], name)


def test_serve_refuses_an_unverified_model(trained: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(trained / "models/smallnet.keras", models / "tampered.keras")
    card = json.loads((trained / "models/smallnet.card.json").read_text())
    card["model_sha256"] = "0" * 64
    (models / "tampered.card.json").write_text(json.dumps(card))
    outcome = run_cxr(["serve", "--model", "models/tampered.keras", "--port", "0"], tmp_path, timeout=300)
    assert_refused(outcome, "tampered.keras")


def test_serve_without_the_extra_names_the_install_command(monkeypatch, cli) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    code, out, err = cli(["serve", "--model", "smallnet"])
    assert code == 1 and not out
    assert err.strip().splitlines() == ['cxr: error: cxr serve needs uvicorn: install with pip install -e ".[serve]"']


def test_a_server_that_allows_images_outside_the_intended_use_marks_them(project: Path) -> None:
    """422 by default (a client cannot miss a refusal); with the override, 200 and intended_use: false."""
    from fastapi.testclient import TestClient

    from cxr.inference.loading import load
    from cxr.serving.app import create_app

    lm = load(project / "models/smallnet.keras")
    ct = (project / "uploads-outside" / "ct.dcm").read_bytes()
    scan = (project / "uploads" / "scan.dcm").read_bytes()
    for allow, status in ((False, 422), (True, 200)):
        with TestClient(create_app(lm, 0.5, "test", allow_outside_intended_use=allow)) as client:
            answer = client.post("/predict", files={"file": ("ct.dcm", ct)})
            assert answer.status_code == status, answer.text
            chest = client.post("/predict", files={"file": ("scan.dcm", scan)}).json()
            assert chest["intended_use"] is True and "outside_intended_use" not in chest
    record = answer.json()
    assert record["intended_use"] is False and record["outside_intended_use"] == "Modality CT"
