"""Decode bombs and huge files: refused from their size and header, before any decoding, by ``cxr predict``,
``cxr prepare`` and the training input pipeline, with bounded memory.

The caps are ``input.max_image_pixels`` (50 megapixels) and ``input.max_image_bytes`` (200 MB). The
inputs: a 0.5 MB PNG announcing 23000 × 23000 pixels (1.6 GB once decoded to RGB), a 3 GiB sparse
``.jpeg`` (no disk used), a DICOM whose header announces 10000 × 8000 pixels, and a PNG one pixel row
over the cap next to one just under it (accepted). Peak memory is measured from a fresh interpreter:
Linux folds the spawning process's peak RSS into a child's ``ru_maxrss`` at exec, and this pytest
process holds TensorFlow.
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
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cxr.config import InputConfig
from cxr.errors import DataError
from cxr.training.input_pipeline import load_images, read_split
from tests.factories import chdir, synthetic, write_dicom
from tests.hostile.harness import Outcome, assert_no_traceback, assert_refused, leftovers, snapshot

MODEL = "models/smallnet.keras"
CAP = 50_000_000  # input.max_image_pixels
# A predict run costs ~0.7 GB (TensorFlow); the 50-megapixel PNG ~0.85 GB; a decoded 23000² bomb cost 2.5 GB
# and the 3 GiB file 4 GB before the caps.
PREDICT_RSS_MB = 1500
PREPARE_RSS_MB = 800  # prepare without TensorFlow: ~0.2 GB; the 3 GiB file cost it 3.35 GB before the caps
NOISE = ("E0000", "cuInit", "cuda_platform", "jpeg_mem", "Traceback")


def png_bomb(path: Path, side: int = 23000, height: int | None = None) -> Path:
    """A valid, black, 8-bit grayscale PNG of ``side`` × ``height`` pixels, written without holding them.

    The deflate stream repeats one compressed block of 1000 rows (a full flush makes blocks independent), so
    a 23000² bomb takes 0.5 MB on disk and well under a second to write.
    """
    height = height or side
    rows = bytes(side + 1) * 1000  # each row: filter byte 0, then black pixels
    packer = zlib.compressobj(9, wbits=-15)
    block = packer.compress(rows) + packer.flush(zlib.Z_FULL_FLUSH)
    whole, rest = divmod(height, 1000)
    tail = packer.compress(rows[: rest * (side + 1)]) + packer.flush()
    adler = 1
    for _ in range(whole):
        adler = zlib.adler32(rows, adler)
    adler = zlib.adler32(rows[: rest * (side + 1)], adler)
    idat = b"\x78\xda" + block * whole + tail + struct.pack(">I", adler)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, height, 8, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def _jpeg(seed: int = 1, side: int = 120) -> bytes:
    buffer = io.BytesIO()
    pixels = (np.random.default_rng(seed).random((side, side)) * 255).astype(np.uint8)
    Image.fromarray(pixels, mode="L").save(buffer, format="JPEG")
    return buffer.getvalue()


def sparse_jpeg(path: Path, size: int = 3 << 30) -> Path:
    """A valid JPEG start, extended sparsely (no disk used) to ``size`` bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_jpeg()[:2000])
    os.truncate(path, size)
    return path


_MEASURE = (
    "import json, sys; from pathlib import Path; from tests.hostile.harness import run_cxr; "
    "o = run_cxr(json.loads(sys.argv[1]), Path(sys.argv[2])); print(json.dumps([o.rc, o.out, o.err, o.peak_rss_mb]))"
)


def run_measured(args: list[Any], cwd: Path) -> Outcome:
    """``run_cxr`` started from a fresh, small interpreter, so its peak RSS is the command's own."""
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    argv = json.dumps([str(a) for a in args])
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, argv, str(cwd)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    rc, out, err, peak = json.loads(proc.stdout)
    return Outcome(tuple(str(a) for a in args), rc, out, err, peak)


def _outputs(project: Path) -> dict[str, str]:
    return snapshot(project / "models") | snapshot(project / "reports")


# --------------------------------------------------------------------------------------- predict


