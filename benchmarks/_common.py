"""Helpers shared by the benchmarks: a labelled file list and the notebook's generator."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
from imutils import paths as imutils_paths

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def labelled_files(data: str | Path, limit: int | None = None) -> pd.DataFrame:
    """All images below ``data`` with the notebook's labels (``normal`` / ``pn``), sorted."""
    files = sorted(imutils_paths.list_images(str(data)))
    frame = pd.DataFrame(
        {"paths": files, "labels": ["normal" if "NORMAL" in Path(f).parent.name.upper() else "pn" for f in files]}
    )
    if limit:
        frame = frame.sample(n=min(limit, len(frame)), random_state=0).sort_values("paths")
    return frame.reset_index(drop=True)


def notebook_generator(
    frame: pd.DataFrame, batch_size: int = 32, subset: str | None = "training", image_size: int = 224
):
    """The original notebook's training generator (Keras' legacy ImageDataGenerator)."""
    from cxr.runtime import tensorflow

    tensorflow()
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    datagen = ImageDataGenerator(
        rescale=1 / 255,
        rotation_range=5,
        width_shift_range=0.1,
        height_shift_range=0.1,
        validation_split=0.2 if subset else 0.0,
    )
    return datagen.flow_from_dataframe(
        frame,
        x_col="paths",
        y_col="labels",
        target_size=(image_size, image_size),
        class_mode="binary",
        classes=["normal", "pn"],
        batch_size=batch_size,
        seed=42,
        subset=subset,
    )
