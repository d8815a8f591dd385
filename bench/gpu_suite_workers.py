"""bench/gpu_suite.py's measuring parts, run in child processes (`gpu_suite.py --worker ...`):
training throughput and MFU, the Ray Train row, the batch job's model stage, the profile. Each
appends its records to a JSON-lines file the parent watches, so a part killed for its time
budget loses only its own rows."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.gpu_suite_config import (
    ROOT,
    Config,
    TrainSpec,
    config_from_json,
    log,
    peak_bf16_tflops,
)

# --------------------------------------------------------------------------- workers (child processes)


class Recorder:
    """Appends one JSON line per record, flushed at once, so rows survive a later kill."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def environment(device: str) -> dict:
    import torch

    info = {"type": "env", "torch": torch.__version__, "python": platform.python_version(),
            "device": device, "device_name": platform.processor() or platform.machine(),
            "cuda": torch.version.cuda, "cudnn": None}
    if device == "cuda":
        info.update(device_name=torch.cuda.get_device_name(), cudnn=torch.backends.cudnn.version())
    return info


def _synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def peak_memory(device: str) -> Iterator[Callable[[], float | None]]:
    """Yields a function returning the peak allocated MiB since entry (None on CPU)."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    yield lambda: torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None


def _free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_training(spec: TrainSpec, cfg: Config, batch: int, peak: float | None) -> dict:
    """Throughput of the plain loop's step; FLOPs of one counted forward+backward (the first
    warm-up step). bf16 + channels_last as the training job runs on a GPU (here also on CPU)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bench.gpu_path import prepare_for_training, synthetic_batch, train_iteration
    from deeplab_core.losses import SegmentationLoss

    device = cfg.device
    model = prepare_for_training(spec.model.build(), device, channels_last=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    images, masks = (t.to(device) for t in synthetic_batch(batch, spec.crop, spec.crop))
    step = {"bf16": True, "channels_last": True, "criterion": SegmentationLoss()}
    with FlopCounterMode(display=False) as counter:
        train_iteration(model, images, masks, optimizer, **step)
    flops = counter.get_total_flops()
    for _ in range(spec.warmup - 1):
        train_iteration(model, images, masks, optimizer, **step)
    with peak_memory(device) as peak_mib:
        _synchronize(device)
        start, steps = time.perf_counter(), 0
        while steps < spec.steps and (steps == 0 or time.perf_counter() - start < spec.max_timed_s):
            train_iteration(model, images, masks, optimizer, **step)
            steps += 1
        _synchronize(device)
        seconds = (time.perf_counter() - start) / steps
        mib = peak_mib()
    tflops = flops / seconds / 1e12
    return {"images_per_s": batch / seconds, "ms": 1e3 * seconds, "tflops": tflops,
            "mfu_pct": None if peak is None else 100 * tflops / peak, "peak_mib": mib,
            "note": f"{steps} timed steps after {spec.warmup} warm-up; {flops / batch / 1e9:.3g} GFLOP per image "
                    f"(counted fwd+bwd)" + ("" if peak else "; no bf16 peak known for this device: MFU -")}


def worker_train(cfg: Config, record: Recorder) -> None:
    import torch

    device_name = torch.cuda.get_device_name() if cfg.device == "cuda" else "cpu"
    peak = cfg.peak_tflops or (peak_bf16_tflops(device_name) if cfg.device == "cuda" else None)
    for spec in cfg.train:
        batch, notes, result = spec.batch, [], None
        while result is None:
            try:
                result = measure_training(spec, cfg, batch, peak)
            except torch.cuda.OutOfMemoryError:  # fall back to the largest batch that fits
                if batch <= 2:
                    raise
                notes.append(f"batch {batch} out of memory, ran {batch // 2}")
                batch //= 2
            _free_device_memory()  # outside the except block: its traceback holds the tensors
        result["note"] = "; ".join([*notes, result["note"]])
        record({"type": "row", "key": spec.key, "status": "ok", **result})
        log(f"{spec.key}: {result['images_per_s']:.1f} images/s")


def worker_ray(cfg: Config, record: Recorder) -> None:
    """bench/train_throughput.py's plain loop and its Ray Train path, same arguments."""
    import ray

    from bench import train_throughput as tt

    spec = cfg.train[0]
    args = argparse.Namespace(arch=spec.model.arch, backbone=spec.model.backbone, width_mult=spec.model.width_mult or 1.0,
                              crop=spec.crop, batch=spec.batch, steps=spec.steps, warmup=spec.warmup,
                              threads=cfg.threads, device=cfg.device, bf16=True, tmp=tempfile.mkdtemp())
    plain = tt.run_plain(args)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=max(2, os.cpu_count() or 1), logging_level="ERROR", include_dashboard=False)
    try:
        on_ray = tt.run_ray(args, use_data=False)
    finally:
        ray.shutdown()
    record({"type": "row", "key": "ray-train", "status": "ok", "images_per_s": on_ray,
            "note": f"ratio Ray Train / plain = {on_ray / plain:.3f} (plain {plain:.2f} images/s, same code)"})


