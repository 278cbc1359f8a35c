"""Shared fixtures: tiny synthetic radiograph-like images and a Kaggle-layout folder builder."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CXR_NO_PROGRESS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def write_image(path: Path, seed: int, size: tuple[int, int] = (40, 32), mode: str = "L",
                fmt: str | None = None) -> Path:
    """A small noisy image whose bytes depend on ``seed`` (distinct seeds → distinct hashes)."""
    rng = np.random.default_rng(seed)
    channels = {"L": None, "RGB": 3, "RGBA": 4}[mode]
    shape = (size[1], size[0]) if channels is None else (size[1], size[0], channels)
    pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode=mode).save(path, format=fmt)
    return path


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Build ``root/[split/]CLASS/name`` from ``{"train/NORMAL": ["IM-0001-0001.jpeg", ...]}``."""

    def build(layout: dict[str, list[str]], root: Path | None = None) -> Path:
        root = root or tmp_path / "source"
        seed = 0
        for folder, names in layout.items():
            for name in names:
                seed += 1
                fmt = "PNG" if name.lower().endswith(".png") else "JPEG"
                write_image(root / folder / name, seed, fmt=fmt)
        return root

    return build


def kermany_layout(n_patients: int = 12, images_per_patient: int = 2, splits: tuple[str, ...] = ("train",)
                   ) -> dict[str, list[str]]:
    """File names in the Kermany style: several images per patient, both classes."""
    layout: dict[str, list[str]] = {}
    counter = 0
    for split in splits:
        prefix = f"{split}/" if split else ""
        normal, pneumonia = [], []
        for p in range(n_patients):
            pid = p + 1000 * splits.index(split)
            for i in range(images_per_patient):
                counter += 1
                normal.append(f"IM-{pid:04d}-{i + 1:04d}.jpeg")
                kind = "bacteria" if p % 2 else "virus"
                pneumonia.append(f"person{pid}_{kind}_{counter}.jpeg")
                pneumonia.append(f"person{pid}_{kind}_{counter + 5000}.jpeg")
        layout[f"{prefix}NORMAL"] = normal
        layout[f"{prefix}PNEUMONIA"] = pneumonia
    return layout


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[[list[str]], tuple[int, str, str]]]:
    """Run ``cxr.cli.main`` in-process → (exit code, stdout, stderr); restore the log handlers after."""
    from cxr.cli import main

    loggers = [logging.getLogger(n) for n in ("cxr", "tasks", "flows")]
    saved = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]

    def run(argv: list[str]) -> tuple[int, str, str]:
        code = main(argv)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    yield run
    for lg, (handlers, level, propagate) in zip(loggers, saved, strict=True):
        lg.handlers, lg.level, lg.propagate = handlers, level, propagate
