"""Where a segmentation job's stages run: on Ray Data (pipeline.build_dataset) or in this process.

The in-process engine runs the very same stage callables (decode, model, [CPU CRF | score and
write]) over the same numpy batches, one after another, with the model the driver loaded;
everything around the stages (lease, selection, ledger, progress, summary, MLflow) is the job's
own, so outputs and ledger are the same whichever engine ran. It saves Ray's fixed cost (start,
a fresh worker importing torch, the model through the object store: 15-50 s on 2 cores), which a
small job does not earn back.

What it gives up, and so when `--engine auto` keeps Ray (`choose`):
- a cluster (RAY_ADDRESS, `ray job submit`, or a Ray this process already joined): its workers;
- the CPU CRF (pydensecrf holds the GIL) on more than a few dozen inputs (`local_max_crf_inputs`):
  Ray runs it in parallel processes beside the model, which pays for Ray's start from there;
- many inputs: above `local_max_inputs` Ray's start is a small part of the run, and its guard and
  more model actors are worth it (measured: docs/segmentation.md, "Engines");
- the poison guard (poison.py): in-process an input that kills the worker kills the run, and
  would kill every re-run; so after a run on this output died (its lease never released: a
  Ctrl-C or an error releases it) the next run goes to Ray, whose guard makes that input an error
  record.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from pipelines.segmentation.io import InputItem
from pipelines.segmentation.stages import InferencePlan, ModelStage, WriteSpec, decode_stage

LOCAL, RAY = "local", "ray"


def attached_to_cluster() -> bool:
    """Whether this job runs on a Ray cluster it did not start: RAY_ADDRESS (a cluster, or the
    driver of `ray job submit`), or a Ray this process already joined (a notebook, a test session)."""
    if os.environ.get("RAY_ADDRESS"):
        return True
    ray = sys.modules.get("ray")  # not imported to ask: the in-process engine never loads Ray
    return ray is not None and ray.is_initialized()


def choose(setting: str, *, inputs: int, local_max_inputs: int, cpu_crf: bool, attached: bool,
           previous_died: bool, local_max_crf_inputs: int = 0) -> tuple[str, str]:
    """(LOCAL or RAY, the reason in words) for `setting` auto/local/ray; see the module doc."""
    if setting != "auto":
        return setting, f"--engine {setting}"
    rule = f"--engine auto; Ray above {local_max_inputs} inputs, {local_max_crf_inputs} with the CPU CRF"
    if attached:
        return RAY, "--engine auto: attached to a Ray cluster"
    if cpu_crf and inputs > local_max_crf_inputs:
        return RAY, (f"--engine auto: more than local_max_crf_inputs={local_max_crf_inputs} inputs with the CPU CRF "
                     "(pydensecrf), which Ray runs in parallel tasks")
    if inputs > local_max_inputs:
        return RAY, f"--engine auto: more than local_max_inputs={local_max_inputs} inputs"
    if previous_died:
        return RAY, ("--engine auto: the last run on this output died (its lease was never released); Ray's "
                     "guard turns an input that kills its worker into an error record")
    return LOCAL, rule


def engine_line(engine: str, inputs: int, why: str) -> str:
    where = "in this process" if engine == LOCAL else "on Ray"
    return f"[segment] {inputs} input(s): segmenting {where} ({why})"


def local_device(setting: str) -> str:
    """The in-process model's device for `--device` auto/cpu/cuda: auto is a GPU of this machine."""
    if setting == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def _column_batch(rows: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Rows as the numpy batch a Ray Data stage gets (object columns)."""
    return {name: np.array([row[name] for row in rows], dtype=object) for name in rows[0]}


def run_batches(items: Sequence[InputItem], plan: InferencePlan, model, *, batch_size: int, device: str,
                num_threads: int, write: WriteSpec | None) -> Iterator[dict[str, np.ndarray]]:
    """The stages over `items` in this process, one batch after another; yields each batch's
    per-image summary columns in order (as the Ray dataset's stream does). No threads: decoding
    the next batch and writing the last one on threads beside the model measured no faster here
    (64 demo images, 6 interleaved repeats, 2 busy cores: median 7.0 s threaded, 6.3 s serial)."""
    from pipelines.segmentation.pipeline import end_stage, input_rows

    model_stage = ModelStage(model, plan, device, num_threads)
    end = end_stage(plan, write)
    columns = plan.summary_columns(write=write is not None)
    rows = input_rows(items)
    for start in range(0, len(rows), batch_size):
        out = model_stage(decode_stage(_column_batch(rows[start:start + batch_size]), plan))
        if end is not None:
            out = end(out, plan=plan, write=write)
        yield {name: out[name] for name in columns}
