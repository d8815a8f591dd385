"""Batch-segmentation throughput: end to end on Ray and per stage, plain / +TTA / +CRF.

Model: DeepLabv3+ MobileNetV2 (width 1.0, output stride 16, 21 classes, random weights - cost does
not depend on them), the mid-size model of the zoo that a CPU node can still run with six-scale
TTA. Images: --images synthetic scenes at VOC size (500 x 375), JPEG files in a temp directory.

Rows, all measured in one run:

- model stage alone: ``predict_probs`` in this process, plain (scale 1, no flip) and TTA (six
  scales + flip), images/s; ``--device cuda --bf16`` runs this part on a GPU with bf16 autocast
  (the only part that needs neither Ray nor pydensecrf; with ``--stages model`` nothing else is
  imported);
- CRF stage alone: a direct ``dense_crf`` loop in this process (DeepLab v2 defaults, 10
  iterations), and the job's CRF stage on Ray over the same probabilities with 1 and 2 processes;
  ratio = Ray images/s / direct-loop images/s;
- end to end: ``run_segmentation`` (list -> decode -> model actor -> CRF tasks -> write PNGs +
  results) for plain, plain + CRF (1 and 2 CRF processes) and TTA, on a fresh output each;
  per-stage columns are images / summed per-image stage seconds (one worker's rate).

    python bench/segment_throughput.py                                    # prints the table
    python bench/segment_throughput.py --output docs/benchmarks.md        # also writes the section
    python bench/segment_throughput.py --device cuda --bf16 --stages model   # + TTA + torch CRF row
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import replace_section  # noqa: E402
from deeplab_core.constants import CRFParams  # noqa: E402
from deeplab_core.models import build_model  # noqa: E402
from deeplab_core.synthetic import SyntheticSpec, render_scene  # noqa: E402
from deeplab_core.transforms import normalize  # noqa: E402
from deeplab_core.tta import DEFAULT_SCALES, predict_probs  # noqa: E402

SECTION = "Batch segmentation"
HEIGHT, WIDTH, NUM_CLASSES = 375, 500, 21
MODEL = dict(arch="deeplabv3plus", backbone="mobilenetv2", num_classes=NUM_CLASSES, output_stride=16)
MODEL_NAME = "DeepLabv3+ MobileNetV2 (x1.0, OS 16, 21 classes)"
RAY_CPUS = max(6, os.cpu_count() or 1)


def make_images(count: int) -> list[np.ndarray]:
    spec = SyntheticSpec(height=HEIGHT, width=WIDTH)
    return [render_scene(spec, seed)[0] for seed in range(count)]


# --------------------------------------------------------------------------- model stage


def time_model_stage(model, images, device: str, bf16: bool, scales, flip: bool,
                     torch_crf: bool = False, crf_iterations: int = 10) -> tuple[float, list]:
    """images/s of predict_probs one image at a time (as the actor does for mixed sizes); with
    `torch_crf`, followed by the torch dense CRF on the same device (the job's in-actor CRF)."""
    from deeplab_core.crf_torch import dense_crf_torch

    def run(x, image):
        p = predict_probs(model, x.to(device), scales=scales, flip=flip, autocast=bf16)
        if torch_crf:
            p = dense_crf_torch(torch.from_numpy(image)[None], p.float(), params=CRFParams(iterations=crf_iterations))
        return p

    model = model.to(device).eval()
    batch = [normalize(img).unsqueeze(0) for img in images]
    run(batch[0], images[0])  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    probs, start = [], time.perf_counter()
    for x, image in zip(batch, images):
        p = run(x, image)
        probs.append(p[0].to(torch.float16).cpu().numpy())
    if device == "cuda":
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - start), probs


# --------------------------------------------------------------------------- CRF stage


def time_direct_crf(images, probs, iterations: int) -> float:
    from deeplab_core.crf import dense_crf

    start = time.perf_counter()
    for image, p in zip(images, probs):
        dense_crf(image, p, params=CRFParams(iterations=iterations))
    return len(images) / (time.perf_counter() - start)


