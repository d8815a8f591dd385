"""Demo calibration: how fast does a candidate demo recipe learn the synthetic scenes?

One process, `--threads` torch threads (the demo's Ray Train workers use one each), scenes
rendered in memory with `deeplab_core.synthetic` (no JPEG round trip, no Ray), the demo's train
transform, AdamW/SGD with the poly schedule. Prints val mIoU on whole images at every
`--eval-every` iterations with the training seconds so far, then plain / MS+flip (each
`--scales` set) / + dense CRF (DeepLab defaults) at the end. Used to choose `make demo`'s defaults
(docs/data.md, "Demo calibration"); the demo's own MLflow numbers are the ones that count.

    python bench/demo_calibration.py --width-mult 0.5 --output-stride 8 --crop 64 --iters 1500
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from deeplab_core import PolyLRScheduler, SegmentationLoss, build_model, param_groups
from deeplab_core.crf import dense_crf
from deeplab_core.metrics import confusion_matrix, segmentation_metrics
from deeplab_core.synthetic import SyntheticSpec, render_scene
from deeplab_core.transforms import EvalTransform, TrainTransform
from deeplab_core.tta import predict_probs


def _scenes(spec: SyntheticSpec, seeds: range) -> list[tuple[np.ndarray, np.ndarray]]:
    return [render_scene(spec, seed) for seed in seeds]


def _miou(probs: list[np.ndarray], masks: list[np.ndarray], num_classes: int) -> float:
    cm = sum(confusion_matrix(torch.from_numpy(p.argmax(0)), torch.from_numpy(m.astype(np.int64)), num_classes)
             for p, m in zip(probs, masks))
    return 100 * segmentation_metrics(cm)["mIoU"]


def _probs(model, val, scales, flip) -> list[np.ndarray]:
    evaluate = EvalTransform()
    out = []
    for image, _ in val:
        x = evaluate(image)[0][None]
        out.append(predict_probs(model, x, scales=scales, flip=flip)[0].numpy())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="deeplabv3plus")
    p.add_argument("--backbone", default="mobilenetv2")
    p.add_argument("--output-stride", type=int, default=16)
    p.add_argument("--width-mult", type=float, default=0.5)
    p.add_argument("--dense", action="store_true", help="dense ASPP/decoder convs (default separable)")
    p.add_argument("--height", type=int, default=96)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--num-train", type=int, default=1000)
    p.add_argument("--num-val", type=int, default=32)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--scale-min", type=float, default=0.5)
    p.add_argument("--scale-max", type=float, default=1.5)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--iters", type=int, default=1200)
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--head-lr-mult", type=float, default=1.0)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--bootstrap", type=float, default=None, help="bootstrapped CE: hardest fraction of pixels")
    p.add_argument("--eval-every", type=int, default=300)
    p.add_argument("--scales", nargs="+", default=["0.75,1", "0.75,1,1.25", "1,1.25,1.5"],
                   help="comma-separated TTA scale sets tried at the end")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    spec = SyntheticSpec(height=a.height, width=a.width)
    train = _scenes(spec, range(a.num_train))
    val = _scenes(spec, range(10**6, 10**6 + a.num_val))
    options = {"width_mult": a.width_mult} if a.backbone == "mobilenetv2" else {}
    if a.arch == "deeplabv3plus":
        options["separable"] = not a.dense
    model = build_model(a.arch, a.backbone, num_classes=spec.num_classes, output_stride=a.output_stride, **options)
    params = sum(p.numel() for p in model.parameters())
    backbone, head = param_groups(model)
    groups = [{"params": backbone, "lr": a.lr}, {"params": head, "lr": a.lr * a.head_lr_mult}]
    optimizer = (torch.optim.AdamW(groups, lr=a.lr, weight_decay=a.weight_decay) if a.optimizer == "adamw"
                 else torch.optim.SGD(groups, lr=a.lr, momentum=0.9, weight_decay=a.weight_decay))
    scheduler = PolyLRScheduler(optimizer, a.iters, warmup_iters=a.warmup)
    loss_fn = SegmentationLoss(bootstrap_ratio=a.bootstrap)
    transform = TrainTransform(crop_size=a.crop, scale_range=(a.scale_min, a.scale_max))
    rng = np.random.default_rng(a.seed)
    masks = [m for _, m in val]
    print(f"# {a.arch}/{a.backbone} x{a.width_mult} OS{a.output_stride} {'dense' if a.dense else 'separable'} "
          f"{params / 1e6:.2f} M params; scenes {a.height}x{a.width}, crop {a.crop}, batch {a.batch}, "
          f"{a.optimizer} {a.lr:g}, {a.iters} it, bootstrap {a.bootstrap}", flush=True)
    trained = 0.0
    for it in range(1, a.iters + 1):
        start = time.perf_counter()
        picks = rng.integers(0, len(train), a.batch)
        pairs = [transform(*train[i], rng=rng) for i in picks]
        x = torch.stack([img for img, _ in pairs])
        y = torch.stack([msk for _, msk in pairs])
        model.train()
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        trained += time.perf_counter() - start
        if it % a.eval_every == 0 or it == a.iters:
            plain = _miou(_probs(model, val, [1.0], False), masks, spec.num_classes)
            print(f"it {it:5d}  train {trained:6.0f} s  loss {loss.item():.3f}  val plain {plain:5.1f}", flush=True)
    plain_probs = _probs(model, val, [1.0], False)
    row = [f"plain {_miou(plain_probs, masks, spec.num_classes):.1f}"]
    for scale_set in a.scales:
        scales = [float(s) for s in scale_set.split(",")]
        probs = _probs(model, val, scales, True)
        crf = [dense_crf(image, pr) for (image, _), pr in zip(val, probs)]
        row.append(f"msf[{scale_set}] {_miou(probs, masks, spec.num_classes):.1f} "
                   f"+crf {_miou(crf, masks, spec.num_classes):.1f}")
    print("final: " + " | ".join(row), f"| train {trained:.0f} s", flush=True)


if __name__ == "__main__":
    main()
