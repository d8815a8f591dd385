"""Inputs that kill their worker process (a segfault in a native library, an out-of-memory kill)
must not stall the run, nor every later run.

Ray retries a task (or an actor task, after restarting the actor) whose worker died; Ray Data's
actors retry without end by default. Each stage therefore runs its batch under a guard that
keeps count, in one small actor per run (the ``AttemptBook``, outside the workers that die):

1. a batch is announced before it is processed and marked finished after;
2. a batch announced before but never finished killed its worker: it is processed again one
   input at a time, each announced and finished the same way;
3. an input that killed its worker ``crash_limit`` times is not processed again in this run: it
   becomes an error row of that stage ("worker lost", a transient error that later runs retry up
   to the ledger's ``max_attempts``) and the rest of the batch goes on.

Ray's own retries are bounded too (``ray_retries``), so a failure the guard cannot see ends the
run with an error instead of a hang.

Test hook (inert unless set): ``DEEPLAB_SEGMENT_TEST_ABORT="<stage>:<id>"`` in the driver's
environment makes that stage call ``os.abort()`` whenever it processes that input.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.segmentation.columns import ERROR_REASON, ERROR_STAGE, ID, STATUS, STATUS_ERROR

ABORT_ENV = "DEEPLAB_SEGMENT_TEST_ABORT"
WORKER_LOST = "worker lost"


class AttemptBook:
    """How often each key (a stage's batch, or one input in a stage) was started and finished."""

    def __init__(self) -> None:
        self.started: dict[tuple, int] = {}
        self.finished: dict[tuple, int] = {}

    def start(self, key: tuple) -> int:
        """Counts a start; returns how many earlier starts never finished (worker deaths)."""
        crashes = self.started.get(key, 0) - self.finished.get(key, 0)
        self.started[key] = self.started.get(key, 0) + 1
        return crashes

    def finish(self, key: tuple) -> None:
        finished = self.finished.get(key, 0) + 1
        if finished >= self.started.get(key, 0):  # nothing in flight, no deaths: forget it
            self.started.pop(key, None)
            self.finished.pop(key, None)
        else:
            self.finished[key] = finished


@dataclass(frozen=True)
class Guard:
    book: Any  # the AttemptBook actor's handle
    crash_limit: int
    abort: tuple[str, str] | None = None  # test hook: (stage, id)

    def ray_retries(self, batch_size: int) -> int:
        """Ray-level retries a batch may need: one to switch to one input at a time, then
        ``crash_limit`` per input of the batch, plus one spare."""
        return 2 + self.crash_limit * batch_size


def new_guard(crash_limit: int) -> Guard:
    """The run's guard; its book lives in an actor on the driver's node (no CPU)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # Pinned to the driver's node: anywhere else, losing that node would take the book (and with
    # it the whole run) down, while the workers it watches are meant to survive node losses.
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    book = ray.remote(num_cpus=0, scheduling_strategy=here)(AttemptBook).remote()
    abort = None
    hook = os.environ.get(ABORT_ENV, "")
    if ":" in hook:
        stage, record_id = hook.split(":", 1)
        abort = (stage, record_id)
    return Guard(book, crash_limit, abort)


def _maybe_abort(guard: Guard, stage: str, ids: list[str]) -> None:
    if guard.abort is not None and guard.abort[0] == stage and guard.abort[1] in ids:
        os.abort()  # test hook: what a segfault in a native library does to the worker


def guarded(guard: Guard | None, stage: str, batch: dict[str, np.ndarray],
            process: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``process(batch)``, or, when this batch killed a worker before, ``process`` on one input
    at a time with the inputs that killed ``crash_limit`` workers turned into error rows."""
    if guard is None:
        return process(batch)
    import ray

    ids = [str(i) for i in batch[ID]]
    key = (stage, "batch", *ids)
    if ray.get(guard.book.start.remote(key)) == 0:
        _maybe_abort(guard, stage, ids)
        out = process(batch)
        ray.get(guard.book.finish.remote(key))  # before the next batch can kill this worker
        return out
    outs = []
    for i, record_id in enumerate(ids):
        row = {name: column[i:i + 1] for name, column in batch.items()}
        one = (stage, "input", record_id)
        crashes = ray.get(guard.book.start.remote(one))
        if crashes >= guard.crash_limit:
            row[STATUS] = np.array([STATUS_ERROR], dtype=object)
            row[ERROR_STAGE] = np.array([stage], dtype=object)
            row[ERROR_REASON] = np.array([f"{WORKER_LOST}: the worker process died {crashes} time(s) while "
                                          f"processing this input in stage {stage}"], dtype=object)
        else:
            _maybe_abort(guard, stage, [record_id])
        outs.append(process(row))
        ray.get(guard.book.finish.remote(one))
    return {name: np.concatenate([out[name] for out in outs]) for name in outs[0]}
