"""The Ray Train per-worker loop: DDP DeepLab training with the poly schedule.

Each worker reads its shard of the Ray Data pipeline (`get_dataset_shard`), trains with SGD and
the per-iteration poly LR (head LR x10), validates with a confusion matrix summed over all workers,
and reports metrics + a checkpoint through `ray.train.report`. Rank 0 alone writes checkpoints and
MLflow records. A restarted run (same storage path + name, or after a worker died) continues from
`ray.train.get_checkpoint()`: model, optimizer, scheduler, iteration and RNG state.
"""

from __future__ import annotations

import logging
import math
import random
import re
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from deeplab_core import PolyLRScheduler, SegmentationLoss, build_model, param_groups
from deeplab_core.metrics import confusion_matrix, segmentation_metrics
from deeplab_core.transforms import normalize
from pipelines.data.checkpoints import (
    MODEL_FILE,
    TRAIN_STATE_FILE,
    model_payload,
    unwrap,
)
from pipelines.common.errors import remember_failure
from pipelines.tracking import RunLogger
from pipelines.training.config import TrainConfig

LOOP_CONFIG_REF = "loop_config_ref"  # train_loop_config key of the unredacted config's ObjectRef

# Not print(): Ray Train V2 turns a worker's print into a log record *and* (its stdout being
# redirected) a second copy of the line; a logger reaches the driver once.
log = logging.getLogger(__name__)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    backbone, head = param_groups(model)
    o = cfg.optim
    groups = [{"params": backbone, "lr": o.base_lr}, {"params": head, "lr": o.base_lr * o.head_lr_mult}]
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.base_lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(groups, lr=o.base_lr, momentum=o.momentum, weight_decay=o.weight_decay)


def save_training_checkpoint(directory: Path, model: nn.Module, optimizer, scheduler, iteration: int,
                             meta: dict) -> None:
    torch.save(model_payload(model, meta), directory / MODEL_FILE)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "iteration": iteration, "torch_rng": torch.get_rng_state(),
                "python_rng": list(random.getstate()[1])}, directory / TRAIN_STATE_FILE)


def restore_training_checkpoint(directory: Path, model: nn.Module, optimizer, scheduler, max_it: int) -> int:
    payload = torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True)
    unwrap(model).load_state_dict(payload["model"])
    state = torch.load(directory / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    # The schedule length is the current config's (a resumed run may have been given more iterations).
    scheduler.max_it = max_it
    torch.set_rng_state(state["torch_rng"])
    random.setstate((3, tuple(state["python_rng"]), None))
    return int(state["iteration"])


def _older_checkpoints(checkpoint: ray.train.Checkpoint) -> list[ray.train.Checkpoint]:
    """The run's other checkpoints, newest first (their directory names sort by time)."""
    import pyarrow.fs as pafs

    parent, name = checkpoint.path.rstrip("/").rsplit("/", 1)
    infos = checkpoint.filesystem.get_file_info(pafs.FileSelector(parent))
    older = sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                    and i.base_name.startswith("checkpoint_") and i.base_name < name), reverse=True)
    return [ray.train.Checkpoint(path, filesystem=checkpoint.filesystem) for path in older]


def restore_newest_intact(checkpoint: ray.train.Checkpoint, model: nn.Module, optimizer, scheduler,
                          max_it: int) -> int:
    """Restores the latest checkpoint, or - if its files are truncated or corrupt - the newest
    intact earlier one, naming each bad one; the iteration to continue from."""
    for candidate in [checkpoint, *_older_checkpoints(checkpoint)]:
        try:
            with candidate.as_directory() as directory:
                return restore_training_checkpoint(Path(directory), model, optimizer, scheduler, max_it)
        except Exception as err:  # noqa: BLE001 - a bad file must not end a resumable run
            log.warning("[train] checkpoint %s cannot be loaded (%s: %s); trying the one before it",
                        candidate.path, type(err).__name__, str(err)[:200])
    raise RuntimeError(f"no checkpoint of this run can be loaded (latest: {checkpoint.path}); remove the "
                       "broken checkpoint_* directories or start a new run.name")


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def evaluate_shard(model: nn.Module, shard, cfg: TrainConfig, device: torch.device,
                   keep_examples: int = 0) -> tuple[np.ndarray, list]:
    """Confusion matrix over this worker's validation shard, summed over all workers."""
    num_classes = cfg.model.num_classes
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    examples = []
    model.eval()
    with torch.inference_mode():
        # Whole images of any size: one image per forward.
        for row in shard.iter_rows():
            if row.get("status", "ok") != "ok":
                continue
            image = normalize(row["image"], cfg.data.mean, cfg.data.std).unsqueeze(0).to(device)
            pred = unwrap(model)(image).argmax(1)[0].cpu()
            cm += torch.from_numpy(confusion_matrix(pred, torch.as_tensor(row["mask"]), num_classes))
            if len(examples) < keep_examples:
                examples.append((row["image"], pred.numpy().astype(np.uint8), row["mask"]))
    model.train()
    return _all_reduce(cm).numpy(), examples


