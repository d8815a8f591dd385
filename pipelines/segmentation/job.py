"""Batch segmentation on Ray Data: multi-scale + flip inference, dense CRF, idempotent outputs.

Stages (streaming: every stage runs while the others do; see stages.py)::

    list prefix / read manifest  (driver)     ids checked, --since filter, finished ids skipped
      -> read + decode           CPU tasks    bad input becomes an error row, never a crash
      -> model                   actor pool   predict_probs (scales, flip); GPU when present
      -> dense CRF               CPU tasks    separate processes (pydensecrf holds the GIL)
      -> write                   CPU tasks    masks, overlays, then the batch's results/errors

Output layout and the idempotency contract: io.py.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, replace
from datetime import datetime, timezone
from typing import Any

from deeplab_core.constants import CRFParams
from pipelines import tracking
from pipelines.common.cluster_paths import check_shared_paths
from pipelines.common.ray_session import ensure_ray, use_gpu
from pipelines.common.errors import InputError
from pipelines.data.storage import absolute_uri, check_access, join_uri, redact_urls
from pipelines.segmentation import crf_settings
from pipelines.segmentation.config import SegmentConfig
from pipelines.segmentation.io import (
    ERRORS_DIR,
    InputItem,
    error_row,
    finished_ids,
    list_inputs,
    parse_time,
    read_state,
    write_parts,
    write_state,
)
from pipelines.segmentation.report import (
    METRIC_KEYS,
    SegmentReport,
    Tally,
    consume,
    evaluation_table,
    format_scales,
)
from pipelines.segmentation.stages import (
    InferencePlan,
    ModelStage,
    WriteSpec,
    crf_stage,
    decode_stage,
    normalisation_of,
    num_classes_of,
    summary_columns,
    write_stage,
)


def build_dataset(items: Sequence[InputItem], plan: InferencePlan, model_ref, *, batch_size: int,
                  num_model_actors: int, cpus_per_model_actor: float, crf_workers: int, gpu: bool,
                  write: WriteSpec | None):
    """The Ray Data pipeline over ``items``; its rows are per-image summaries (no pixels)."""
    import ray.data

    rows = [asdict(item) for item in items]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), math.ceil(len(rows) / batch_size))))
    # 0.5 CPU: unequal resources keep Ray Data from fusing the decode into the model actors,
    # so decoding overlaps inference instead of running inside the actor.
    ds = ds.map_batches(decode_stage, fn_kwargs={"plan": plan}, batch_size=batch_size,
                        batch_format="numpy", num_cpus=0.5)
    model_resources = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": cpus_per_model_actor}
    ds = ds.map_batches(
        ModelStage,
        fn_constructor_kwargs={"model_ref": model_ref, "plan": plan, "device": "cuda" if gpu else "cpu",
                               "num_threads": int(max(1, cpus_per_model_actor))},
        compute=ray.data.ActorPoolStrategy(size=num_model_actors),
        batch_size=batch_size, batch_format="numpy", **model_resources,
    )
    if plan.run_crf and not plan.crf_in_model:
        ds = ds.map_batches(crf_stage, fn_kwargs={"plan": plan}, batch_size=batch_size,
                            batch_format="numpy", num_cpus=1,
                            compute=ray.data.TaskPoolStrategy(size=crf_workers))
    if write is not None:
        ds = ds.map_batches(write_stage, fn_kwargs={"spec": write}, batch_size=batch_size,
                            batch_format="numpy", num_cpus=0.25)
    return ds.select_columns(summary_columns(plan))


def _since(cfg: SegmentConfig, state: Mapping[str, Any]) -> datetime | None:
    if cfg.since is None:
        return None
    if cfg.since == "last":
        return parse_time(state["watermark"]) if state.get("watermark") else None
    return parse_time(cfg.since)


def crf_backend_for(setting: str, gpu: bool) -> str:
    """`auto`: the torch CRF where the model runs on a GPU (probabilities stay on the device, no
    CPU CRF stage); pydensecrf on CPU, where bench/crf.py measures it 3-7x faster per CPU-second."""
    if setting != "auto":
        return setting
    return "torch" if gpu else "pydensecrf"


def make_plan(cfg: SegmentConfig, model, meta: Mapping[str, Any], *, table: bool, score: bool,
              gpu: bool = False, crf_params: CRFParams | None = None) -> InferencePlan:
    """The plan; `crf_params` None: the config's own fields over the defaults (no tuned set)."""
    mean, std = normalisation_of(meta, model)
    if crf_params is None:
        crf_params, _ = crf_settings.resolve(cfg.crf_params, None)
    return InferencePlan(
        num_classes=num_classes_of(model), mean=mean, std=std, scales=tuple(cfg.scales), flip=cfg.flip,
        fusion=cfg.fusion, max_pixels=cfg.max_pixels, crf=cfg.crf, crf_params=crf_params,
        crf_backend=crf_backend_for(cfg.crf_backend, gpu),
        table=table, score=score, overlays=cfg.overlays, max_input_pixels=cfg.max_input_pixels,
        storage_options=cfg.storage_options,
    )


