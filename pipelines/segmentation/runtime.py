"""The model stage's runtime: `--runtime torch` (the default: the PyTorch model, eager) or `onnx`
(the model exported once, on the driver, to an ONNX graph that is checked against the eager model
and then run by ONNX Runtime in every model actor, with the actor's threads).

Rules (each refusal is one line, exit 2, before Ray starts where it can be known then):
- `onnx` needs the extra: `pip install 'deeplab-ray[onnx]'` (onnxruntime, onnxscript, onnx).
- `onnx` runs float32 on CPU only: the onnxruntime package has no CUDA provider and no bf16
  autocast. `--precision bf16` and `--device cuda` are refused by the config; `--device auto` on a
  cluster with GPUs is refused once the driver sees the GPUs; `--precision auto` means fp32.
- A graph that does not match the eager model at two other sizes (deeplab_core/onnx_model.py:
  check_export; DeepLabv2 with `msc_scales` resized by size) is refused, never used.
The multi-scale + flip logic stays `deeplab_core.tta.predict`'s: the graph replaces the model only.
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any

from pipelines.common.errors import InputError

TORCH, ONNX = "torch", "onnx"
EXTRA = "pip install 'deeplab-ray[onnx]'"


def missing_packages() -> list[str]:
    """The ONNX extra's packages this interpreter cannot import (found without importing them)."""
    from deeplab_core.onnx_model import ONNX_PACKAGES

    return [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]


def check_available(runtime: str) -> None:
    """Raises InputError (one line) when `runtime` needs packages that are not installed."""
    if runtime == ONNX:
        missing = missing_packages()
        if missing:
            raise InputError(f"--runtime onnx needs {', '.join(missing)} (not installed): {EXTRA}")


def check_device(runtime: str, gpu: bool) -> None:
    """Raises InputError when `runtime` cannot run where the model actors will run."""
    if runtime == ONNX and gpu:
        raise InputError("--runtime onnx runs on CPU only (the onnxruntime package has no CUDA provider) and the "
                         "model would run on a GPU here: add --device cpu, or use --runtime torch")


def prepare(model: Any, runtime: str) -> Any:
    """What the model actors receive: the PyTorch model itself, or (onnx) its checked ONNX graph.
    An export that fails or does not generalise is an InputError naming the model's architecture."""
    if runtime != ONNX:
        return model
    from deeplab_core.onnx_model import ExportMismatch, check_export, export_onnx

    config = getattr(model, "config", None) or {}
    name = f"{config.get('arch', type(model).__name__)}/{config.get('backbone', '?')}"
    started = time.monotonic()
    try:
        graph = export_onnx(model)
        checked = check_export(graph, model)
    except ExportMismatch as err:
        raise InputError(f"--runtime onnx: the ONNX export of {name} cannot be used: {err}; use --runtime torch") from None
    except Exception as err:  # noqa: BLE001 - an operator the exporter does not know, a trace failure
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise InputError(f"--runtime onnx: {name} does not export to ONNX ({type(err).__name__}: {reason}); "
                         "use --runtime torch") from None
    sizes = ", ".join("x".join(map(str, shape[2:])) + f" (batch {shape[0]})" for shape in checked.shapes)
    print(f"[segment] model exported to ONNX ({len(graph.data) / 1e6:.1f} MB) in {time.monotonic() - started:.1f} s; "
          f"equal to eager at {sizes}: max |logits difference| {checked.max_abs_diff:.2g}, "
          f"labels {100 * checked.labels_equal:.2f} %", flush=True)
    return graph


def runtime_model(prepared: Any, runtime: str, num_threads: int) -> Any:
    """In a model actor (or the Segmenter): the module `tta.predict` calls."""
    if runtime != ONNX:
        return prepared
    from deeplab_core.onnx_model import OnnxModel

    return OnnxModel(prepared, num_threads)
