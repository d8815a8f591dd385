"""CPU fast paths of the segmentation model stage, chosen by measurement: fp32 vs channels_last vs
bf16 autocast (+ channels_last), on a trained model, in this process (no Ray).

Rows: mIoU of plain (scale 1), MS+flip (--scales + flip) and + dense CRF (pydensecrf, DeepLab
defaults) on the --manifest images, the share of pixels whose label equals fp32's, and the model
stage's speed on --speed-images synthetic 375 x 500 scenes (plain forward, interleaved repeats,
median), ratio against fp32 measured in the same run. `make demo` trains the model and writes
the manifest (data/synthetic/manifests/val.parquet); its checkpoint is under ray_results/.

    python bench/segment_precision.py --model ray_results/deeplab-demo/checkpoint_<time> \\
        --manifest data/synthetic/manifests/val.parquet
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deeplab_core.crf import dense_crf  # noqa: E402
from deeplab_core.metrics import confusion_matrix, segmentation_metrics  # noqa: E402
from deeplab_core.synthetic import SyntheticSpec, render_scene  # noqa: E402
from deeplab_core.transforms import normalize  # noqa: E402
from deeplab_core.tta import predict_probs  # noqa: E402
from pipelines.tracking import load_model  # noqa: E402
from pipelines.data.manifest import read_manifest  # noqa: E402
from pipelines.data.rows import RowDecoder  # noqa: E402
from pipelines.segmentation.precision import cpu_has_native_bf16  # noqa: E402
from pipelines.data.checkpoints import normalisation_of, num_classes_of  # noqa: E402

VARIANTS = {"fp32": (False, False), "fp32 channels_last": (True, False), "bf16 autocast + channels_last": (True, True)}


def _probs(model, images, mean, std, scales, flip: bool, channels_last: bool, bf16: bool) -> list[np.ndarray]:
    out = []
    for image in images:
        x = normalize(image, mean, std)[None]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(predict_probs(model, x, scales=scales, flip=flip, autocast=bf16)[0].float().numpy())
    return out


def _miou(labels: list[np.ndarray], masks: list[np.ndarray], num_classes: int) -> float:
    cm = sum(confusion_matrix(torch.from_numpy(p.astype(np.int64)), torch.from_numpy(m.astype(np.int64)), num_classes)
             for p, m in zip(labels, masks))
    return 100 * segmentation_metrics(cm)["mIoU"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="trained checkpoint dir (make demo's)")
    p.add_argument("--manifest", required=True, help="images with masks (id, image_uri, mask_uri)")
    p.add_argument("--scales", default="0.75,1,1.25")
    p.add_argument("--speed-images", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, meta = load_model(str(Path(a.model).resolve()))
    model.eval()
    num_classes = num_classes_of(model)
    mean, std = normalisation_of(meta, model)
    rows = read_manifest(a.manifest).to_pylist()
    decoded = RowDecoder(None, num_classes, 4096 * 4096, require_masks=True).decode_rows(
        [r["id"] for r in rows], [r["image_uri"] for r in rows], [r["mask_uri"] for r in rows])
    images, masks = [d.image for d in decoded], [d.mask for d in decoded]
    scales = tuple(float(s) for s in a.scales.split(","))
    spec = SyntheticSpec(height=375, width=500)
    speed_images = [render_scene(spec, 10**7 + i)[0] for i in range(a.speed_images)]

    results, reference = {}, None
    for name, (channels_last, bf16) in VARIANTS.items():
        net = model.to(memory_format=torch.channels_last) if channels_last else model.to(
            memory_format=torch.contiguous_format)
        plain = [pr.argmax(0) for pr in _probs(net, images, mean, std, (1.0,), False, channels_last, bf16)]
        msf = _probs(net, images, mean, std, scales, True, channels_last, bf16)
        crf = [dense_crf(img, pr).argmax(0) for img, pr in zip(images, msf)]
        msf_labels = [pr.argmax(0) for pr in msf]
        if reference is None:
            reference = msf_labels
        equal = np.mean([np.mean(x == y) for x, y in zip(msf_labels, reference)])
        results[name] = {"plain": _miou(plain, masks, num_classes), "msf": _miou(msf_labels, masks, num_classes),
                         "crf": _miou(crf, masks, num_classes), "equal": 100 * equal, "times": []}
    for _ in range(a.repeats):  # interleaved: load drifts hit every variant alike
        for name, (channels_last, bf16) in VARIANTS.items():
            net = model.to(memory_format=torch.channels_last) if channels_last else model.to(
                memory_format=torch.contiguous_format)
            start = time.perf_counter()
            _probs(net, speed_images, mean, std, (1.0,), False, channels_last, bf16)
            results[name]["times"].append((time.perf_counter() - start) / len(speed_images))
    base = statistics.median(results["fp32"]["times"])
    print(f"model {a.model} ({num_classes} classes); {len(images)} images of {a.manifest}; MS+flip scales "
          f"{a.scales}; speed: {a.speed_images} scenes 375x500, plain, {a.threads} thread(s), median of "
          f"{a.repeats}; CPU native bf16: {cpu_has_native_bf16()}")
    print("| variant | plain mIoU | MS+flip mIoU | +CRF mIoU | labels = fp32 (MS+flip) | s/image 375x500 "
          "| speed vs fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        median = statistics.median(r["times"])
        print(f"| {name} | {r['plain']:.2f} | {r['msf']:.2f} | {r['crf']:.2f} | {r['equal']:.2f} % | "
              f"{median:.3f} | {base / median:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
