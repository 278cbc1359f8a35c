"""``cxr serve`` as other programs see it: its OpenAPI schema, Schemathesis fuzzing the live server
against that schema (loopback, a bounded number of examples), and ``POST /predict/batch``."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.factories import synthetic, write_dicom
from tests.hostile.harness import running_server

httpx = pytest.importorskip("httpx")
schemathesis = pytest.importorskip("schemathesis")

pytestmark = pytest.mark.slow
EXAMPLES = 25  # per operation: bounded, so the run stays about a minute


@pytest.fixture(scope="module")
def server(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("serve-openapi") / "project"
    shutil.copytree(trained, root)
    with running_server(root, "--model", "smallnet", "--max-upload-mb", "0.5") as (url, _):
        yield url
    log = (root / "serve.log").read_text(errors="replace")
    assert "Traceback" not in log and "internal error" not in log, log


def test_the_schema_declares_every_endpoint_its_bodies_and_its_errors(server: str) -> None:
    spec = httpx.get(f"{server}/openapi.json").json()
    paths = spec["paths"]
    assert {"/predict", "/predict/batch", "/health", "/model", "/reload"} <= set(paths)
    predict = paths["/predict"]["post"]
    assert {"200", "400", "413", "422", "503"} <= set(predict["responses"])
    assert set(predict["requestBody"]["content"]) >= {"multipart/form-data", "application/octet-stream"}
    record = spec["components"]["schemas"]["Prediction"]
    assert {"label", "probability", "model_sha256", "threshold"} <= set(record["properties"])
    docs = httpx.get(f"{server}/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def test_schemathesis_finds_no_server_error_and_no_schema_violation(server: str, tmp_path: Path) -> None:
    """The Schemathesis CLI (its pytest plugin does not run under pytest 9) against the live server:
    every operation, valid and invalid inputs, a bounded number of examples each, a fixed seed."""
    command = [
        *(sys.executable, "-m", "schemathesis.cli", "run", f"{server}/openapi.json"),
        *("--checks", CHECKS, "--max-examples", str(EXAMPLES), "--seed", "42", "--workers", "2"),
        *("--phases", "examples,coverage,fuzzing", "--request-timeout", "60", "--generation-database", "none"),
        *("--report", "ndjson", "--report-dir", str(tmp_path)),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "No issues found" in proc.stdout or "passed" in proc.stdout.lower(), proc.stdout[-3000:]


def _png(bright: bool, seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(synthetic(np.random.default_rng(seed), bright), mode="L").save(buffer, "PNG")
    return buffer.getvalue()


def test_a_batch_gives_one_record_per_file_in_order_and_a_bad_file_is_its_own_error(
    server: str, tmp_path: Path
) -> None:
    dicom = write_dicom(tmp_path / "scan.dcm", (synthetic(np.random.default_rng(5), True).astype(np.uint16) * 16))
    files = [
        ("files", ("dark.png", _png(False, 1), "image/png")),
        ("files", ("letter.jpeg", b"Dear doctor, not an image", "image/jpeg")),
        ("files", ("scan.dcm", dicom.read_bytes(), "application/dicom")),
        ("files", ("empty.png", b"", "image/png")),
        ("files", ("bright.png", _png(True, 2), "image/png")),
    ]
    response = httpx.post(f"{server}/predict/batch", files=files, timeout=120)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["path"] for r in results] == ["dark.png", "letter.jpeg", "scan.dcm", "empty.png", "bright.png"]
    assert results[1]["status"] == 422 and "not a readable" in results[1]["error"]
    assert results[3]["status"] == 400 and "empty" in results[3]["error"]
    for index, (_, (name, data, kind)) in enumerate(files):
        if index in (1, 3):
            continue
        single = httpx.post(f"{server}/predict?name={name}", content=data, headers={"Content-Type": kind}).json()
        assert results[index]["probability"] == pytest.approx(single["probability"], abs=2e-6), name
        assert results[index]["label"] == single["label"] and results[index]["model_sha256"] == single["model_sha256"]


def test_a_batch_that_is_not_multipart_or_has_no_files_is_one_error(server: str) -> None:
    raw = httpx.post(f"{server}/predict/batch", content=b"abc", headers={"Content-Type": "image/png"})
    assert raw.status_code == 400 and raw.json()["error"].startswith("send a batch as multipart")
    no_files = httpx.post(f"{server}/predict/batch", files={"note": (None, "x")})  # multipart, a text field only
    assert no_files.status_code == 400 and "without files" in no_files.json()["error"], no_files.text
