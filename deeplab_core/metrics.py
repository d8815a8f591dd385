"""Segmentation metrics from a confusion matrix (rows = ground truth, columns = prediction).

A confusion matrix is additive, so workers each accumulate one and an all-reduce (sum) gives the
exact dataset-level metrics; averaging per-batch mIoU would not.
"""

from __future__ import annotations

import numpy as np
import torch

from deeplab_core.constants import IGNORE_INDEX


def confusion_matrix(pred, target, num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """int64 `num_classes x num_classes` counts; pixels whose target is `ignore_index` are skipped.

    Target values outside [0, num_classes) other than `ignore_index` raise, since they mean the
    dataset and the model disagree on the class count.
    """
    pred_t = torch.as_tensor(pred).reshape(-1).to(torch.int64)
    target_t = torch.as_tensor(target).reshape(-1).to(torch.int64)
    if pred_t.shape != target_t.shape:
        raise ValueError(f"pred has {pred_t.numel()} pixels but target has {target_t.numel()}")
    keep = target_t != ignore_index
    pred_t, target_t = pred_t[keep], target_t[keep]
    if target_t.numel() and (target_t.min() < 0 or target_t.max() >= num_classes):
        raise ValueError(f"target values must be in [0, {num_classes}) or {ignore_index}")
    if pred_t.numel() and (pred_t.min() < 0 or pred_t.max() >= num_classes):
        raise ValueError(f"prediction values must be in [0, {num_classes})")
    counts = torch.bincount(target_t * num_classes + pred_t, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu().numpy()


def segmentation_metrics(cm: np.ndarray) -> dict:
    """mIoU, pixel accuracy, mean class accuracy, frequency-weighted IoU and per-class IoU.

    Classes absent from both ground truth and prediction have an undefined IoU (NaN) and are left
    out of the means, as in the VOC and Cityscapes evaluation code.
    """
    cm = np.asarray(cm, dtype=np.float64)
    true_pos = np.diag(cm)
    gt_count = cm.sum(axis=1)
    pred_count = cm.sum(axis=0)
    union = gt_count + pred_count - true_pos
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, true_pos / union, np.nan)
        class_acc = np.where(gt_count > 0, true_pos / gt_count, np.nan)
    total = cm.sum()
    freq = gt_count / total if total > 0 else np.zeros_like(gt_count)
    present = ~np.isnan(iou)
    return {
        "mIoU": float(np.nanmean(iou)) if present.any() else 0.0,
        "pixel_acc": float(true_pos.sum() / total) if total > 0 else 0.0,
        "mean_acc": float(np.nanmean(class_acc)) if (~np.isnan(class_acc)).any() else 0.0,
        "fw_iou": float((freq[present] * iou[present]).sum()),
        "per_class_iou": [None if np.isnan(v) else float(v) for v in iou],
    }
