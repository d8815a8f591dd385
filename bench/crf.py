"""Dense CRF backends: seconds per image for pydensecrf and the torch backend, in the same run.

Rows are image sizes (default: VOC 500x375 with 21 classes and Cityscapes 2048x1024 with 19),
DeepLab v2's CRF parameters (deeplab_core.constants.CRFParams, 10 iterations). The image is a
synthetic scene (deeplab_core.synthetic.render_scene); the probabilities are its labels,
blurred and noised, over all the classes. Each repeat runs every backend on every size in turn,
so on a shared machine all of them see the same stretches of load; times are medians.

- pydensecrf: `dense_crf(..., backend="pydensecrf")` on numpy arrays, one thread (C++, GIL held).
- torch on a device: `dense_crf_torch` on a batch of --batch images already on that device (as
  in the model actor), torch threads = --threads; CUDA timings synchronise and follow a warm-up,
  and report the peak memory (torch.cuda.max_memory_allocated).
- Ratios divide CPU seconds (this process, all threads) for CPU rows, wall seconds for CUDA.
- Agreement: share of equal argmax labels and max |probability difference| vs pydensecrf.

    python bench/crf.py --threads 1 --repeats 3                              # prints the table
    python bench/crf.py --threads 1 --repeats 3 --output docs/benchmarks.md  # also writes the section
    python bench/crf.py --device cuda --batch 4 --output docs/benchmarks.md  # torch on the GPU
    python bench/crf.py --quick                                              # small sizes, seconds
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import replace_section  # noqa: E402
from deeplab_core.constants import CRFParams  # noqa: E402
from deeplab_core.crf import dense_crf  # noqa: E402
from deeplab_core.crf_torch import dense_crf_torch  # noqa: E402
from deeplab_core.synthetic import SyntheticSpec, render_scene  # noqa: E402

SECTION = "Dense CRF backends"
DEFAULT_SIZES = "500x375x21,2048x1024x19"
QUICK_SIZES = "160x120x21,320x160x19"
GPU_COMMAND = "python bench/crf.py --device cpu,cuda --threads 1 --repeats 3 --output docs/benchmarks.md"


@dataclass(frozen=True)
class Size:
    width: int
    height: int
    num_classes: int

    @classmethod
    def parse(cls, text: str) -> Size:
        width, height, num_classes = (int(v) for v in text.lower().split("x"))
        return cls(width, height, num_classes)

    def __str__(self) -> str:
        return f"{self.width}x{self.height}, {self.num_classes} classes"


def make_inputs(size: Size, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic scene and a coarse network's probabilities for it (uint8 HxWx3, float32 CxHxW)."""
    image, mask = render_scene(SyntheticSpec(height=size.height, width=size.width), seed)
    labels = np.where(mask < size.num_classes, mask, 0)
    one_hot = np.eye(size.num_classes, dtype=np.float32)[labels].transpose(2, 0, 1)
    blurred = np.stack([cv2.GaussianBlur(c, (0, 0), 4) for c in one_hot])
    noise = np.random.default_rng(seed).normal(0, 0.5, blurred.shape).astype(np.float32)
    logits = 4 * blurred + noise
    probs = np.exp(logits - logits.max(0))
    return image, (probs / probs.sum(0, keepdims=True)).astype(np.float32)


