"""Model zoo cost at one input size: parameters, GMACs, CPU latency (forward; forward+backward).

Rows are the main arch x backbone pairs of deeplab_core.models plus torchvision's
deeplabv3_resnet50/101 as baselines measured in the same run; the ratio columns divide CPU times
by torchvision's deeplabv3_resnet101's.

- GMACs: torch.utils.flop_counter.FlopCounterMode FLOPs / 2 (multiply-adds, the convention of
  VainF's table and most papers), counted on the meta device (shapes only), batch 1.
- Latency: median of --repeats runs after a warm-up forward and backward, batch 1, torch threads
  = --threads, as wall-clock seconds and as this process's CPU seconds. The runs go round-robin over all
  models (built up front), so on a shared machine every row sees the same stretches of load; the
  ratios use CPU time, which the other tenants inflate less than the wall clock.
  Forward+backward runs in eval mode: in training mode BatchNorm cannot normalise the 1x1
  image-pooling branch of a single image. Random weights (cost does not depend on them).

    python bench/models.py --repeats 2                              # prints the table
    python bench/models.py --repeats 2 --output docs/benchmarks.md  # also writes "## Models"
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

import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import replace_section  # noqa: E402
from deeplab_core.models import ARCHS, build_model  # noqa: E402

SECTION = "Models"
BASELINE = "torchvision deeplabv3_resnet101"


@dataclass(frozen=True)
class Row:
    name: str
    arch: str  # for --archs; "torchvision" rows always run
    output_stride: int
    build: Callable[[], nn.Module]  # returns logits, or torchvision's {"out": ...}


def _ours(arch: str, backbone: str, output_stride: int | None = None) -> Row:
    output_stride = output_stride or ARCHS[arch].default_output_stride
    return Row(f"{arch} {backbone}", arch, output_stride,
               lambda: build_model(arch, backbone, output_stride=output_stride))


def _torchvision(depth: int) -> Row:
    constructor = getattr(torchvision.models.segmentation, f"deeplabv3_resnet{depth}")
    return Row(f"torchvision deeplabv3_resnet{depth}", "torchvision", 8,
               lambda: constructor(weights=None, weights_backbone=None, num_classes=21, aux_loss=False))


def default_rows() -> list[Row]:
    return [
        _torchvision(50),
        _torchvision(101),
        _ours("deeplabv1", "vgg16"),
        _ours("deeplabv2", "resnet101"),
        _ours("deeplabv2", "vgg16"),
        _ours("deeplabv3", "resnet50", 16),
        _ours("deeplabv3", "resnet50", 8),
        _ours("deeplabv3", "resnet101", 16),
        _ours("deeplabv3", "resnet101", 8),
        _ours("deeplabv3plus", "resnet50"),
        _ours("deeplabv3plus", "resnet101"),
        _ours("deeplabv3plus", "xception65"),
        _ours("deeplabv3plus", "mobilenetv2"),
    ]


def _logits(output: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
    return output["out"] if isinstance(output, dict) else output


def gmacs(build: Callable[[], nn.Module], size: int) -> float:
    with torch.device("meta"):
        model = build().eval()
        x = torch.empty(1, 3, size, size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 2 / 1e9


@dataclass(frozen=True)
class Seconds:
    wall: float
    cpu: float  # this process, all threads


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start_wall, time.process_time() - start_cpu


def _median(samples: list[tuple[float, float]]) -> Seconds:
    return Seconds(statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples))


def _forward(model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        model(x)


def _forward_backward(model: nn.Module, x: torch.Tensor) -> None:
    _logits(model(x)).mean().backward()
    model.zero_grad(set_to_none=True)


def measure(rows: list[Row], size: int, repeats: int) -> list[dict]:
    """Round-robin over the models (all built up front) so that every row samples the same
    stretches of a shared machine's load."""
    x = torch.rand(1, 3, size, size)
    torch.manual_seed(0)
    models = [row.build().eval() for row in rows]
    for model in models:  # warm-up: one-time allocations and autograd start-up
        _forward(model, x)
        _forward_backward(model, x)
    forward: list[list[tuple[float, float]]] = [[] for _ in rows]
    forward_backward: list[list[tuple[float, float]]] = [[] for _ in rows]
    for round_ in range(repeats):
        for i, (row, model) in enumerate(zip(rows, models)):
            forward[i].append(_timed(lambda: _forward(model, x)))
            forward_backward[i].append(_timed(lambda: _forward_backward(model, x)))
            print(f"round {round_ + 1}/{repeats} {row.name} OS {row.output_stride}: fwd {forward[i][-1][0]:.2f} s, "
                  f"fwd+bwd {forward_backward[i][-1][0]:.2f} s", file=sys.stderr, flush=True)
    return [
        {"row": row, "params": sum(p.numel() for p in model.parameters()), "gmacs": gmacs(row.build, size),
         "fwd": _median(forward[i]), "fwd_bwd": _median(forward_backward[i])}
        for i, (row, model) in enumerate(zip(rows, models))
    ]


def markdown(results: list[dict], size: int) -> str:
    base = next(r for r in results if r["row"].name == BASELINE)
    lines = [
        f"| model ({size}x{size}, batch 1) | OS | params (M) | GMACs | forward wall (s) | forward CPU (s) "
        "| fwd+bwd wall (s) | fwd+bwd CPU (s) | forward CPU / tv-r101 | fwd+bwd CPU / tv-r101 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        fwd, fwd_bwd = r["fwd"], r["fwd_bwd"]
        lines.append(
            f"| {r['row'].name} | {r['row'].output_stride} | {r['params'] / 1e6:.2f} | {r['gmacs']:.1f} | "
            f"{fwd.wall:.2f} | {fwd.cpu:.2f} | {fwd_bwd.wall:.2f} | {fwd_bwd.cpu:.2f} | "
            f"{fwd.cpu / base['fwd'].cpu:.2f} | {fwd_bwd.cpu / base['fwd_bwd'].cpu:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="", help="comma-separated archs to include (default: all); "
                        "torchvision baselines always run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=513)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", help="Markdown file whose '## Models' section is (re)written")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    wanted = {a for a in args.archs.split(",") if a}
    rows = [row for row in default_rows() if not wanted or row.arch in wanted or row.arch == "torchvision"]
    results = measure(rows, args.size, args.repeats)
    table = markdown(results, args.size)
    print(table)
    if args.output:
        command = "python bench/models.py " + " ".join(argv if argv is not None else sys.argv[1:])
        body = "\n\n".join([
            f"Command: `{command}`",
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, torch "
            f"{torch.__version__}, {args.threads} torch threads, load average at the end "
            f"{os.getloadavg()[0]:.1f} (shared machine: latencies are noisy, ratios less so).",
            "GMACs = FlopCounterMode FLOPs / 2 (multiply-adds). Latency: median of "
            f"{args.repeats} round-robin runs after a warm-up, random weights, wall clock and this process's CPU time; "
            "fwd+bwd in eval mode (BatchNorm cannot train the image-pooling branch on one image). Ratios "
            "divide CPU times by torchvision's deeplabv3_resnet101 (OS 8) from the same run.",
            table,
        ])
        replace_section(args.output, SECTION, body)


if __name__ == "__main__":
    main()
