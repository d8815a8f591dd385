"""CPU fast paths of the segmentation model stage, chosen by measurement: fp32 vs channels_last vs
bf16 autocast (+ channels_last) vs ONNX Runtime (fp32, `--runtime onnx`), on a trained model, in
this process (no Ray).

Rows: mIoU of plain (scale 1), MS+flip (--scales + flip) and + dense CRF (pydensecrf, DeepLab
defaults) on the --manifest images, the share of pixels whose label equals fp32's, and the model
stage's speed on --speed-images synthetic 375 x 500 scenes (plain forward, interleaved repeats,
median), ratio against fp32 measured in the same run. `make demo` trains the model and writes
the manifest (data/synthetic/manifests/val.parquet); its checkpoint is under ray_results/.
`--big` adds a speed-only table of a larger random-weight model at 513 x 513 (e.g.
`deeplabv3plus/resnet101`), labels compared with fp32's on one random scene.

    python bench/segment_precision.py --model ray_results/deeplab-demo/checkpoint_<time> \\
        --manifest data/synthetic/manifests/val.parquet [--big deeplabv3plus/resnet101]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deeplab_core import build_model  # noqa: E402
from deeplab_core.constants import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
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

# name -> (runtime, channels_last, bf16 autocast)
VARIANTS = {"fp32": ("torch", False, False), "fp32 channels_last": ("torch", True, False),
            "bf16 autocast + channels_last": ("torch", True, True), "ONNX Runtime (fp32)": ("onnx", False, False)}


def _nets(model, threads: int) -> dict[str, tuple]:
    """Each variant's (module, channels_last, bf16); the ONNX graph exported and checked once."""
    from deeplab_core.onnx_model import OnnxModel, check_export, export_onnx

    start = time.perf_counter()
    graph = export_onnx(model.to(memory_format=torch.contiguous_format))
    check = check_export(graph, model)
    print(f"ONNX export + check {time.perf_counter() - start:.1f} s, {len(graph.data) / 1e6:.1f} MB; at "
          f"{check.shapes}: max |logits diff| {check.max_abs_diff:.2g}, labels {100 * check.labels_equal:.2f} %")
    onnx = OnnxModel(graph, threads)
    nets = {}
    for name, (runtime, channels_last, bf16) in VARIANTS.items():
        # one module per format: the bench interleaves them (to() converts a module in place)
        net = onnx if runtime == "onnx" else copy.deepcopy(model).to(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        nets[name] = (net, channels_last, bf16)
    return nets


def _timed(nets: dict[str, tuple], images, mean, std, repeats: int) -> dict[str, list[float]]:
    """Seconds per image of a plain forward, per variant, `repeats` interleaved rounds."""
    times: dict[str, list[float]] = {name: [] for name in nets}
    for _ in range(repeats):  # interleaved: load drifts hit every variant alike
        for name, (net, channels_last, bf16) in nets.items():
            start = time.perf_counter()
            _probs(net, images, mean, std, (1.0,), False, channels_last, bf16)
            times[name].append((time.perf_counter() - start) / len(images))
    return times


def _big_model_speed(spec: str, size: int, repeats: int, threads: int) -> None:
    """Speed of every variant on a random-weight model at size x size, labels vs fp32's."""
    arch, backbone = spec.split("/")
    torch.manual_seed(0)
    model = build_model(arch, backbone, num_classes=21).eval()
    nets = _nets(model, threads)
    image = render_scene(SyntheticSpec(height=size, width=size), 10**7)[0]
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    labels = {name: _probs(net, [image], mean, std, (1.0,), False, cl, bf16)[0].argmax(0)
              for name, (net, cl, bf16) in nets.items()}
    times = _timed(nets, [image], mean, std, repeats)
    base = statistics.median(times["fp32"])
    print(f"\n{spec} random weights, 21 classes, one {size}x{size} scene, plain, {threads} thread(s), median of {repeats}")
    print("| variant | labels = fp32 | s/image | speed vs fp32 |")
    print("|---|---:|---:|---:|")
    for name in nets:
        median = statistics.median(times[name])
        equal = 100 * np.mean(labels[name] == labels["fp32"])
        print(f"| {name} | {equal:.2f} % | {median:.3f} | {base / median:.2f}x |")


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
    p.add_argument("--big", default=None, help="arch/backbone of a random-weight speed-only table, e.g. "
                                               "deeplabv3plus/resnet101")
    p.add_argument("--big-size", type=int, default=513)
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
    nets = _nets(model, a.threads)
    for name, (net, channels_last, bf16) in nets.items():
        plain = [pr.argmax(0) for pr in _probs(net, images, mean, std, (1.0,), False, channels_last, bf16)]
        msf = _probs(net, images, mean, std, scales, True, channels_last, bf16)
        crf = [dense_crf(img, pr).argmax(0) for img, pr in zip(images, msf)]
        msf_labels = [pr.argmax(0) for pr in msf]
        if reference is None:
            reference = msf_labels
        equal = np.mean([np.mean(x == y) for x, y in zip(msf_labels, reference)])
        results[name] = {"plain": _miou(plain, masks, num_classes), "msf": _miou(msf_labels, masks, num_classes),
                         "crf": _miou(crf, masks, num_classes), "equal": 100 * equal, "times": []}
    for name, times in _timed(nets, speed_images, mean, std, a.repeats).items():
        results[name]["times"] = times
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
    if a.big:
        _big_model_speed(a.big, a.big_size, a.repeats, a.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