def _timed(fn: Callable[[], object], device: str = "cpu") -> tuple[float, float, object]:
    """(wall seconds, this process's CPU seconds, result)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.perf_counter() - start_wall, time.process_time() - start_cpu, result


@dataclass
class Row:
    size: Size
    backend: str  # "pydensecrf" or "torch <device>"
    wall: float  # seconds per image, median
    cpu: float
    peak_mib: float | None = None
    labels_equal: float | None = None  # vs pydensecrf
    max_diff: float | None = None


def measure(sizes: list[Size], devices: list[str], repeats: int, batch: int, params: CRFParams) -> list[Row]:
    kwargs = {"params": params}
    inputs = [make_inputs(size) for size in sizes]
    tensors = {  # batch copies of the same image, already on the device
        (i, device): (torch.from_numpy(image)[None].repeat(batch, 1, 1, 1).to(device),
                      torch.from_numpy(probs)[None].repeat(batch, 1, 1, 1).to(device))
        for i, (image, probs) in enumerate(inputs) for device in devices
    }
    for device in devices:  # warm-up: CUDA context and kernels, CPU allocator; small size for CPU
        for i in range(len(sizes)) if device.startswith("cuda") else [0]:
            dense_crf_torch(*tensors[i, device], **kwargs)

    samples: dict[tuple[int, str], list[tuple[float, float]]] = {}
    outputs: dict[tuple[int, str], np.ndarray] = {}
    peaks: dict[tuple[int, str], float] = {}
    for round_ in range(repeats):
        for i, (size, (image, probs)) in enumerate(zip(sizes, inputs)):
            wall, cpu, outputs[i, "pydensecrf"] = _timed(lambda: dense_crf(image, probs, **kwargs))  # noqa: B023
            samples.setdefault((i, "pydensecrf"), []).append((wall, cpu))
            for device in devices:
                if device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats(device)
                batch_tensors = tensors[i, device]
                wall, cpu, out = _timed(lambda: dense_crf_torch(*batch_tensors, **kwargs), device)  # noqa: B023
                samples.setdefault((i, device), []).append((wall / batch, cpu / batch))
                outputs[i, device] = out[0].cpu().numpy()
                if device.startswith("cuda"):
                    peaks[i, device] = torch.cuda.max_memory_allocated(device) / 2**20
            times = ", ".join(f"{key[1]} {s[-1][0]:.2f} s" for key, s in samples.items() if key[0] == i)
            print(f"round {round_ + 1}/{repeats} {size}: {times}", file=sys.stderr, flush=True)

    rows = []
    for i, size in enumerate(sizes):
        reference = outputs[i, "pydensecrf"]
        for backend in ["pydensecrf", *devices]:
            wall = statistics.median(s[0] for s in samples[i, backend])
            cpu = statistics.median(s[1] for s in samples[i, backend])
            name = backend if backend == "pydensecrf" else f"torch {backend}"
            row = Row(size, name, wall, cpu, peaks.get((i, backend)))
            if backend != "pydensecrf":
                out = outputs[i, backend]
                row.labels_equal = float((out.argmax(0) == reference.argmax(0)).mean())
                row.max_diff = float(np.abs(out - reference).max())
            rows.append(row)
    return rows


def markdown(rows: list[Row], batch: int) -> str:
    lines = [
        ("| size, classes | backend | batch | wall (s/image) | CPU (s/image) | vs pydensecrf "
         "| peak GPU memory (MiB) | labels equal to pydensecrf | max abs prob. difference |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    reference: Row | None = None
    for row in rows:
        if row.backend == "pydensecrf":
            reference = row
        on_gpu = row.backend.startswith("torch cuda")
        # CPU rows: CPU-time ratio (load-robust). GPU rows: wall-clock speed-up over pydensecrf.
        ratio = (f"{reference.wall / row.wall:.1f}x faster" if on_gpu else f"{row.cpu / reference.cpu:.2f}x the time")
        lines.append(
            f"| {row.size} | {row.backend} | {1 if row.backend == 'pydensecrf' else batch} | {row.wall:.3f} | "
            f"{row.cpu:.3f} | {'1.00' if row is reference else ratio} | "
            f"{'' if row.peak_mib is None else f'{row.peak_mib:.0f}'} | "
            f"{'' if row.labels_equal is None else f'{100 * row.labels_equal:.3f} %'} | "
            f"{'' if row.max_diff is None else f'{row.max_diff:.1e}'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated WIDTHxHEIGHTxCLASSES")
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}, 1 repeat: a few seconds")
    parser.add_argument("--device", default="cpu", help="comma-separated devices for the torch backend, e.g. cpu,cuda")
    parser.add_argument("--batch", type=int, default=1, help="images per dense_crf_torch call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (pydensecrf always uses one)")
    parser.add_argument("--iterations", type=int, default=CRFParams.iterations)
    parser.add_argument("--output", help=f"Markdown file whose '## {SECTION}' section is (re)written")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    sizes = [Size.parse(s) for s in (QUICK_SIZES if args.quick else args.sizes).split(",")]
    devices = [d for d in args.device.split(",") if d]
    repeats = 1 if args.quick else args.repeats
    params = CRFParams(iterations=args.iterations)
    rows = measure(sizes, devices, repeats, args.batch, params)
    table = markdown(rows, args.batch)
    print(table)
    if args.output:
        command = "python bench/crf.py " + " ".join(argv if argv is not None else sys.argv[1:])
        gpus = ", ".join(torch.cuda.get_device_name(d) for d in devices if d.startswith("cuda")) or "no GPU used"
        body = "\n\n".join([
            f"Command: `{command}`",
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, {gpus}, "
            f"torch {torch.__version__}, {args.threads} torch threads, load average at the end "
            f"{os.getloadavg()[0]:.1f} (shared machine: times are noisy, CPU-time ratios less so).",
            f"{params}. Median of {repeats} round-robin runs; synthetic scene, probabilities = blurred noisy "
            "labels. torch rows time `dense_crf_torch` on tensors already on the device; vs pydensecrf = "
            "CPU-time ratio on CPU rows, wall-clock speed-up on GPU rows.",
            table,
        ])
        if not any(d.startswith("cuda") for d in devices):
            body += f"\n\nGPU: not yet measured. On a GPU machine: `{GPU_COMMAND}` (add `--batch 4` for batches)."
        replace_section(args.output, SECTION, body)


if __name__ == "__main__":
    main()
