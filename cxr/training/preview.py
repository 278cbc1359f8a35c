"""A picture of what the model is fed: one augmented training batch, 4×4, titled by class."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cxr.reporting import plots
from cxr.training.input_pipeline import InputConfig, load_images, make_dataset, read_split


def augmented_batch(params: Mapping[str, Any], splits_csv: str | Path = "data/prepared/splits.csv",
                    out: str | Path = "reports/plots/augmented_batch.png", count: int = 16) -> Path:
    input_cfg = InputConfig.from_params(params.get("input") or {})
    seed = int(((params.get("train") or {}).get("common") or {}).get("seed", 42))
    paths, labels, key = read_split(splits_csv, "train")
    images = load_images(paths, key, input_cfg, "train")
    ds = make_dataset(images, labels, input_cfg, shuffle=True, augment=True, seed=seed)
    batch_x, batch_y = [], []
    for x, y in ds:
        batch_x.extend(x.numpy())
        batch_y.extend(y.numpy())
        if len(batch_x) >= count:
            break
    return plots.image_grid(np.asarray(batch_x[:count]), np.asarray(batch_y[:count]), out,
                            "One augmented training batch")
