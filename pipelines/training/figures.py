"""Pictures for MLflow: a confusion-matrix plot and a grid of validation overlays."""

from __future__ import annotations

from pathlib import Path

import numpy as np


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


def overlay_grid(examples: list[tuple[np.ndarray, np.ndarray, np.ndarray]], path: Path,
                 class_names: list[str] | None = None) -> Path:
    """One row per example: image | prediction overlay | ground-truth overlay, under column
    headers, with a legend of the classes' colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from deeplab_core.palette import overlay, voc_palette

    columns = ("image", "prediction", "ground truth")
    fig, axes = plt.subplots(len(examples), 3, figsize=(9, 2.6 * len(examples) + 0.8), squeeze=False)
    present: set[int] = set()
    for row, (image, pred, gt) in zip(axes, examples):
        present |= set(np.unique(pred).tolist()) | set(np.unique(gt).tolist())
        for ax, picture in zip(row, (image, overlay(image, pred), overlay(image, gt))):
            ax.imshow(picture)
            ax.set_axis_off()
    for ax, title in zip(axes[0], columns):
        ax.set_title(title)
    palette = np.asarray(voc_palette(), dtype=np.float64).reshape(-1, 3) / 255
    labels = sorted(c for c in present if c != 255)
    names = class_names or [str(c) for c in range(max(labels, default=0) + 1)]
    handles = [Patch(color=palette[c], label=names[c] if c < len(names) else str(c)) for c in labels]
    handles.append(Patch(color=palette[255], label="ignore (255)"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
