"""Pictures for MLflow: a confusion-matrix plot and a grid of validation overlays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def confusion_matrix_figure(cm: np.ndarray, path: Path, class_names: list[str] | None = None) -> Path:
    """Row-normalised confusion matrix (rows = ground truth) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm, dtype=np.float64)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    names = class_names or [str(i) for i in range(len(cm))]
    size = 2 + 0.45 * len(cm)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    ax.set(xticks=range(len(cm)), yticks=range(len(cm)), xticklabels=names, yticklabels=names,
           xlabel="predicted", ylabel="ground truth", title="confusion matrix (row-normalised)")
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    for i in range(len(cm)):
        for j in range(len(cm)):
            ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def overlay_grid(examples: list[tuple[np.ndarray, np.ndarray, np.ndarray]], path: Path) -> Path:
    """One row per example: image | prediction overlay | ground-truth overlay."""
    from deeplab_core.palette import overlay

    rows = [np.concatenate([image, overlay(image, pred), overlay(image, gt)], axis=1)
            for image, pred, gt in examples]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path, quality=90)
    return path
