import math

import numpy as np
import pytest
import torch

from deeplab_core.losses import SegmentationLoss, bootstrapped_cross_entropy
from deeplab_core.lr_schedule import PolyLRScheduler, poly_lr
from deeplab_core.metrics import confusion_matrix, segmentation_metrics


def reference_metrics(pred, target, num_classes, ignore=255):
    """Independent per-class loop, written from the metric definitions."""
    pred, target = pred.ravel(), target.ravel()
    keep = target != ignore
    pred, target = pred[keep], target[keep]
    ious, accs, fw = [], [], 0.0
    for c in range(num_classes):
        tp = np.sum((pred == c) & (target == c))
        fp = np.sum((pred == c) & (target != c))
        fn = np.sum((pred != c) & (target == c))
        if tp + fp + fn:
            ious.append(tp / (tp + fp + fn))
            fw += (tp + fn) / target.size * ious[-1]
        if tp + fn:
            accs.append(tp / (tp + fn))
    return {"mIoU": np.mean(ious), "pixel_acc": np.mean(pred == target), "mean_acc": np.mean(accs), "fw_iou": fw}


def test_metrics_match_independent_computation():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 5, size=(4, 33, 47))
    target[rng.random(target.shape) < 0.1] = 255
    pred = np.where(rng.random(target.shape) < 0.7, np.where(target == 255, 0, target), rng.integers(0, 5, target.shape))
    cm = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), 5)
    assert cm.sum() == np.sum(target != 255)
    ours = segmentation_metrics(cm)
    ref = reference_metrics(pred, target, 5)
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key
    assert len(ours["per_class_iou"]) == 5


def test_confusion_matrix_is_additive_and_checks_ranges():
    a_pred, a_gt = np.array([0, 1, 2, 2]), np.array([0, 1, 1, 255])
    b_pred, b_gt = np.array([1, 1]), np.array([1, 0])
    total = confusion_matrix(np.concatenate([a_pred, b_pred]), np.concatenate([a_gt, b_gt]), 3)
    np.testing.assert_array_equal(total, confusion_matrix(a_pred, a_gt, 3) + confusion_matrix(b_pred, b_gt, 3))
    with pytest.raises(ValueError, match="target values"):
        confusion_matrix(np.array([0]), np.array([7]), 3)
    with pytest.raises(ValueError, match="pixels"):
        confusion_matrix(np.array([0, 1]), np.array([0]), 3)


def test_absent_classes_are_left_out_of_the_means():
    cm = np.array([[5, 0, 0], [0, 5, 0], [0, 0, 0]])
    m = segmentation_metrics(cm)
    assert m["mIoU"] == 1.0 and m["per_class_iou"][2] is None


def test_poly_lr_values():
    assert poly_lr(0, 100, 0.007) == pytest.approx(0.007)
    assert poly_lr(50, 100, 0.007) == pytest.approx(0.007 * 0.5 ** 0.9)
    assert poly_lr(100, 100, 0.007) == 0.0
    # warm-up starts at warmup_factor and joins the poly curve when it ends
    assert poly_lr(0, 100, 1.0, warmup_iters=10, warmup_factor=0.1) == pytest.approx(0.1)
    assert poly_lr(10, 100, 1.0, warmup_iters=10) == pytest.approx(0.9 ** 0.9)
    assert poly_lr(5, 100, 1.0, warmup_iters=10, warmup_factor=0.1) == pytest.approx(0.55 * (0.95 ** 0.9))
    with pytest.raises(ValueError):
        poly_lr(101, 100, 1.0)


def test_scheduler_keeps_head_x10_and_resumes():
    w1, w2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [w1], "lr": 0.01}, {"params": [w2], "lr": 0.1}], lr=0.01, momentum=0.9)
    sched = PolyLRScheduler(opt, max_it=20)
    for _ in range(7):
        opt.step()
        sched.step()
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs[0] == pytest.approx(0.01 * (1 - 7 / 20) ** 0.9)
    assert lrs[1] == pytest.approx(10 * lrs[0])
    opt2 = torch.optim.SGD([{"params": [w1], "lr": 0.01}, {"params": [w2], "lr": 0.1}], lr=0.01, momentum=0.9)
    sched2 = PolyLRScheduler(opt2, max_it=20)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.01 * (1 - 8 / 20) ** 0.9)


def test_loss_ignores_255_and_adds_aux():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 5)
    target = torch.randint(0, 3, (2, 5, 5))
    ignored = target.clone()
    ignored[:, 0] = 255
    loss = SegmentationLoss()
    expected = torch.nn.functional.cross_entropy(logits[..., 1:, :], target[:, 1:])
    assert loss(logits, ignored) == pytest.approx(expected.item(), rel=1e-6)
    aux = torch.randn(2, 3, 5, 5)
    combined = loss({"out": logits, "aux": aux}, target)
    assert combined.item() == pytest.approx((loss(logits, target) + 0.4 * loss(aux, target)).item(), rel=1e-6)
    all_ignored = torch.full_like(target, 255)
    assert loss(logits, all_ignored).item() == 0.0 and not math.isnan(loss(logits, all_ignored).item())


def test_bootstrapped_loss_takes_the_hardest_pixels():
    logits = torch.zeros(1, 2, 1, 4)
    logits[0, 0, 0] = torch.tensor([5.0, 4.0, -4.0, -5.0])
    target = torch.zeros(1, 1, 4, dtype=torch.long)
    per_pixel = torch.nn.functional.cross_entropy(logits, target, reduction="none").flatten()
    hardest_half = per_pixel.topk(2).values.mean()
    assert bootstrapped_cross_entropy(logits, target, 0.5) == pytest.approx(hardest_half.item())
    assert SegmentationLoss(bootstrap_ratio=1.0)(logits, target) == pytest.approx(per_pixel.mean().item())
