"""Figures written by the pipeline (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from cxr import CLASS_NAMES

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

_COLOURS = {"NORMAL": "#4c72b0", "PNEUMONIA": "#dd8452"}


def class_distribution(counts: Mapping[str, Mapping[str, int]], out: str | Path, title: str) -> Path:
    """One bar chart per split (the notebook's side-by-side charts), counts written on the bars.

    Args:
        counts: images per split and class, ``{split: {class name: count}}``; splits with no
            images get no chart.
        out: the PNG to write (100 dpi); its folder is created.
        title: the figure's title.

    Returns:
        ``out`` as a Path.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    splits = [s for s, c in counts.items() if sum(c.values())]
    fig, axes = plt.subplots(1, max(len(splits), 1), figsize=(4 * max(len(splits), 1), 3.6), squeeze=False, sharey=True)
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


def training_curves(history: Mapping[str, list[float]], out: str | Path, title: str) -> Path:
    """Loss, accuracy and AUC per epoch, train vs validation (the notebook's curves, plus AUC).

    Args:
        history: Keras' history: ``loss``/``accuracy``/``auc`` and their ``val_`` twins, one value
            per epoch, and optionally ``epoch`` (the x axis; default 1, 2, ...). A metric without
            its train series is not drawn; at least one of the three must be there.
        out: the PNG to write (100 dpi); its folder is created.
        title: the figure's title.

    Returns:
        ``out`` as a Path.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    metrics = [m for m in ("loss", "accuracy", "auc") if m in history]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    epochs = history.get("epoch") or list(range(1, len(history[metrics[0]]) + 1))
    for ax, metric in zip(axes[0], metrics, strict=True):
        ax.plot(epochs, history[metric], "o-", label="train", ms=3)
        if f"val_{metric}" in history:
            ax.plot(epochs, history[f"val_{metric}"], "o-", label="validation", ms=3)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return out


def image_grid(images: np.ndarray, labels: np.ndarray, out: str | Path, title: str, columns: int = 4) -> Path:
    """A grid of images (uint8 or [0, 1] floats) titled NORMAL / PNEUMONIA, like the notebook's.

    Args:
        images: (N, H, W) grey or (N, H, W, 3) RGB images, uint8 in 0–255 or floats in [0, 1].
        labels: N labels (0 normal, 1 pneumonia), one title each.
        out: the PNG to write (90 dpi); its folder is created.
        title: the figure's title.
        columns: images per row.

    Returns:
        ``out`` as a Path.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = (len(images) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, label in zip(axes.flat, images, labels, strict=False):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255 if image.dtype.kind == "u" else 1)
        ax.set_title(CLASS_NAMES[int(label)], fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=90, metadata={"Software": None})
    plt.close(fig)
    return out


def architecture(layers: list[tuple[str, str, str, int]], out: str | Path, title: str) -> Path:
    """A layer-by-layer diagram: (name, type, output shape, params) boxes top to bottom.

    Drawn with matplotlib so it needs no Graphviz binary (keras.utils.plot_model does).

    Args:
        layers: one ``(name, layer type, output shape, parameter count)`` per layer, input first.
        out: the PNG to write (90 dpi); its folder is created.
        title: the figure's title.

    Returns:
        ``out`` as a Path.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    height = 0.42 * len(layers) + 0.8
    fig, ax = plt.subplots(figsize=(6.4, height))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, len(layers))
    ax.axis("off")
    for i, (name, kind, shape, params) in enumerate(layers):
        y = len(layers) - i - 0.8
        ax.add_patch(plt.Rectangle((0.05, y), 0.9, 0.6, fill=True, fc="#eef2f8", ec="#4c72b0"))
        ax.text(0.08, y + 0.3, f"{name}  ({kind})", va="center", fontsize=8)
        ax.text(0.92, y + 0.3, f"{shape}   {params:,}", va="center", ha="right", fontsize=8, color="#333")
        if i:
            ax.annotate("", (0.5, y + 0.6), (0.5, y + 1.0), arrowprops={"arrowstyle": "->", "lw": 0.8})
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=90, metadata={"Software": None})
    plt.close(fig)
    return out


def _save(fig: Figure, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=90, metadata={"Software": None})
    plt.close(fig)
    return out


def confusion(matrix: Mapping[str, int], out: str | Path, title: str) -> Path:
    """2×2 confusion matrix (rows: truth, columns: prediction) with counts.

    Args:
        matrix: the counts ``tn``, ``fp``, ``fn``, ``tp`` (pneumonia is the positive class).
        out: the PNG to write (90 dpi); its folder is created.
        title: the figure's title.

    Returns:
        ``out`` as a Path.
    """
    grid = [[matrix["tn"], matrix["fp"]], [matrix["fn"], matrix["tp"]]]
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    ax.imshow(grid, cmap="Blues")
    for i in range(2):
        for j in range(2):
            ax.text(
                j,
                i,
                str(grid[i][j]),
                ha="center",
                va="center",
                fontsize=12,
                color="white" if grid[i][j] > max(map(max, grid)) / 2 else "black",
            )
    ax.set_xticks([0, 1], CLASS_NAMES)
    ax.set_yticks([0, 1], CLASS_NAMES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    return _save(fig, Path(out))


def curve(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    out: str | Path,
    title: str,
    xlabel: str,
    ylabel: str,
    diagonal: bool = False,
    label: str | None = None,
) -> Path:
    """A single ROC / precision-recall / reliability curve.

    Both axes span [0, 1]; fewer than 20 points are drawn with markers.

    Args:
        x, y: the curve's points.
        out: the PNG to write (90 dpi); its folder is created.
        title: the figure's title.
        xlabel, ylabel: the axis labels.
        diagonal: also draw the dashed y = x line (chance for ROC, perfect calibration for a
            reliability curve).
        label: the legend entry (e.g. ``AUC 0.973``); None draws no legend.

    Returns:
        ``out`` as a Path.
    """
    fig, ax = plt.subplots(figsize=(3.8, 3.4))
    ax.plot(x, y, "-o" if len(x) < 20 else "-", ms=3, label=label)
    if diagonal:
        ax.plot([0, 1], [0, 1], "--", color="grey", lw=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if label:
        ax.legend(loc="lower right", fontsize=8)
    return _save(fig, Path(out))