def test_predict_refuses_bombs_and_huge_files_from_their_headers_with_bounded_memory(
    project: Path, tmp_path: Path
) -> None:
    good = tmp_path / "in" / "dark.png"
    good.parent.mkdir(parents=True)
    Image.fromarray(synthetic(np.random.default_rng(0), False), mode="L").save(good)
    largest = png_bomb(tmp_path / "in" / "largest.png", 7071)  # 49,999,041 pixels: under the cap
    cut = tmp_path / "in" / "cut.jpeg"
    cut.write_bytes(_jpeg()[:1500])  # truncated: libjpeg logs "Premature end of JPEG data" to fd 2
    refused = {
        png_bomb(tmp_path / "in" / "over.png", 7072, 7071): "50,006,112 pixels, over the 50-megapixel cap (input.max",
        png_bomb(tmp_path / "in" / "bomb.png"): "529,000,000 pixels, over the 50-megapixel cap",
        sparse_jpeg(tmp_path / "in" / "huge.jpeg"): "3,221,225,472 bytes (3.22 GB) is over the 200 MB cap",
        write_dicom(  # a header announcing 10000 × 8000 pixels, over 16 × 16 pixels of data
            tmp_path / "in" / "big.dcm", np.zeros((16, 16), np.uint16), Rows=8000, Columns=10000
        ): "10000 × 8000 = 80,000,000 pixels, over the 50-megapixel cap",
        cut: "not a readable JPEG/PNG/BMP image (Premature end of JPEG data",
    }
    before = _outputs(project)

    outcome = run_measured(["predict", "--model", MODEL, good, largest, *refused], project)

    assert outcome.rc == 1, outcome.describe()
    for marker in NOISE:
        assert marker not in outcome.err + outcome.out, outcome.describe()
    assert [line.split(": prediction: ")[0] for line in outcome.out.splitlines()] == [str(good), str(largest)]
    errors = outcome.err.splitlines()
    assert len(errors) == len(refused), outcome.describe()
    for (path, reason), line in zip(refused.items(), errors, strict=True):
        assert line.startswith(f"cxr: error: {path}: ") and reason in line, line
    assert outcome.peak_rss_mb < PREDICT_RSS_MB, f"peak RSS {outcome.peak_rss_mb:.0f} MB"
    assert _outputs(project) == before and leftovers(project) == []


# --------------------------------------------------------------------------------------- prepare


def test_prepare_excludes_files_over_the_caps_with_their_reason(project: Path) -> None:
    normal = project / "data/raw/NORMAL"
    bomb = png_bomb(normal / "IM-9001-0001.png")
    huge = sparse_jpeg(normal / "IM-9002-0001.jpeg")
    medium = normal / "IM-9003-0001.png"  # 100 × 100: over a cap lowered to 5000 pixels
    Image.fromarray(synthetic(np.random.default_rng(3), False, size=100), mode="L").save(medium)
    manifest = (project / "data/prepared/manifest.csv").read_bytes()
    models = snapshot(project / "models")

    outcome = run_measured(["prepare", "-S", "input.max_image_pixels=5000"], project)

    assert outcome.rc == 0, outcome.describe()
    assert_no_traceback(outcome)
    quality = json.loads((project / "reports/data_quality.json").read_text())
    reasons = {e["path"]: e["reason"] for e in quality["excluded"]}
    over = "over the 0.005-megapixel cap (input.max_image_pixels=5000)"
    assert f"529,000,000 pixels, {over}" in reasons["data/raw/NORMAL/IM-9001-0001.png"]
    assert "over the 200 MB cap (input.max_image_bytes=200000000)" in reasons["data/raw/NORMAL/IM-9002-0001.jpeg"]
    assert f"10,000 pixels, {over}" in reasons["data/raw/NORMAL/IM-9003-0001.png"]
    # the usable images are the same: the manifest is byte-identical, and no model was touched
    assert (project / "data/prepared/manifest.csv").read_bytes() == manifest
    assert snapshot(project / "models") == models and leftovers(project) == []
    assert outcome.peak_rss_mb < PREPARE_RSS_MB, f"peak RSS {outcome.peak_rss_mb:.0f} MB"
    assert bomb.stat().st_size < 600_000 and huge.stat().st_blocks * 512 < 1_000_000  # still a bomb, still sparse


# -------------------------------------------------------------------------------- training input


@pytest.mark.parametrize("swap", ["bomb", "sparse"])
def test_training_input_refuses_a_file_that_changed_since_prepare(swap: str, project: Path) -> None:
    """Before decoding a split, every file's size and header are checked again (no TensorFlow needed)."""
    with chdir(project):
        paths, _, key = read_split("data/prepared/splits.csv", "train")
        victim = Path(paths[3])
        victim.unlink()
        if swap == "bomb":
            png_bomb(victim)
        else:
            sparse_jpeg(victim)
        with pytest.raises(DataError) as caught:
            load_images(paths, key, InputConfig(image_size=32, cache="memory"), "train")
    message = str(caught.value)
    assert message.startswith(f"{victim}: ") and "changed since prepare: rerun prepare" in message
    assert ("over the 50-megapixel cap" if swap == "bomb" else "over the 200 MB cap") in message
    assert "\n" not in message


@pytest.mark.slow
def test_train_refuses_a_training_image_swapped_for_a_bomb(project: Path) -> None:
    shutil.rmtree(project / "data/cache")  # a warm cache would never decode the file again
    with chdir(project):
        victim = Path(read_split("data/prepared/splits.csv", "train")[0][0])
    (project / victim).unlink()
    png_bomb(project / victim)
    before = _outputs(project)

    outcome = run_measured(["train", "--model", "smallnet"], project)

    assert "over the 50-megapixel cap" in assert_refused(outcome, str(victim))
    assert outcome.peak_rss_mb < PREDICT_RSS_MB, f"peak RSS {outcome.peak_rss_mb:.0f} MB"
    assert _outputs(project) == before and leftovers(project) == []