def _log_validation_artifacts(tracker: RunLogger, cm: np.ndarray, examples: list, iteration: int,
                              class_names: list[str]) -> None:
    if not tracker.enabled:
        return
    from pipelines.training.figures import confusion_matrix_figure, overlay_grid

    with tempfile.TemporaryDirectory() as tmp:
        cm_path = Path(tmp) / f"confusion_matrix_it{iteration:06d}.png"
        confusion_matrix_figure(cm, cm_path, class_names)
        tracker.artifact(cm_path, "validation")
        if examples:
            grid_path = Path(tmp) / f"overlays_it{iteration:06d}.jpg"
            overlay_grid(examples, grid_path, class_names)
            tracker.artifact(grid_path, "validation")


def format_duration(seconds: float) -> str:
    """`42s`, `3m10s`, `2h05m`: short enough for a progress line."""
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_text(it: int, max_it: int, start_it: int, elapsed_s: float) -> str:
    """`it 230/1200 (19%)` and, once this run has made progress, `eta 3m10s` (from this run's
    own pace: a resumed run's earlier iterations took no time here)."""
    text = f"it {it}/{max_it} ({100 * it // max(max_it, 1)}%)"
    done = it - start_it
    if done > 0 and it < max_it:
        text += f" eta {format_duration(elapsed_s / done * (max_it - it))}"
    return text


def _quiet_worker_logs(verbose: bool) -> None:
    """Ray Train logs "Reporting training result N: TrainingReport(...)" at INFO from every
    worker at every report. LoggingConfig's level misses it: that module names its logger by
    file path (`getLogger(__file__)`), not `ray.train...`."""
    import importlib.util

    spec = importlib.util.find_spec("ray.train.v2._internal.execution.context")
    if not verbose and spec is not None and spec.origin:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)


def train_loop_per_worker(loop_config: dict) -> None:
    try:
        _train(loop_config)
    except Exception as err:
        # Ray hands the driver this exception without its chain: keep the innermost cause's line.
        remember_failure(err)
        raise


def _train(loop_config: dict) -> None:
    if LOOP_CONFIG_REF in loop_config:  # the unredacted config (build_trainer)
        loop_config = ray.get(loop_config[LOOP_CONFIG_REF])
    cfg = TrainConfig.model_validate(loop_config["train"])
    log.setLevel(logging.INFO)
    _quiet_worker_logs(loop_config.get("verbose", False))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    tracker = RunLogger(rank == 0, loop_config.get("tracking_uri"), loop_config.get("mlflow_run_id"))

    _seed_everything(cfg.run.seed + rank)
    model = build_model(**cfg.model.build_kwargs())
    if world > 1 and cfg.scaling.sync_bn and on_gpu:
        # Per-worker batches are small; unsynchronised BN statistics cost 1-2 mIoU. (PyTorch's
        # SyncBatchNorm is CUDA-only under DDP, so CPU runs keep per-worker BN.)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(model, cfg)
    scheduler = PolyLRScheduler(optimizer, cfg.optim.max_iters, cfg.optim.power,
                                cfg.optim.warmup_iters, cfg.optim.warmup_factor)
    start_it = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        start_it = restore_newest_intact(checkpoint, model, optimizer, scheduler, cfg.optim.max_iters)
        _seed_everything(cfg.run.seed + rank + 1_000_003 * start_it)  # fresh but reproducible
        tracker.resume()  # iterations redone since that checkpoint were logged the first time
        if rank == 0:
            log.info("[train] resumed from iteration %d", start_it)
    if on_gpu and cfg.scaling.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
    criterion = SegmentationLoss(aux_weight=cfg.optim.aux_weight, bootstrap_ratio=cfg.optim.bootstrap_ratio)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu and cfg.scaling.bf16 else nullcontext()

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    micro_batch, accum = cfg.per_worker_batch, cfg.optim.grad_accum
    max_it = cfg.optim.max_iters
    it = start_it
    t_run = time.perf_counter()
    window = {"loss": 0.0, "steps": 0, "data_s": 0.0, "step_s": 0.0}
    model.train()
    if start_it >= max_it:  # finished before: report the final state again so the run has a result
        _checkpoint(model, optimizer, scheduler, val_shard, cfg, device, tracker, it, start_it, rank, validate=True)
    while it < max_it:
        batches = train_shard.iter_torch_batches(batch_size=micro_batch, drop_last=True, device=device,
                                                 dtypes={"image": torch.float32, "mask": torch.int64})
        micro_step, t_data = 0, time.perf_counter()
        for batch in batches:
            t_start = time.perf_counter()
            window["data_s"] += t_start - t_data
            images, masks = batch["image"], batch["mask"]
            if on_gpu and cfg.scaling.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            micro_step += 1
            is_step = micro_step % accum == 0
            # Skip the DDP all-reduce on accumulation micro-steps.
            sync = nullcontext() if is_step or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                with autocast:
                    loss = criterion(model(images), masks) / accum
                loss.backward()
            window["loss"] += loss.item()
            if not is_step:
                t_data = time.perf_counter()
                continue
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lrs = [group["lr"] for group in optimizer.param_groups]  # backbone, head (x head_lr_mult)
            lr = lrs[0]
            scheduler.step()
            it += 1
            window["steps"] += 1
            window["step_s"] += time.perf_counter() - t_start
            if it % cfg.run.log_every == 0 or it == max_it:
                stats = torch.tensor([window["loss"] / window["steps"], window["data_s"], window["step_s"]])
                stats = _all_reduce(stats) / world
                elapsed = stats[1].item() + stats[2].item()
                images_per_s = window["steps"] * cfg.optim.batch_size / max(elapsed, 1e-9)
                values = {"loss": stats[0].item(), "lr": lr, "lr_head": lrs[-1], "images_per_s": images_per_s,
                          "data_wait_s": stats[1].item() / window["steps"]}
                tracker.metrics(values, it)
                if rank == 0:
                    progress = progress_text(it, max_it, start_it, time.perf_counter() - t_run)
                    log.info(f"[train] {progress} loss {values['loss']:.4f} lr {lr:.2e} "
                             f"{images_per_s:.1f} img/s data-wait {values['data_wait_s'] * 1e3:.0f} ms/it")
                window = {"loss": 0.0, "steps": 0, "data_s": 0.0, "step_s": 0.0}
            validate = it % cfg.run.val_every == 0 or it == max_it
            if validate or it % cfg.run.checkpoint_every == 0:
                _checkpoint(model, optimizer, scheduler, val_shard, cfg, device, tracker, it, start_it, rank,
                            validate=validate)
            if it >= max_it:
                break
            t_data = time.perf_counter()
        if micro_step < accum:  # a whole pass without one optimizer step would repeat forever
            raise RuntimeError(f"worker {rank}: a pass over its training shard gave {micro_step} batch(es) of "
                               f"{micro_batch}, fewer than one step ({accum}); the shard is too small")


