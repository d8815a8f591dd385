"""Training throughput: our Ray Train step against a plain PyTorch loop, in the same run.

Rows (same model, batch, crop, optimizer, thread count):
  plain-torch    one process, data already in memory                         (the baseline)
  ray-train      TorchTrainer, 1 worker, the same in-memory data               -> Ray Train overhead
  ray-train+data TorchTrainer, 1 worker, batches from Ray Data (materialised)  -> + ingestion overhead

    python bench/train_throughput.py                         # CPU, tiny DeepLabv3+ (MobileNetV2)
    python bench/train_throughput.py --device cuda --bf16 --arch deeplabv3plus --backbone resnet101 --crop 513
    python bench/train_throughput.py --output docs/benchmarks.md

On CUDA it also reports model FLOP utilisation (forward FLOPs x 3 for forward + backward, over
the GPU's dense bf16 peak).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import replace_section  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10G": 125.0}


def make_model(args):
    from deeplab_core import build_model

    opts = {"width_mult": args.width_mult} if args.backbone == "mobilenetv2" else {}
    return build_model(args.arch, backbone=args.backbone, num_classes=21, output_stride=16, **opts)


def make_batch(args, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(args.batch, 3, args.crop, args.crop, generator=g)
    masks = torch.randint(0, 21, (args.batch, args.crop, args.crop), generator=g)
    return images, masks


def train_steps(model, batches, args, device) -> tuple[float, int]:
    """Runs warm-up + timed steps; returns (seconds, images) for the timed part."""
    from deeplab_core import SegmentationLoss

    model = model.to(device).train()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = SegmentationLoss()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    images_done, start = 0, None
    for step, (images, masks) in enumerate(batches):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
        with autocast:
            loss = loss_fn(model(images), masks)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= args.warmup:
            images_done += images.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, images_done


def in_memory_batches(args):
    images, masks = make_batch(args)
    return [(images, masks)] * (args.warmup + args.steps)


def run_plain(args) -> float:
    torch.set_num_threads(args.threads)
    seconds, n = train_steps(make_model(args), in_memory_batches(args), args, torch.device(args.device))
    return n / seconds


def _ray_loop(config):
    import ray.train
    import ray.train.torch

    args = config["args"]
    torch.set_num_threads(args.threads)
    device = ray.train.torch.get_device() if args.device == "cuda" else torch.device("cpu")
    model = ray.train.torch.prepare_model(make_model(args), move_to_device=False)
    if config["use_data"]:
        shard = ray.train.get_dataset_shard("train")
        batches = ((b["image"], b["mask"]) for b in shard.iter_torch_batches(batch_size=args.batch, drop_last=True))
    else:
        batches = in_memory_batches(args)
    seconds, n = train_steps(model, batches, args, device)
    # Train V2 surfaces metrics on the Result only through reports that carry a checkpoint.
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "throughput.txt").write_text(str(n / seconds))
        ray.train.report({"images_per_s": n / seconds}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def run_ray(args, use_data: bool) -> float:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    datasets = None
    if use_data:
        images, masks = make_batch(args)
        reps = args.warmup + args.steps
        ds = ray.data.from_items([{"image": images[i % args.batch].numpy(), "mask": masks[i % args.batch].numpy()}
                                  for i in range(reps * args.batch)]).materialize()
        datasets = {"train": ds}
    trainer = TorchTrainer(
        _ray_loop, train_loop_config={"args": args, "use_data": use_data},
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=args.device == "cuda",
                                               resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(storage_path=str(Path(args.tmp).resolve()), name=f"bench-{use_data}-{time.time_ns()}"),
        datasets=datasets,
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return result.metrics["images_per_s"]


def mfu(args, images_per_s: float) -> str:
    if args.device != "cuda":
        return "-"
    from torch.utils.flop_counter import FlopCounterMode

    model = make_model(args).to("cuda").eval()
    x = torch.randn(1, 3, args.crop, args.crop, device="cuda")
    with FlopCounterMode(display=False) as counter, torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(x)
    train_flops = 3 * counter.get_total_flops()  # forward + backward ~ 3x forward
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    if peak is None:
        return f"? ({name})"
    return f"{100 * train_flops * images_per_s / (peak * 1e12):.1f}%"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="deeplabv3plus")
    p.add_argument("--backbone", default="mobilenetv2")
    p.add_argument("--width-mult", type=float, default=1.0)
    p.add_argument("--crop", type=int, default=129)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--no-ray", action="store_true", help="only the plain loop (e.g. on a GPU box without Ray)")
    p.add_argument("--tmp", default="/tmp/deeplab_bench")
    p.add_argument("--output", help="write the table into this Markdown file (section 'Training throughput')")
    args = p.parse_args(argv)

    rows = [("plain-torch (baseline)", run_plain(args))]
    if not args.no_ray:
        import ray

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=max(4, os.cpu_count() or 1), logging_level="ERROR", include_dashboard=False)
        rows.append(("ray-train (in-memory data)", run_ray(args, use_data=False)))
        rows.append(("ray-train + ray-data", run_ray(args, use_data=True)))
        ray.shutdown()
    base = rows[0][1]
    setup = (f"{args.arch}/{args.backbone} crop {args.crop} batch {args.batch}, {args.steps} steps after "
             f"{args.warmup} warm-up, device {args.device}{' bf16' if args.bf16 else ''}, {args.threads} thread(s)")
    lines = [f"Setup: {setup}.", "", "| pipeline | images/s | ratio vs plain | MFU |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {ips:.2f} | {ips / base:.3f} | {mfu(args, ips)} |" for name, ips in rows]
    table = "\n".join(lines)
    print(table)
    if args.output:
        command = "python bench/train_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
        replace_section(args.output, "Training throughput", f"Command: `{command}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