def time_ray_crf(images, probs, iterations: int, workers: int) -> float:
    """The job's CRF stage alone on Ray Data over the same inputs (materialised first)."""
    import ray.data

    from deeplab_core.constants import CRFParams, TTASettings
    from pipelines.segmentation.stages import InferencePlan, crf_stage

    plan = InferencePlan(num_classes=NUM_CLASSES, mean=(0, 0, 0), std=(1, 1, 1), tta=TTASettings((1.0,), False),
                         max_pixels=None, crf=True, crf_params=CRFParams(iterations=iterations), crf_backend="pydensecrf",
                         table=False, score=False, overlays=False, max_input_pixels=10**8, storage_options=None)
    rows = [{"id": str(i), "uri": "", "status": "ok", "error_stage": "", "error_reason": "", "seconds_decode": 0.0,
             "seconds_model": 0.0, "image": img, "label": np.zeros(img.shape[:2], np.uint8), "probs": p}
            for i, (img, p) in enumerate(zip(images, probs))]
    source = ray.data.from_items(rows, override_num_blocks=len(rows)).materialize()
    start = time.perf_counter()
    out = source.map_batches(crf_stage, fn_kwargs={"plan": plan}, batch_size=1, batch_format="numpy",
                             num_cpus=1, compute=ray.data.TaskPoolStrategy(size=workers))
    done = out.select_columns(["id", "seconds_crf"]).take_all()
    assert len(done) == len(rows)
    return len(rows) / (time.perf_counter() - start)


# --------------------------------------------------------------------------- end to end