def run_segmentation(cfg: SegmentConfig, verbose: bool = False) -> SegmentReport:
    """Runs the job; returns (and prints) the report. See the module docstring. Raises InputError
    (before Ray starts) for an input, output, model or tracking server that cannot be used."""
    with tracking.tracking_uri_set(cfg.tracking_uri):
        return _run(cfg, verbose)


def _new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def resolve_model(uri: str) -> str:
    """A registry alias pinned to its version (every actor loads the same one); paths absolute."""
    return tracking.resolve_model_uri(uri) if tracking.is_registry_uri(uri) else absolute_uri(uri)


@contextmanager
def _model_errors(uri: str) -> Iterator[None]:
    """Any failure to find or load the model as one InputError naming it (redacted) and why."""
    try:
        yield
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - missing, truncated, unknown alias, not a checkpoint
        reason = redact_urls(" ".join(str(getattr(err, "message", err)).split()))[:300] or type(err).__name__
        raise InputError(f"cannot load model {redact_urls(uri)}: {reason}") from None


def choose_crf_params(cfg: SegmentConfig, model_uri: str) -> tuple[CRFParams, str]:
    """The CRF parameters of the run and their source: a registered version's tuned set (tags
    from pipelines/tune_crf.py) under the user's explicit fields, else defaults + explicit."""
    tuned = None
    if model_uri.startswith("models:/"):
        tuned = crf_settings.tuned_from_tags(tracking.model_version_tags(model_uri))
    return crf_settings.resolve(cfg.crf_params, tuned)


def load_checked_model(uri: str, storage_options: Mapping[str, Any] | None,
                       load: bool = True) -> tuple[str, Any, dict]:
    """(pinned URI, model, meta); with `load=False` only the URI is checked and pinned."""
    from pipelines.common.checkpoints import load_model

    with _model_errors(uri):
        model_uri = resolve_model(uri)
        model, meta = load_model(model_uri, storage_options=storage_options) if load else (None, {})
    return model_uri, model, meta


def _segment(cfg: SegmentConfig, todo: Sequence[InputItem], model, meta: Mapping[str, Any], model_uri: str,
             write: WriteSpec, crf_params: CRFParams) -> tuple[Tally, dict | None, str | None, str | None]:
    """Runs the stages over `todo`: the tally, the evaluation (metrics, table) with --eval, and
    the CRF backend that ran."""
    import ray

    evaluate = cfg.evaluate and any(item.mask_uri for item in todo)
    if cfg.evaluate and not evaluate:
        print("[segment] --eval: no ground-truth masks among the inputs (use a manifest with "
              "mask_uri); no evaluation", flush=True)
    gpu = use_gpu(cfg.device)
    plan = make_plan(cfg, model, meta, table=evaluate, score=False, gpu=gpu, crf_params=crf_params)
    write = replace(write, crf_backend=plan.crf_backend)
    crf = f"CRF {plan.crf_backend}" + (" (in the model actor)" if plan.crf_in_model else "") if plan.run_crf else "no CRF"
    print(f"[segment] model {model_uri} ({plan.num_classes} classes) on {'GPU' if gpu else 'CPU'}; "
          f"scales {format_scales(cfg.scales)}, flip {cfg.flip}, {crf}", flush=True)
    ds = build_dataset(todo, plan, ray.put(model), batch_size=cfg.batch_size,
                       num_model_actors=cfg.num_model_actors, cpus_per_model_actor=cfg.cpus_per_model_actor,
                       crf_workers=cfg.crf_workers, gpu=gpu, write=write)
    tally = consume(ds, len(todo), cfg.progress_every_s)
    backend = plan.crf_backend if plan.run_crf else None
    if not evaluate:
        return tally, None, None, backend
    evaluation, table = evaluation_table(tally, cfg, tally.scored, crf_params.iterations)
    return tally, evaluation, table, backend


def _newest(*times: datetime | None) -> datetime | None:
    present = [t for t in times if t is not None]
    return max(present) if present else None