def _sync_buffers(model: nn.Module) -> None:
    """Rank 0's BatchNorm running statistics on every rank. DDP broadcasts buffers at the start of
    each forward, so after the last step every rank holds statistics of its own batch; rank 0's
    copy is the one saved, so all ranks validate with it and the recorded metric is the saved
    model's (reproducible from the checkpoint)."""
    if dist.is_available() and dist.is_initialized():
        for buffer in unwrap(model).buffers():
            dist.broadcast(buffer, src=0)


def metric_name(class_name: str) -> str:
    """A class name as MLflow accepts it in a metric key (letters, digits, _ - . / and space)."""
    return re.sub(r"[^\w\-./ ]", "_", class_name).strip() or "unnamed"


def _validate(model, val_shard, cfg: TrainConfig, device, tracker: RunLogger, it: int, rank: int) -> dict:
    """Validation metrics on the whole validation set (all workers), logged by rank 0."""
    _sync_buffers(model)
    cm, examples = evaluate_shard(model, val_shard, cfg, device,
                                  keep_examples=cfg.run.num_overlays if rank == 0 else 0)
    scores = segmentation_metrics(cm)
    val = {f"val_{k}": v for k, v in scores.items() if k != "per_class_iou"}
    per_class = {f"val_iou_{metric_name(name)}": v
                 for name, v in zip(cfg.class_names, scores["per_class_iou"]) if v is not None}
    tracker.metrics({**val, **per_class}, it)
    _log_validation_artifacts(tracker, cm, examples, it, cfg.class_names)
    if rank == 0:
        log.info(f"[val] it {it} mIoU {val['val_mIoU']:.4f} pixel-acc {val['val_pixel_acc']:.4f}")
    return val


def _checkpoint(model, optimizer, scheduler, val_shard, cfg: TrainConfig, device, tracker: RunLogger,
                it: int, start_it: int, rank: int, validate: bool) -> None:
    """Reports a checkpoint (every worker calls this; rank 0 writes it), validated or not.
    Between validations (`run.checkpoint_every`) val_mIoU is NaN: Ray ranks such checkpoints
    below every validated one, so `keep_checkpoints` keeps the best validated ones plus the latest
    (which a restart resumes from)."""
    val = _validate(model, val_shard, cfg, device, tracker, it, rank) if validate else {"val_mIoU": math.nan}
    metrics = {**val, "iteration": it, "start_iteration": start_it}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            meta = {"iteration": it, "val": val, "mean": list(cfg.data.mean), "std": list(cfg.data.std),
                    "class_names": cfg.class_names, "num_classes": cfg.model.num_classes}
            save_training_checkpoint(Path(tmp), model, optimizer, scheduler, it, meta)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)
