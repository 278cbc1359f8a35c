"""Builders shared by the test modules: plain functions and constants, no fixtures.

Test modules import from here (``from tests.factories import ...``), never from one another or from
``conftest.py``; the shared fixtures (``make_dataset``, ``cli``, ``trained``, ``evaluated``) live in
``conftest.py``, which builds them with these functions. ``tests/test_test_suite.py`` keeps it so.

The ``cxr`` and ``pydicom`` imports are local to the functions that need them: ``conftest.py`` imports
this module for every test run, and most tests never touch TensorFlow or DICOM.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@contextlib.contextmanager
def chdir(path: Path) -> Iterator[Path]:
    """Work in ``path`` for the ``with`` block (usable where ``monkeypatch.chdir`` is not: module fixtures)."""
    old = Path.cwd()
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(old)


# ------------------------------------------------------------------------------ images and layouts


def write_image(
    path: Path, seed: int, size: tuple[int, int] = (40, 32), mode: str = "L", fmt: str | None = None
) -> Path:
    """A small noisy image whose bytes depend on ``seed`` (distinct seeds → distinct hashes)."""
    rng = np.random.default_rng(seed)
    channels = {"L": None, "RGB": 3, "RGBA": 4}[mode]
    shape = (size[1], size[0]) if channels is None else (size[1], size[0], channels)
    pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode=mode).save(path, format=fmt)
    return path


def kermany_layout(
    n_patients: int = 12, images_per_patient: int = 2, splits: tuple[str, ...] = ("train",)
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


# ------------------------------------------------------------------------------------------- DICOM

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


def write_dicom(
    path: Path,
    pixels: np.ndarray | None,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    frames: int = 1,
    transfer_syntax: str | None = None,
    encapsulated: bytes | None = None,
    sop_class: str = DX_FOR_PRESENTATION,
    modality: str = "DX",
    **attributes: Any,
) -> Path:
    """A DICOM Part 10 file (preamble, 'DICM', file meta) holding ``pixels`` as stored values.

    ``pixels``: uint8 (8-bit), uint16 (unsigned 16-bit) or int16 (signed, PixelRepresentation 1);
    (frames, rows, columns) for a multi-frame object; None for an object without pixel data.
    ``transfer_syntax``: explicit VR little endian unless given.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientID = "TEST-0001"
    if pixels is not None:
        ds.Rows, ds.Columns = (int(n) for n in pixels.shape[-2:])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = 8 * pixels.dtype.itemsize
        ds.BitsStored = bits_stored or ds.BitsAllocated
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
        if frames > 1:
            ds.NumberOfFrames = frames
        if encapsulated is not None:
            ds.PixelData = encapsulated
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
        else:
            ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
            ds["PixelData"].VR = "OB" if ds.BitsAllocated == 8 else "OW"
    for key, value in attributes.items():
        setattr(ds, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# ------------------------------------------------------------------- a small learnable synthetic project

IMAGE_SIZE = 32
SPLIT = {"strategy": "patient", "seed": 42, "test_size": 0.2, "val_size": 0.2}
# A data file whose name is markup: prepare excludes it (not an image) and the report lists it.
HOSTILE_NAME = "<img src=x onerror=alert(1)>.jpeg"


def synthetic(rng: np.random.Generator, bright: bool, size: int = IMAGE_SIZE) -> np.ndarray:
    """A dark (NORMAL-like) or bright (PNEUMONIA-like) noisy 8-bit image."""
    return np.clip((210 if bright else 40) + rng.normal(0, 25, (size, size)), 0, 255).astype(np.uint8)


def write_raw(
    raw: Path, n_patients: int = 16, images_per_patient: int = 2, seed: int = 0, hostile: bool = True
) -> None:
    """``raw/{NORMAL,PNEUMONIA}`` with Kermany names: dark NORMAL, bright PNEUMONIA images, plus noise;
    with ``hostile``, also a non-image named ``HOSTILE_NAME`` under NORMAL."""
    rng = np.random.default_rng(seed)
    for p in range(n_patients):
        kind = "bacteria" if p % 2 else "virus"
        for i in range(images_per_patient):
            for class_name, name, bright in (
                ("NORMAL", f"IM-{p:04d}-{i + 1:04d}.jpeg", False),
                ("PNEUMONIA", f"person{p}_{kind}_{p * 10 + i}.jpeg", True),
            ):
                path = raw / class_name / name
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(synthetic(rng, bright), mode="L").save(path, format="JPEG")
    if hostile:
        (raw / "NORMAL" / HOSTILE_NAME).write_text("not an image\n")


def small_params() -> dict[str, Any]:
    """The repository's params.yaml shrunk for the shared project: smallnet, 3 epochs, 32 px."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    # the synthetic classes differ only in brightness, which histogram equalisation removes by design
    params["input"].update(image_size=IMAGE_SIZE, batch_size=8, cache="disk", cache_dir="data/cache", normalize="none")
    params["train"]["models"] = ["smallnet"]
    params["ensemble"]["members"] = []
    params["train"]["common"].update(
        tensorboard=False,
        precision="float32",
        monitor="val_loss",
        monitor_mode="min",
        ema=False,
        label_smoothing=0.0,  # three epochs of a few steps: an average of the weights would still be the init
        # 12 validation images put the content check's threshold at their maximum: its own tests enable it
        domain_check=False,
        health={"on_collapse": "warn", "min_val_auc": 0.6, "min_prediction_std": 0.01},
    )
    params["train"]["smallnet"].update(epochs=3, learning_rate=0.001, continue_epochs=0)
    params["evaluate"].update(bootstrap=200, seed=42, gradcam_per_outcome=2, threshold=0.5, border_margin=0.125)
    return params


def prepared_project(root: Path, params: dict[str, Any], *, n_patients: int = 16, hostile: bool = True) -> Path:
    """``root`` with ``params.yaml``, a synthetic ``data/raw`` and ``data/prepared`` (no model yet)."""
    from cxr.config import PrepareConfig, SplitConfig
    from cxr.data.prepare import prepare

    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    with chdir(root):
        write_raw(root / "data/raw", n_patients=n_patients, hostile=hostile)
        prepare("data/raw", SplitConfig(**SPLIT), PrepareConfig(min_images_per_class=5, workers=1))
    return root


def train_smallnet(root: Path, params: dict[str, Any]) -> dict[str, Any]:
    """Train smallnet in the prepared project ``root``; its card."""
    from cxr.config import parse_params
    from cxr.training.train import train

    with chdir(root):
        return train("smallnet", parse_params(params))


def build_trained_project(root: Path) -> Path:
    """data/raw → prepare → train smallnet with ``small_params()`` (3 epochs, 32 px), in ``root``."""
    params = small_params()
    prepared_project(root, params)
    train_smallnet(root, params)
    return root


def build_evaluated_project(root: Path, trained: Path) -> Path:
    """A copy of the trained project ``trained`` in ``root``, plus ``evaluate`` and ``explain`` outputs."""
    from cxr.config import parse_params
    from cxr.evaluation.evaluate import evaluate_models
    from cxr.evaluation.explain import explain_models

    shutil.copytree(trained, root, dirs_exist_ok=True)
    config = parse_params(small_params())
    with chdir(root):
        evaluate_models(["smallnet"], config.evaluate, config.input)
        explain_models(["smallnet"], config.evaluate, config.input)
    return root