def start_ray() -> None:
    """The cluster in RAY_ADDRESS, else a local one with RAY_CPUS logical CPUs (the model actor,
    decode, CRF and write stages each reserve some; on a 2-core box they share the cores)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level="WARNING")
    else:
        ray.init(num_cpus=RAY_CPUS, include_dashboard=False, logging_level="WARNING")


def run_job(checkpoint: str, input_dir: str, output_dir: str, **options) -> dict:
    import contextlib
    import io

    from deeplab_core.constants import CRFParams
    from pipelines.segmentation.config import SegmentConfig
    from pipelines.segmentation.job import run_segmentation

    iterations = options.pop("crf_iterations")
    cfg = SegmentConfig(model=checkpoint, input=input_dir, output=output_dir,
                        crf_params=CRFParams(iterations=iterations), batch_size=2, **options)
    with contextlib.redirect_stdout(io.StringIO()):
        report = run_segmentation(cfg)
    if report.ok != report.read:
        raise RuntimeError(f"benchmark run had errors: {report.errors_by_stage}")
    n = report.ok
    per_stage = {k: (n / v if v > 0 else None) for k, v in report.stage_seconds.items()}
    return {"images_per_s": n / report.seconds, "seconds": report.seconds, **per_stage}


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="model stage device")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the model stage")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in this process")
    parser.add_argument("--crf-iterations", type=int, default=10)
    parser.add_argument("--torch-crf", action=argparse.BooleanOptionalAction, default=None,
                        help="add the TTA + in-actor torch CRF row (default: on with --device cuda)")
    parser.add_argument("--stages", default="model,crf,pipeline",
                        help="comma-separated subset of model,crf,pipeline")
    parser.add_argument("--output", help="Markdown file whose '## Batch segmentation' section is replaced")
    args = parser.parse_args(argv)
    stages = set(args.stages.split(","))
    if args.device == "cuda" and "pipeline" in stages:
        parser.error("--device cuda measures the model stage only; use --stages model[,crf]")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()[0]

    images = make_images(args.images)
    model = build_model(**MODEL)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    command = " ".join(["python bench/segment_throughput.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [
        f"`{command}`",
        "",
        f"{args.images} synthetic {WIDTH}x{HEIGHT} images, {MODEL_NAME}, {params:.1f} M parameters, "
        f"random weights. Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
        f"visible, torch {torch.__version__}, {args.threads} torch threads in the benchmark process; "
        f"model device {args.device}{' (bf16 autocast)' if args.bf16 else ''}. Ray: "
        f"{'RAY_ADDRESS' if os.environ.get('RAY_ADDRESS') else f'local, {RAY_CPUS} logical CPUs'}; "
        "the job's model actor gets --threads CPUs/torch threads, batch size 2.",
        "",
        "| measurement | images/s | decode img/s | model img/s | CRF img/s | notes |",
        "|---|---|---|---|---|---|",
    ]
    probs_plain = None
    if stages & {"model", "crf"}:
        plain_rate, probs_plain = time_model_stage(model, images, args.device, args.bf16, (1.0,), False)
        lines.append(f"| model stage, plain (1 scale) | {plain_rate:.2f} | | {plain_rate:.2f} | | "
                     "predict_probs in-process, batch 1 |")
    if "model" in stages:
        tta_rate, _ = time_model_stage(model, images, args.device, args.bf16, DEFAULT_SCALES, True)
        lines.append(f"| model stage, TTA (6 scales + flip) | {tta_rate:.2f} | | {tta_rate:.2f} | | "
                     f"{plain_rate / tta_rate:.1f}x the plain cost |")
        if args.torch_crf if args.torch_crf is not None else args.device == "cuda":
            both, _ = time_model_stage(model, images, args.device, args.bf16, DEFAULT_SCALES, True,
                                       torch_crf=True, crf_iterations=args.crf_iterations)
            lines.append(f"| model stage, TTA + torch CRF on {args.device} (in-actor) | {both:.2f} | | | | "
                         f"{both / tta_rate:.2f}x the TTA-only rate (goal on GPU: >= 0.9x) |")
    if "crf" in stages:

        start_ray()
        direct = time_direct_crf(images, probs_plain, args.crf_iterations)
        lines.append(f"| CRF direct pydensecrf loop | {direct:.2f} | | | {direct:.2f} | one process, "
                     f"{args.crf_iterations} iterations |")
        for workers in (1, 2):
            rate = time_ray_crf(images, probs_plain, args.crf_iterations, workers)
            lines.append(f"| CRF stage on Ray, {workers} process{'es' if workers > 1 else ''} | {rate:.2f} | | | "
                         f"{rate:.2f} | {rate / direct:.2f}x the direct loop |")
    if "pipeline" in stages:
        from PIL import Image

        from pipelines.data.checkpoints import save_checkpoint_dir

        start_ray()

        with tempfile.TemporaryDirectory() as tmp:
            input_dir = Path(tmp, "in")
            input_dir.mkdir()
            for i, image in enumerate(images):
                Image.fromarray(image).save(input_dir / f"img_{i:03d}.jpg", quality=90)
            checkpoint = str(save_checkpoint_dir(model, Path(tmp, "ckpt")))
            variants = [
                ("end to end, plain", dict(scales=(1.0,), flip=False, crf=False, crf_workers=1)),
                ("end to end, plain + CRF, 1 CRF process", dict(scales=(1.0,), flip=False, crf=True, crf_workers=1)),
                ("end to end, plain + CRF, 2 CRF processes", dict(scales=(1.0,), flip=False, crf=True, crf_workers=2)),
                ("end to end, TTA (6 scales + flip)", dict(scales=DEFAULT_SCALES, flip=True, crf=False, crf_workers=1)),
            ]
            for name, options in variants:
                result = run_job(checkpoint, str(input_dir), str(Path(tmp, f"out-{len(name)}-{time.time_ns()}")),
                                 crf_iterations=args.crf_iterations, cpus_per_model_actor=args.threads, **options)
                lines.append(f"| {name} | {result['images_per_s']:.2f} | {_fmt(result['decode'])} | "
                             f"{_fmt(result['model'])} | {_fmt(result['crf']) if options['crf'] else '-'} | "
                             f"{result['seconds']:.1f} s incl. actor start-up |")
    load_after = os.getloadavg()[0]
    lines += [
        "",
        f"Load average (1 min) {load_before:.1f} before, {load_after:.1f} after: the machine is shared, so "
        "absolute rates are pessimistic; the ratios within one run are the comparable part.",
    ]
    table = "\n".join(lines)
    print(table)
    if args.output:
        replace_section(args.output, SECTION, table)
        print(f"\nwrote section '## {SECTION}' of {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