def worker_segment(cfg: Config, record: Recorder) -> None:
    from bench.gpu_path import model_stage_outputs, prime_batchnorm, synthetic_batch
    from deeplab_core.constants import DEFAULT_SCALES, CRFParams
    from deeplab_core.synthetic import SyntheticSpec, render_scene

    s, device = cfg.segment, cfg.device
    model = s.model.build().to(device)
    prime_batchnorm(model, synthetic_batch(2, s.height, s.width)[0].to(device))  # keeps activations in range
    images = [render_scene(SyntheticSpec(height=s.height, width=s.width), seed)[0] for seed in range(8)]
    variants = {"plain": ((1.0,), False, None), "ms-flip": (DEFAULT_SCALES, True, None),
                "ms-flip-crf": (DEFAULT_SCALES, True, CRFParams())}
    precision = "bf16 autocast" if device == "cuda" else "fp32"
    rates: dict[str, float] = {}
    for key, (scales, flip, crf) in variants.items():
        def run(i: int, scales=scales, flip=flip, crf=crf) -> None:
            batch = [images[(i * s.batch + j) % len(images)] for j in range(s.batch)]
            model_stage_outputs(model, batch, scales, flip, crf=crf)

        run(0)  # warm-up: kernels for these sizes
        with peak_memory(device) as peak_mib:
            start, done = time.perf_counter(), 0
            while done < s.images[key] and (done == 0 or time.perf_counter() - start < s.max_timed_s):
                run(done // s.batch)
                done += s.batch
            seconds = time.perf_counter() - start  # synchronised: results reach the host
            mib = peak_mib()
        rates[key] = done / seconds
        note = f"{done} images, {precision} (predict_probs' default), probabilities to the host as ModelStage"
        if key != "plain":
            note += f"; {rates['plain'] / rates[key]:.1f}x the plain cost"
        if crf is not None:
            note += f"; CRF adds {1e3 * (1 / rates[key] - 1 / rates['ms-flip']):.0f} ms/image"
        record({"type": "row", "key": key, "status": "ok", "images_per_s": rates[key], "ms": 1e3 * seconds / done,
                "peak_mib": mib, "note": note})
        log(f"segment {key}: {rates[key]:.2f} images/s")


def worker_profile(cfg: Config, record: Recorder) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.gpu_path import prepare_for_training, synthetic_batch, train_iteration
    from deeplab_core.losses import SegmentationLoss

    device = cfg.device
    model = prepare_for_training(cfg.profile_model.build(), device, channels_last=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    images, masks = (t.to(device) for t in synthetic_batch(cfg.profile_batch, cfg.profile_crop, cfg.profile_crop))
    step = {"bf16": True, "channels_last": True, "criterion": SegmentationLoss()}
    for _ in range(2):
        train_iteration(model, images, masks, optimizer, **step)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            train_iteration(model, images, masks, optimizer, **step)
        _synchronize(device)
    sort = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=30)
    out_dir = Path(cfg.out_dir or ROOT / "outputs")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "gpu_suite_profile.txt"
    path.write_text(f"{cfg.profile_model.name}, {cfg.profile_crop}x{cfg.profile_crop}, batch {cfg.profile_batch}, "
                    f"3 training steps after 2 warm-up, sorted by {sort}\n\n{table}\n")
    events = prof.key_averages()
    total = sum(getattr(e, sort) for e in events) or 1
    top = max(events, key=lambda e: getattr(e, sort))
    record({"type": "row", "key": "profile", "status": "ok", "note": f"key_averages table in {path.name} "
            f"({'$OUT' if cfg.out_dir else path}); top op by {sort}: {top.key} "
            f"({100 * getattr(top, sort) / total:.0f} %)"})


WORKERS: dict[str, Callable[[Config, Recorder], None]] = {
    "train": worker_train, "ray": worker_ray, "segment": worker_segment, "profile": worker_profile,
}


def run_worker(names: str, config_path: str, results_path: str) -> int:
    """Runs the named parts in turn, announcing each (the parent times them). Exit status 3 after
    a part raised: the parent continues in a fresh process."""
    import traceback

    import torch

    cfg = config_from_json(json.loads(Path(config_path).read_text()))
    if cfg.device == "cpu":
        torch.set_num_threads(cfg.threads)
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    record = Recorder(Path(results_path))
    record(environment(cfg.device))
    for name in names.split(","):
        record({"type": "start", "part": name, "time": time.time()})
        try:
            WORKERS[name](cfg, record)
        except Exception as err:  # noqa: BLE001 - reported as the part's rows, then a fresh process
            traceback.print_exc()
            record({"type": "error", "part": name, "message": f"{type(err).__name__}: {err}"[:300]})
            return 3
        record({"type": "end", "part": name, "time": time.time()})
    return 0


