"""Figures written by the pipeline (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from cxr import CLASS_NAMES

_COLOURS = {"NORMAL": "#4c72b0", "PNEUMONIA": "#dd8452"}


def class_distribution(counts: Mapping[str, Mapping[str, int]], out: str | Path, title: str) -> Path:
    """One bar chart per split (the notebook's side-by-side charts), counts written on the bars."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    splits = [s for s, c in counts.items() if sum(c.values())]
    fig, axes = plt.subplots(1, max(len(splits), 1), figsize=(4 * max(len(splits), 1), 3.6),
                             squeeze=False, sharey=True)
    for ax, split in zip(axes[0], splits, strict=False):
        values = [counts[split].get(c, 0) for c in CLASS_NAMES]
        bars = ax.bar(CLASS_NAMES, values, color=[_COLOURS[c] for c in CLASS_NAMES])
        ax.bar_label(bars)
        ax.set_title(f"{split} ({sum(values)})")
        ax.set_ylabel("images")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return out
