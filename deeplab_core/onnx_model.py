"""A model as an ONNX graph run by ONNX Runtime on CPU: the export, the check that the graph takes
other sizes, and the `nn.Module` that `tta.predict` calls in place of the PyTorch model.

Export: `torch.onnx.export(dynamo=True)`, the torch.export-based exporter (torch's default since
2.9; it needs `onnxscript`), with batch, height and width dynamic. The TorchScript exporter
(`dynamo=False`) gave the same graphs for every architecture but is deprecated, to be removed.

A graph traced at EXAMPLE_SHAPE can still have that size baked in: DeepLabv2's MSC computes its
pyramid's sizes as Python ints (`int(H * s)`), so the graph runs at any size but resizes every
input to the traced pyramid (logits off by 0.17-0.6 at other sizes), exactly as its torch.export
program does (pipelines/tracking/models.py). `check_export` therefore compares the graph with the
eager model at CHECK_SHAPES, other batch and image sizes than the traced one, and raises
ExportMismatch unless the logits agree within ATOL + RTOL * |eager| and the labels are equal
(pixels whose two best eager logits are closer than that tolerance allows excepted: a tie there is
no disagreement).

Number format: float32 only (ONNX Runtime's CPU kernels; no bf16 autocast).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

EXAMPLE_SHAPE = (2, 3, 64, 80)  # batch 2: a size-1 dimension would be exported static
CHECK_SHAPES = ((1, 3, 57, 71), (3, 3, 96, 128))  # odd sizes, other batches than the example's
# ONNX Runtime fuses conv + BN and reorders sums: float32 rounding, ~1e-7 of the logits on the
# tiny test models, 6e-3 abs on a random-weight ResNet-101 at 513 x 513 (issue #25). A size baked
# into the graph is off by tenths (DeepLabv2 MSC above).
ATOL, RTOL = 1e-3, 1e-3
ONNX_PACKAGES = ("onnxruntime", "onnxscript", "onnx")  # run, export, both


class ExportMismatch(ValueError):
    """The exported graph does not compute the model at sizes other than the traced one."""


@dataclass(frozen=True)
class OnnxGraph:
    """A serialized ONNX model (bytes: cheap to send to actors) and the PyTorch model's config
    (`tta.predict` reads its output stride)."""

    data: bytes
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExportCheck:
    """What `check_export` measured, for the caller's one line."""

    shapes: tuple[tuple[int, ...], ...]
    max_abs_diff: float
    labels_equal: float  # fraction of pixels (near-ties included)


def export_onnx(model: nn.Module) -> OnnxGraph:
    """`model` (eval mode, float32, contiguous) as an ONNX graph with dynamic batch and size."""
    import logging
    import warnings

    model = _out_of_place(model.eval())
    example = torch.randn(*EXAMPLE_SHAPE, generator=torch.Generator().manual_seed(0))
    dims = {0: "batch", 2: "height", 3: "width"}
    quiet = ("torch.onnx", "torch.export", "torch._export", "onnxscript", "torch.fx.experimental")
    levels = {name: logging.getLogger(name).level for name in quiet}
    try:
        for name in quiet:  # the exporter narrates every step at INFO/WARNING
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (example,), dynamo=True, input_names=["images"],
                                        output_names=["logits"], dynamic_shapes=({**dims},), verbose=False)
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    return OnnxGraph(program.model_proto.SerializeToString(), dict(getattr(model, "config", None) or {}))


def _out_of_place(model: nn.Module) -> nn.Module:
    """A copy whose activations (ReLU, ReLU6) do not work in place: the same graph, exported in
    half the time (torch.export rewrites every in-place op; MobileNetV2 x0.25: 14 -> 7 CPU s)."""
    import copy

    if not any(getattr(module, "inplace", False) for module in model.modules()):
        return model
    model = copy.deepcopy(model)
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
    return model


def check_export(graph: OnnxGraph, model: nn.Module, shapes=CHECK_SHAPES) -> ExportCheck:
    """Raises ExportMismatch unless the graph matches `model` (eager, float32) at every shape in
    `shapes` (see the module doc); returns what was measured."""
    session = OnnxModel(graph, num_threads=torch.get_num_threads())
    model = model.eval()
    generator = torch.Generator().manual_seed(1)
    worst, equal, pixels = 0.0, 0, 0
    for shape in shapes:
        x = torch.randn(*shape, generator=generator)
        with torch.inference_mode():
            expected = _logits(model(x))
            got = session(x)
        if got.shape != expected.shape:
            raise ExportMismatch(f"the ONNX graph gives logits of shape {tuple(got.shape)} for input "
                                 f"{tuple(shape)}, the model {tuple(expected.shape)}")
        diff = (got - expected).abs()
        tolerance = ATOL + RTOL * expected.abs()
        worst = max(worst, float(diff.max()))
        same = got.argmax(1) == expected.argmax(1)
        top2 = expected.topk(2, dim=1).values
        tie = (top2[:, 0] - top2[:, 1]) <= 2 * tolerance.amax(1)
        if not bool((diff <= tolerance).all()) or not bool((same | tie).all()):
            raise ExportMismatch(
                f"the ONNX graph disagrees with the model at input {tuple(shape)} (traced at {EXAMPLE_SHAPE}): "
                f"max |logits difference| {float(diff.max()):.3g} > {ATOL:g} + {RTOL:g} x |logit|, "
                f"labels equal {100 * float(same.float().mean()):.2f} %: a size is baked into the graph")
        equal, pixels = equal + int(same.sum()), pixels + same.numel()
    return ExportCheck(tuple(tuple(s) for s in shapes), worst, equal / max(1, pixels))


def _logits(out) -> torch.Tensor:
    return (out["out"] if isinstance(out, dict) else out).float()


class OnnxModel(nn.Module):
    """An ONNX Runtime session (CPU, `num_threads` intra-op threads) behind `nn.Module`'s call:
    N x 3 x H x W float tensor in (any memory format), N x C x H x W float32 logits out. It has no
    parameters, so `tta.predict` runs it on the input's device (the CPU) and without autocast."""

    def __init__(self, graph: OnnxGraph, num_threads: int = 1) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, int(num_threads))
        options.inter_op_num_threads = 1
        # Threads that spin between kernels take CPU from the decode and CRF work beside the actor.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only
        self.session = ort.InferenceSession(graph.data, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.config = dict(graph.config)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])