def _run(cfg: SegmentConfig, verbose: bool) -> SegmentReport:
    started = time.monotonic()
    cfg = cfg.model_copy(update={"input": absolute_uri(cfg.input),
                                 "output": absolute_uri(cfg.output).rstrip("/")})
    options = cfg.storage_options
    run_id = _new_run_id()
    # Everything that can make the whole run pointless is checked before Ray starts.
    if cfg.tracking_uri:
        tracking.check_reachable(cfg.tracking_uri, must_exist=tracking.is_registry_uri(cfg.model))
    check_access(cfg.output, options)

    state = read_state(cfg.output, options)
    since = _since(cfg, state)
    listing = list_inputs(cfg.input, options, since=since, exclude_prefix=cfg.output)
    done = finished_ids(cfg.output, options)
    todo = [item for item in listing.items if item.id not in done]
    # The decode and write tasks may run on any node: refuse paths only this node sees.
    check_shared_paths({"--input": cfg.input, "--output": cfg.output}, shared_fs=cfg.shared_fs,
                       uris=((f"input {item.id}", item.uri) for item in todo))
    skipped = len(listing.items) - len(todo)
    print(f"[segment] run {run_id}: {listing.read} input(s) from {redact_urls(cfg.input)}"
          + (f" modified since {since.isoformat()}" if since else "")
          + f"; {skipped} already done, {len(listing.errors)} unusable id(s), {len(todo)} to segment",
          flush=True)

    model_uri, model, meta = load_checked_model(cfg.model, options, load=bool(todo))
    with _model_errors(cfg.model):  # the version's tuned CRF set is read from the registry
        crf_params, crf_source = choose_crf_params(cfg, model_uri)
    if todo and (cfg.crf or cfg.evaluate):
        print(f"[segment] CRF parameters ({crf_source}): {crf_settings.params_json(crf_params)}", flush=True)
    write = WriteSpec(cfg.output, run_id, model_uri, cfg.crf, cfg.overlays, cfg.overlay_alpha, options,
                      crf_source=crf_source, crf_params=crf_settings.params_json(crf_params))
    if listing.errors:
        rows = [error_row(e, run_id, model_uri) for e in listing.errors]
        write_parts(cfg.output, run_id, rows, listing.errors, options)
    if todo:
        ensure_ray(verbose=verbose)
        tally, evaluation, table, crf_backend = _segment(cfg, todo, model, meta, model_uri, write, crf_params)
    else:
        tally, evaluation, table, crf_backend = Tally(), None, None, None

    previous = parse_time(state["watermark"]) if state.get("watermark") else None
    watermark = _newest(listing.watermark, previous)
    errors_by_stage = dict(tally.errors_by_stage)
    if listing.errors:
        errors_by_stage["id"] = errors_by_stage.get("id", 0) + len(listing.errors)
    report = SegmentReport(
        run_id=run_id, model_uri=model_uri, read=listing.read, ok=tally.ok,
        errors=tally.errors + len(listing.errors), skipped=skipped,
        seconds=time.monotonic() - started, stage_seconds=dict(tally.seconds),
        errors_by_stage=errors_by_stage, evaluation=evaluation, table=table,
        watermark=watermark.isoformat() if watermark else None, crf_backend=crf_backend,
        crf_source=crf_source if cfg.crf else None, crf_params=asdict(crf_params) if cfg.crf else None,
    )
    last_run = {k: v for k, v in asdict(report).items() if k not in ("evaluation", "table")}
    write_state(cfg.output, report.watermark, last_run, options)
    print(f"[segment] {report.summary_line()}", flush=True)
    if report.errors:
        print(f"[segment] errors by stage: {report.errors_by_stage} (see {join_uri(cfg.output, ERRORS_DIR)})",
              flush=True)
    if table:
        print("\n" + table + "\n", flush=True)
    if cfg.tracking_uri and (todo or listing.errors):  # a tick with nothing to do leaves no MLflow run
        print(f"[segment] logged to MLflow run {log_run(cfg, report, crf_params, crf_source)}", flush=True)
    return report


def log_run(cfg: SegmentConfig, report: SegmentReport, crf_params: CRFParams, crf_source: str) -> str:
    """The run in MLflow: params (with the CRF set used and its source), counts, the evaluation
    metrics and table, the summary."""
    params = {
        "model": cfg.model, "model_resolved": report.model_uri, "input": cfg.input, "output": cfg.output,
        "scales": format_scales(cfg.scales), "flip": cfg.flip, "fusion": cfg.fusion, "crf": cfg.crf,
        "max_pixels": cfg.max_pixels, "batch_size": cfg.batch_size, "since": cfg.since,
        "crf_backend": report.crf_backend,
        "crf_source": crf_source, **{f"crf_{k}": v for k, v in asdict(crf_params).items()},
    }
    metrics = {"images_read": report.read, "images_ok": report.ok, "images_errors": report.errors,
               "images_skipped": report.skipped, "images_per_s": report.images_per_s, "seconds": report.seconds}
    texts = {}
    for name, result in (report.evaluation or {}).items():
        key = METRIC_KEYS[name]
        metrics.update({f"mIoU_{key}": result["mIoU"], f"pixel_acc_{key}": result["pixel_acc"]})
    if report.table:
        texts["evaluation.md"] = report.table + "\n"
    return tracking.log_finished_run(cfg.experiment, f"segment-{report.run_id}", params, metrics,
                                     texts=texts, dicts={"summary.json": asdict(report)})
