"""A picture of what the model is fed: one augmented training batch, 4×4, titled by class."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cxr.common import plots
from cxr.config import InputConfig
from cxr.training.input_pipeline import load_images, make_dataset, read_split
from cxr.workspace import HERE


def augmented_batch(
    input_cfg: InputConfig,
    seed: int,
    splits_csv: str | Path = HERE.splits,
    out: str | Path = HERE.preview_plot,
    count: int = 16,
) -> Path:
    """Plot ``count`` images of one augmented training batch, as the model sees them.

    Args:
        input_cfg: the ``input`` section.
        seed: the training seed (``train.common.seed``): the batch the first epoch starts with.
        splits_csv: the split file.
        out: the PNG to write.
        count: images in the grid.

    Returns:
        The PNG's path.
    """
    paths, labels, key = read_split(splits_csv, "train")
    images = load_images(paths, key, input_cfg, "train")
    ds = make_dataset(images, labels, input_cfg, shuffle=True, augment=True, seed=seed)
    batch_x, batch_y = [], []
    for x, y in ds:
        batch_x.extend(x.numpy())
        batch_y.extend(y.numpy())
        if len(batch_x) >= count:
            break
    return plots.image_grid(
        np.asarray(batch_x[:count]), np.asarray(batch_y[:count]), out, "One augmented training batch"
    )
