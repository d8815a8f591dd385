"""Batch segmentation on Ray Data: multi-scale + flip inference, dense CRF, idempotent outputs.

Stages (streaming: every stage runs while the others do; one module each under stages/, composed
by pipeline.py; the plan they share is built here, InferencePlan.for_model)::

    lease on the output          (driver)     one run per output at a time (lease.py)
    list prefix / read manifest  (driver)     ids checked, settled inputs skipped (ledger.py)
    CRF set, plan                (driver)     crf_settings.for_model, InferencePlan.for_model
      -> read + decode           CPU tasks    bad input becomes an error row, never a crash
      -> model                   actor pool   tta.predict (the run's TTASettings); GPU when present
      -> dense CRF               CPU tasks    crf.refine; separate processes (pydensecrf holds the GIL)
      -> score, write            in the CRF task (else 0-CPU tasks): masks, overlays as made
    record                       (driver)     results + ledger checkpoints, one file each per run

An input that kills its worker process ends as an error row (poison.py). Output layout and the
idempotency contract: io.py and ledger.py. The same stages also run in this process, without Ray
(engine.py: --engine local, and auto for a small job off a cluster).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa

from deeplab_core.constants import CRFParams
from deeplab_core.crf import choose_backend
from pipelines import tracking
from pipelines.common.cluster_paths import check_shared_paths
from pipelines.common.ray_session import ensure_ray, use_gpu
from pipelines.common.errors import InputError
from pipelines.data.errors import ErrorRecord
from pipelines.common.redaction import redact_urls
from pipelines.common.uris import absolute_uri, join_uri
from pipelines.data.storage import check_access, get_fs
from pipelines.segmentation import crf_settings, ledger, lease, precision, provenance, recipe, resources, runtime
from pipelines.segmentation import engine as engines
from pipelines.segmentation.config import SegmentConfig
from pipelines.segmentation.io import (
    ERRORS_DIR,
    RESULTS_SCHEMA,
    STATUS_OK,
    InputItem,
    checked_items,
    error_row,
    list_input_table,
    migrate_to_ledger,
    parse_time,
    write_state,
)
from pipelines.segmentation.poison import new_guard
from pipelines.segmentation.report import (
    METRIC_KEYS,
    SegmentReport,
    Tally,
    consume,
    evaluation_table,
    tally_batches,
    format_scales,
)
from pipelines.segmentation.columns import (
    CLASSES,
    ERROR_REASON,
    ERROR_STAGE,
    FINISHED_AT,
    ID,
    OUTPUT_URI,
    OVERLAY_URI,
    SECONDS_CRF,
    SECONDS_DECODE,
    SECONDS_MODEL,
    STATUS,
)
from pipelines.segmentation.pipeline import build_dataset, load_checked_model, model_errors
from pipelines.segmentation.stages import InferencePlan, WriteSpec


def run_segmentation(cfg: SegmentConfig, verbose: bool = False) -> SegmentReport:
    """Runs the job; returns (and prints) the report. See the module docstring. Raises InputError
    (before Ray starts) for an input, output, model or tracking server that cannot be used."""
    with tracking.tracking_uri_set(cfg.tracking_uri):
        return _run(cfg, verbose)


def _new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def _segment(cfg: SegmentConfig, todo: Sequence[InputItem], model, model_uri: str, plan: InferencePlan,
             write: WriteSpec, gpu: bool, on_batch, engine: str = engines.RAY,
             class_names: Sequence[str] | None = None) -> tuple[Tally, dict | None, str | None, str | None]:
    """Runs the stages over `todo` with `engine` (each summary batch to `on_batch`) and `model` as
    the model stage gets it (runtime.prepare's): the tally, the evaluation (metrics, table) with
    --eval, and the CRF backend that ran."""
    in_model = " (in the model actor)" if engine == engines.RAY else " (with the model)"
    crf = f"CRF {plan.crf_backend}" + (in_model if plan.crf_in_model else "") if plan.run_crf else "no CRF"
    on = "GPU" if gpu else "CPU" + (" (ONNX Runtime)" if plan.runtime == runtime.ONNX else "")
    print(f"[segment] model {model_uri} ({plan.num_classes} classes) on {on}; "
          f"scales {format_scales(cfg.tta.scales)}, flip {cfg.tta.flip}, {crf}", flush=True)
    if engine == engines.LOCAL:
        batches = engines.run_batches(
            todo, plan, model, batch_size=cfg.batch_size, device="cuda" if gpu else "cpu", write=write,
            # threads as in one model actor: on this shared 2-core machine 2 threads were 9x slower
            # than 1 under load (OpenMP waits for a descheduled thread); more: --cpus-per-model-actor
            num_threads=int(max(1, cfg.cpus_per_model_actor)))
        tally = tally_batches(batches, len(todo), cfg.progress_every_s, on_batch=on_batch)
    else:
        tally = consume(_ray_dataset(cfg, todo, model, plan, write, gpu), len(todo), cfg.progress_every_s,
                        on_batch=on_batch)
    backend = plan.crf_backend if plan.run_crf else None
    if not plan.table:
        return tally, None, None, backend
    evaluation, table = evaluation_table(tally, cfg.tta, tally.scored, plan.crf_params.iterations, class_names)
    return tally, evaluation, table, backend


def _ray_dataset(cfg: SegmentConfig, todo: Sequence[InputItem], model, plan: InferencePlan, write: WriteSpec,
                 gpu: bool):
    import ray

    # Ray Data would wait without end for resources the cluster does not have (resources.py).
    problem = resources.plan_problem(cfg.num_model_actors, cfg.cpus_per_model_actor, gpu,
                                     plan.run_crf and not plan.crf_in_model, resources.cluster_nodes())
    if problem:
        raise InputError(problem)
    if plan.guard is not None:  # Ray logs one E-level line about this from C++ (not filterable here)
        print("[segment] a Ray 'core_worker.cc ... max_restarts > 0' line may follow: expected; model actors "
              "restart after a crash and reload the model, which this run keeps in the object store", flush=True)
    return build_dataset(todo, plan, ray.put(model), batch_size=cfg.batch_size,
                         num_model_actors=cfg.num_model_actors, cpus_per_model_actor=cfg.cpus_per_model_actor,
                         crf_workers=cfg.crf_workers, gpu=gpu, write=write)


def _run(cfg: SegmentConfig, verbose: bool) -> SegmentReport:
    started = time.monotonic()
    cfg = cfg.model_copy(update={"input": absolute_uri(cfg.input),
                                 "output": absolute_uri(cfg.output).rstrip("/")})
    run_id = _new_run_id()
    # Everything that can make the whole run pointless is checked before Ray starts.
    runtime.check_available(cfg.runtime)
    if cfg.tracking_uri:
        tracking.check_reachable(cfg.tracking_uri, must_exist=tracking.is_registry_uri(cfg.model))
    check_access(cfg.output, cfg.storage_options)
    with lease.acquire(cfg.output, run_id, cfg.storage_options, ttl_s=cfg.lease_ttl_s,
                       wait_s=cfg.lease_wait_s) as held:
        return _run_leased(cfg, verbose, run_id, held, started)


@dataclass
class Todo:
    item: InputItem
    attempts: int  # transient failures before this run
    error: ErrorRecord | None = None  # known before any worker sees it (an unusable id)


def select_work(cfg: SegmentConfig, listed: pa.Table, settled: pa.Table,
                made: provenance.MadeBy | None = None) -> list[Todo]:
    """The listed inputs this run processes (ledger.select, vectorised, then the redo rule of
    provenance.py against `made`, with its one line); only they become InputItems and have their
    ids checked (checked_items): the rest count as skipped."""
    index = ledger.match(listed, settled)  # one hash lookup for the selection and the redo rule
    work, attempts = ledger.select(listed, settled, max_attempts=cfg.max_attempts, index=index,
                                   reprocess_changed=cfg.reprocess_changed, retry_errors=cfg.retry_errors)
    if cfg.redo == provenance.REDO_ALL:
        work, attempts = np.ones(listed.num_rows, bool), np.zeros(listed.num_rows, np.int64)
    elif made is not None:
        other = provenance.made_differently(listed, settled, made, index)
        if other.any():
            row = int(np.flatnonzero(other)[0])
            example = settled.take(index.slice(row, 1)).to_pylist()[0]
            print(provenance.redo_line(int(other.sum()), example, made, cfg.redo), flush=True)
            if cfg.redo == provenance.REDO_CHANGED:
                work = work | other
    rows = np.flatnonzero(work)
    return [Todo(item, int(attempts[row]), error) for row, (item, error) in zip(rows, checked_items(listed, rows))]


def _text(value: Any) -> str | None:
    """A string column's value; "" and the NaN Ray Data makes of an all-None column are None."""
    return value if isinstance(value, str) and value else None


class Recording:
    """The driver's side of the stream: each finished input's results row and ledger entry."""

    def __init__(self, cfg: SegmentConfig, run_id: str, model_uri: str, write: WriteSpec, held: lease.Lease,
                 todo: Sequence[Todo], made: provenance.MadeBy | None = None) -> None:
        self.cfg, self.run_id, self.model_uri, self.write, self.held = cfg, run_id, model_uri, write, held
        self.made = made
        self.by_id = {t.item.id: t for t in todo if t.error is None}
        self.recorder = ledger.RunRecorder(cfg.output, run_id, RESULTS_SCHEMA, cfg.storage_options,
                                           flush_s=cfg.checkpoint_every_s)

    def entry(self, todo: Todo, status: str, stage: str | None, reason: str | None, when: datetime) -> dict:
        item, made = todo.item, self.made
        return ledger.ledger_row(item.id, item.uri, item.size, item.etag, item.mtime, status, stage, reason,
                                 todo.attempts, self.cfg.max_attempts, self.run_id, when,
                                 model=made and made.model, settings=made and made.settings,
                                 crf_backend=self.write.crf_backend if status == STATUS_OK and self.write.crf else None)

    def known_errors(self, todo: Sequence[Todo]) -> None:
        now = datetime.now(timezone.utc)
        self.recorder.add([error_row(t.error, self.run_id, self.model_uri) for t in todo],
                          [self.entry(t, "error", t.error.stage, t.error.reason, now) for t in todo])

    def __call__(self, batch: dict[str, Any]) -> None:
        self.held.check()  # a run whose lease was taken over stops before recording more
        spec, results, entries = self.write, [], []
        for i, record_id in enumerate(batch[ID]):
            todo = self.by_id[str(record_id)]
            ok = batch[STATUS][i] == STATUS_OK
            when = datetime.fromtimestamp(float(batch[FINISHED_AT][i]), tz=timezone.utc)
            crf = ok and spec.crf
            results.append({
                "id": todo.item.id, "uri": todo.item.uri, "output_uri": _text(batch[OUTPUT_URI][i]),
                "overlay_uri": _text(batch[OVERLAY_URI][i]), "status": str(batch[STATUS][i]),
                "classes": [int(c) for c in str(batch[CLASSES][i]).split(",") if c],
                "seconds_decode": float(batch[SECONDS_DECODE][i]),
                "seconds_model": float(batch[SECONDS_MODEL][i]) if ok else None,
                "seconds_crf": float(batch[SECONDS_CRF][i]) if crf else None,
                "crf_backend": spec.crf_backend if crf else None, "run_id": self.run_id,
                "model_uri": self.model_uri, "finished_at": when,
                "crf_source": spec.crf_source if crf else None, "crf_params": spec.crf_params if crf else None,
            })
            stage, reason = (None, None) if ok else (_text(batch[ERROR_STAGE][i]), _text(batch[ERROR_REASON][i]))
            entries.append(self.entry(todo, str(batch[STATUS][i]), stage, reason, when))
        self.recorder.add(results, entries)


def _run_leased(cfg: SegmentConfig, verbose: bool, run_id: str, held: lease.Lease, started: float) -> SegmentReport:
    options = cfg.storage_options
    files = ledger.ledger_files(cfg.output, options)
    if files.pending:  # checkpoints of a killed run: settle them first (the lease says it is gone)
        ledger.fold_pending(cfg.output, files, RESULTS_SCHEMA, options)
        files = ledger.ledger_files(cfg.output, options)
    if not files.settled and migrate_to_ledger(cfg.output, run_id, options):
        files = ledger.ledger_files(cfg.output, options)
    settled = ledger.read_ledger(cfg.output, options, files)
    since = parse_time(cfg.since) if cfg.since not in (None, "last") else None
    listed = list_input_table(cfg.input, options, since=since, exclude_prefix=cfg.output)
    made = None
    paths = {"--input": cfg.input, "--output": cfg.output}
    if listed.num_rows:
        # Paths only this node sees (the settings, or a manifest's rows) are refused before
        # anything else; without RAY_ADDRESS (a local Ray of our own) this returns at once, on a
        # cluster it connects to count the nodes.
        check_shared_paths(paths, shared_fs=cfg.shared_fs,
                           uris=zip((f"input {i}" for i in listed["id"].to_pylist()), listed["uri"].to_pylist()))
    if listed.num_rows:
        # The model pinned and its CRF set resolved before selection: the redo rule compares them
        # with what made the settled outputs (a registry read; torch and Ray only for work).
        model_uri, _, _ = load_checked_model(cfg.model, options, load=False)
        with model_errors(cfg.model):  # the version's recipe and tuned CRF set are read from the registry
            cfg = recipe.applied(cfg, model_uri)
            crf_params, crf_source = crf_settings.for_model(cfg.crf_params, model_uri)
            made = provenance.MadeBy(
                provenance.model_identity(model_uri, options),
                provenance.settings_key(cfg.tta.scales, cfg.tta.flip, cfg.tta.fusion,
                                        crf_params if cfg.crf else None, cfg.overlays),
                None if cfg.crf_backend == "auto" or not cfg.crf else cfg.crf_backend)
    else:  # nothing listed: asks no registry, imports no torch and starts no Ray
        model_uri = cfg.model
        crf_params, crf_source = crf_settings.resolve(cfg.crf_params, None)
    todo = select_work(cfg, listed, settled, made)
    known_errors = [t for t in todo if t.error is not None]
    work = [t.item for t in todo if t.error is None]
    skipped = listed.num_rows - len(todo)
    retried = sum(1 for t in todo if t.attempts)
    print(f"[segment] run {run_id}: {listed.num_rows} input(s) from {redact_urls(cfg.input)}"
          + (f" modified since {since.isoformat()}" if since else "")
          + f"; {skipped} already settled, {len(known_errors)} unusable id(s), {len(work)} to segment"
          + (f" ({retried} retried after a transient error)" if retried else ""), flush=True)

    model, meta, shipped = None, {}, None
    if work:
        model_uri, model, meta = load_checked_model(model_uri, options)
        # What the model actors get: the model, or (--runtime onnx) its graph, exported and checked
        # once, here, before Ray starts.
        shipped = runtime.prepare(model, cfg.runtime)
    if work and (cfg.crf or cfg.evaluate):
        print(f"[segment] CRF parameters ({crf_source}): {crf_settings.params_json(crf_params)}", flush=True)
    gpu, guard, plan = False, None, None
    evaluate = cfg.evaluate and any(item.mask_uri for item in work)
    if cfg.evaluate and work and not evaluate:
        print("[segment] --eval: no ground-truth masks among the inputs (use a manifest with "
              "mask_uri); no evaluation", flush=True)
    # A run that died (its lease never released; a Ctrl-C or an error releases it) may have been
    # killed by one of these inputs: engine auto runs them under Ray's poison guard.
    engine = _engine(cfg, len(work), evaluate, held.previous_died) if work else None
    if work:
        if engine == engines.LOCAL:  # no Ray: no poison guard either (engine.py)
            gpu = engines.local_device(cfg.device) == "cuda"
        else:
            ensure_ray(verbose=verbose)
            guard = new_guard(cfg.crash_limit)  # its actor starts while the pipeline is planned
            gpu = use_gpu(cfg.device)
        runtime.check_device(cfg.runtime, gpu)
        plan = InferencePlan.for_model(
            model, meta, gpu=gpu, crf_backend=cfg.crf_backend, tta=cfg.tta, max_pixels=cfg.max_pixels,
            crf=cfg.crf, crf_params=crf_params, table=evaluate, score=False, overlays=cfg.overlays,
            max_input_pixels=cfg.max_input_pixels, storage_options=options, guard=guard,
            autocast=precision.autocast_for(cfg.precision, gpu, cfg.runtime), runtime=cfg.runtime)
    write = WriteSpec(cfg.output, run_id, model_uri, cfg.crf, cfg.overlays, cfg.overlay_alpha, options,
                      crf_backend=choose_backend(cfg.crf_backend, gpu), crf_source=crf_source,
                      crf_params=crf_settings.params_json(crf_params), guard=guard)
    recording = Recording(cfg, run_id, model_uri, write, held, todo, made)
    if known_errors:
        recording.known_errors(known_errors)
    if work:
        tally, evaluation, table, crf_backend = _segment(cfg, work, shipped, model_uri, plan, write, gpu,
                                                         on_batch=recording, engine=engine,
                                                         class_names=meta.get("class_names"))
    else:
        tally, evaluation, table, crf_backend = Tally(), None, None, None
    held.check()
    recording.recorder.finish()
    if recording.recorder.ledger:
        run_file = get_fs(join_uri(cfg.output, ledger.LEDGER_DIR, f"{run_id}.parquet"), options)[1]
        ledger.compact(cfg.output, run_id, [*files.settled, run_file], cfg.ledger_max_files, options)

    errors_by_stage = dict(tally.errors_by_stage)
    if known_errors:
        errors_by_stage["id"] = errors_by_stage.get("id", 0) + len(known_errors)
    report = SegmentReport(
        run_id=run_id, model_uri=model_uri, read=listed.num_rows, ok=tally.ok,
        errors=tally.errors + len(known_errors), skipped=skipped,
        seconds=time.monotonic() - started, stage_seconds=dict(tally.seconds),
        errors_by_stage=errors_by_stage, evaluation=evaluation, table=table, crf_backend=crf_backend,
        crf_source=crf_source if cfg.crf and todo else None,
        crf_params=crf_settings.as_params(crf_params) if cfg.crf and todo else None,
        engine=engine, runtime=cfg.runtime if work else None,
    )
    last_run = {k: v for k, v in asdict(report).items() if k not in ("evaluation", "table")}
    write_state(cfg.output, last_run, options)
    print(f"[segment] {report.summary_line()}", flush=True)
    if report.errors:
        print(f"[segment] errors by stage: {report.errors_by_stage} (see {join_uri(cfg.output, ERRORS_DIR)})",
              flush=True)
    if table:
        print("\n" + table + "\n", flush=True)
    if cfg.tracking_uri and todo:  # a tick with nothing to do leaves no MLflow run
        print(f"[segment] logged to MLflow run {log_run(cfg, report, crf_params, crf_source)}", flush=True)
    return report


def _engine(cfg: SegmentConfig, inputs: int, evaluate: bool, previous_died: bool) -> str:
    """The engine for this run's `inputs` (engine.choose), said in one line."""
    cpu_crf = False
    if cfg.engine == "auto" and (cfg.crf or evaluate):  # the CRF backend where the model would run here
        cpu_crf = choose_backend(cfg.crf_backend, engines.local_device(cfg.device) == "cuda") != "torch"
    engine, why = engines.choose(cfg.engine, inputs=inputs, local_max_inputs=cfg.local_max_inputs, cpu_crf=cpu_crf,
                                 local_max_crf_inputs=cfg.local_max_crf_inputs,
                                 attached=engines.attached_to_cluster(), previous_died=previous_died)
    print(engines.engine_line(engine, inputs, why), flush=True)
    return engine


def log_run(cfg: SegmentConfig, report: SegmentReport, crf_params: CRFParams, crf_source: str) -> str:
    """The run in MLflow: params (with the CRF set used and its source), counts, the evaluation
    metrics and table, the summary."""
    params = {
        "model": cfg.model, "model_resolved": report.model_uri, "input": cfg.input, "output": cfg.output,
        "scales": format_scales(cfg.tta.scales), "flip": cfg.tta.flip, "fusion": cfg.tta.fusion, "crf": cfg.crf,
        "max_pixels": cfg.max_pixels, "batch_size": cfg.batch_size, "since": cfg.since,
        "crf_backend": report.crf_backend, "engine": report.engine, "runtime": report.runtime,
        "crf_source": crf_source, **crf_settings.as_params(crf_params, "crf_"),
    }
    metrics = {"images_read": report.read, "images_ok": report.ok, "images_errors": report.errors,
               "images_skipped": report.skipped, "images_per_s": report.images_per_s, "seconds": report.seconds}
    texts = {}
    for name, result in (report.evaluation or {}).items():
        key = METRIC_KEYS[name]
        metrics.update({f"mIoU_{key}": result["mIoU"], f"pixel_acc_{key}": result["pixel_acc"],
                        f"mean_acc_{key}": result["mean_acc"]})
    if report.table:
        texts["evaluation.md"] = report.table + "\n"
    import mlflow

    # The run spans the job (it is written at the end, started at the job's start), with the
    # input and the registered version it used linked on its page.
    run_id = tracking.log_finished_run(cfg.experiment, f"segment-{report.run_id}", params, metrics,
                                       texts=texts, dicts={"summary.json": asdict(report)},
                                       started_at=time.time() - report.seconds)
    try:
        tracking.log_dataset_inputs(mlflow.get_tracking_uri(), run_id, {"input": cfg.input})
        if report.model_uri.startswith("models:/"):
            tracking.log_model_input(run_id, report.model_uri)
    except mlflow.exceptions.MlflowException as err:
        # The links are a convenience: a user who may log runs but not edit the trainer's logged
        # model (MLflow basic-auth answers 403) still gets the run, masks and ledger.
        print(f"[segment] MLflow run {run_id} logged without its input/model links ({err.error_code})", flush=True)
    return run_id
