"""The stages composed into one Ray Data pipeline (batch segmentation and evaluate_model), and the
model a run segments with: found, pinned and loaded once on the driver."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from pipelines.common.errors import InputError
from pipelines.common.redaction import redact_urls
from pipelines.common.uris import absolute_uri
from pipelines.segmentation.columns import initial_status
from pipelines.segmentation import resources
from pipelines.segmentation.io import InputItem
from pipelines.segmentation.stages import (
    InferencePlan,
    ModelStage,
    WriteSpec,
    crf_stage,
    decode_stage,
)
from pipelines.segmentation.stages.score import score_then_write


def build_dataset(items: Sequence[InputItem], plan: InferencePlan, model_ref, *, batch_size: int,
                  num_model_actors: int, cpus_per_model_actor: float, crf_workers: int, gpu: bool,
                  write: WriteSpec | None):
    """decode -> model -> [crf] -> [score] -> [write] over ``items`` (score and write in the CRF
    task, or in one 0-CPU task); rows are per-image summaries (no pixels)."""
    import ray.data

    rows = input_rows(items)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), math.ceil(len(rows) / batch_size))))
    # Bounded retries: the guard turns an input that kills workers into an error row after
    # crash_limit deaths; Ray's default for actors is to retry without end. (Ray 2.60 has no
    # named map_batches parameter for these yet: they go as remote args, whose deprecation
    # warning says to use named parameters that do not exist; not shown to users.)
    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning)
    # Fewer batches than CRF workers (a small job) is fine: Ray Data's advice for it is noise here.
    warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks for", category=UserWarning)
    tasks, actors = {}, {}
    if plan.guard is not None:
        retries = plan.guard.ray_retries(batch_size)
        tasks, actors = {"max_retries": retries}, {"max_restarts": -1, "max_task_retries": retries}
    # 0.5 CPU: unequal resources keep Ray Data from fusing the decode into the model actors,
    # so decoding overlaps inference instead of running inside the actor.
    ds = ds.map_batches(decode_stage, fn_kwargs={"plan": plan}, batch_size=batch_size,
                        batch_format="numpy", num_cpus=resources.DECODE_CPUS, **tasks)
    model_resources = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": cpus_per_model_actor}
    ds = ds.map_batches(
        ModelStage,
        fn_constructor_kwargs={"model_ref": model_ref, "plan": plan, "device": "cuda" if gpu else "cpu",
                               "num_threads": int(max(1, cpus_per_model_actor))},
        compute=ray.data.ActorPoolStrategy(size=num_model_actors),
        batch_size=batch_size, batch_format="numpy", **model_resources, **actors,
    )
    # Masks are scored and written as they are made (a kill loses only the batches in flight): by
    # the CRF task that refined them, else by tasks that need no CPU. A 0.25-CPU write task never
    # got a CPU while the model actor and the CRF tasks held them all: every mask came at the end.
    end = end_stage(plan, write)
    if end is crf_stage:
        ds = ds.map_batches(crf_stage, fn_kwargs={"plan": plan, "write": write}, batch_size=batch_size,
                            batch_format="numpy", num_cpus=resources.CRF_CPUS,
                            compute=ray.data.TaskPoolStrategy(size=crf_workers), **tasks)
    elif end is not None:
        ds = ds.map_batches(end, fn_kwargs={"plan": plan, "write": write}, batch_size=batch_size,
                            batch_format="numpy", num_cpus=0, **tasks)
    return ds.select_columns(plan.summary_columns(write=write is not None))


def input_rows(items: Sequence[InputItem]) -> list[dict[str, Any]]:
    """The rows the first stage (decode) gets, whichever engine runs the stages."""
    status = {k: v[0] for k, v in initial_status(1).items()}
    return [{**item.row(), **status} for item in items]


def end_stage(plan: InferencePlan, write: WriteSpec | None) -> Callable[..., dict] | None:
    """The stage after the model, called as ``end(batch, plan=plan, write=write)``: the CPU CRF
    (which scores and writes what it refined), else score-then-write, else none."""
    if plan.run_crf and not plan.crf_in_model:
        return crf_stage
    if plan.with_masks or write is not None:
        return score_then_write
    return None


def resolve_model(uri: str) -> str:
    """A registry alias pinned to its version (every actor loads the same one); paths absolute."""
    from pipelines import tracking

    return tracking.resolve_model_uri(uri) if tracking.is_registry_uri(uri) else absolute_uri(uri)


@contextmanager
def model_errors(uri: str) -> Iterator[None]:
    """Any failure to find or load the model as one InputError naming it (redacted) and why."""
    try:
        yield
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - missing, truncated, unknown alias, not a checkpoint
        reason = redact_urls(" ".join(str(getattr(err, "message", err)).split()))[:300].rstrip(".") or type(err).__name__
        raise InputError(f"cannot load model {redact_urls(uri)}: {reason}{_registry_hint(uri)}") from None


def _registry_hint(uri: str) -> str:
    """What the registry has, for a `models:/` URI that did not load (never a second error)."""
    from pipelines import tracking

    try:
        return tracking.registry_hint(uri) if tracking.is_registry_uri(uri) else ""
    except Exception:  # noqa: BLE001 - the hint is a courtesy; the error above is the message
        return ""


def load_checked_model(uri: str, storage_options: Mapping[str, Any] | None,
                       load: bool = True) -> tuple[str, Any, dict]:
    """(pinned URI, model, meta); with `load=False` only the URI is checked and pinned."""
    with model_errors(uri):
        model_uri = resolve_model(uri)
        if not load:
            return model_uri, None, {}
        from pipelines.tracking import load_model  # torch: only when a model is loaded

        model, meta = load_model(model_uri, storage_options=storage_options)
    return model_uri, model, meta
