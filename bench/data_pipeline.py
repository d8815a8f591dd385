"""Data pipeline throughput: decode + DeepLab train augmentation, images/s per CPU core.

Same VOC-sized inputs for every row (500x375 synthetic scenes, JPEG quality 90 + palette PNG
mask), same 513x513 crop and scale range, one thread (torch, OpenCV; PIL is single-threaded):

  torchvision-reference   PIL decode, torchvision's reference segmentation transforms, in a
                          torch DataLoader with num_workers=0                         (baseline)
  ours-cv2                cv2.imdecode image + PIL palette mask + TrainTransform, plain loop
  ours-pil                PIL image + PIL palette mask + TrainTransform, plain loop

    python bench/data_pipeline.py                               # prints the table
    python bench/data_pipeline.py --output docs/benchmarks.md   # also writes "## Data pipeline"

Extending (e.g. a Ray Data row): append ``BenchRow(name, fn, cores, in_process=False)`` rows to
``default_rows(pairs)`` and pass them to ``run_benchmark``; ``fn()`` processes the whole image set
once and returns how many images it produced, and images/s is divided by ``cores``.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import replace_section  # noqa: E402
from deeplab_core.palette import colorize  # noqa: E402
from deeplab_core.synthetic import SyntheticSpec, render_scene  # noqa: E402
from deeplab_core.transforms import IMAGENET_MEAN, IMAGENET_STD, TrainTransform  # noqa: E402

SECTION = "Data pipeline"
Pair = tuple[Path, Path]  # (image .jpg, mask .png)


@dataclass(frozen=True)
class BenchRow:
    """``fn()`` processes the whole image set once and returns how many images it produced.
    ``cores``: how many cores the row uses (images/s is divided by it). ``in_process``: the work
    runs in this Python process, so its CPU time (``time.process_time``) is measurable too."""

    name: str
    fn: Callable[[], int]
    cores: int = 1
    in_process: bool = True


# --------------------------------------------------------------------------- inputs


def make_voc_like_images(directory: str | Path, n: int = 64, height: int = 375, width: int = 500,
                         seed: int = 0) -> list[Pair]:
    """Writes ``n`` synthetic scenes as VOC files: ``{i}.jpg`` (PIL, quality 90) and ``{i}.png``
    (palette mode, VOC colour map). Returns the (image, mask) paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spec = SyntheticSpec(height=height, width=width)
    pairs = []
    for i in range(n):
        image, mask = render_scene(spec, seed + i)
        image_path, mask_path = directory / f"{i:05d}.jpg", directory / f"{i:05d}.png"
        Image.fromarray(image).save(image_path, quality=90)
        colorize(mask).save(mask_path)  # mode "P": label indices + the VOC colour map
        pairs.append((image_path, mask_path))
    return pairs


# --------------------------------------------------------------------------- baseline
# torchvision's reference segmentation transforms, re-implemented from
# https://github.com/pytorch/vision/blob/main/references/segmentation/transforms.py
# (RandomResize, RandomHorizontalFlip, RandomCrop with pad_if_smaller, PILToTensor,
# ConvertImageDtype, Normalize) and the order of presets.py's SegmentationPresetTrain.


def _pad_if_smaller(img, size, fill=0):
    min_size = min(img.size)
    if min_size < size:
        ow, oh = img.size
        padh = size - oh if oh < size else 0
        padw = size - ow if ow < size else 0
        img = F.pad(img, (0, 0, padw, padh), fill=fill)
    return img


class TorchvisionReferenceTrain:
    """RandomResize(min, max) on the short side -> flip -> RandomCrop (pad 0 / 255) -> tensors."""

    def __init__(self, min_size: int, max_size: int, crop_size: int, flip_prob: float = 0.5):
        self.min_size, self.max_size, self.crop_size, self.flip_prob = min_size, max_size, crop_size, flip_prob

    def __call__(self, image, target):
        size = random.randint(self.min_size, self.max_size)  # RandomResize
        image = F.resize(image, size)
        target = F.resize(target, size, interpolation=T.InterpolationMode.NEAREST)
        if random.random() < self.flip_prob:  # RandomHorizontalFlip
            image, target = F.hflip(image), F.hflip(target)
        image = _pad_if_smaller(image, self.crop_size)  # RandomCrop
        target = _pad_if_smaller(target, self.crop_size, fill=255)
        crop_params = T.RandomCrop.get_params(image, (self.crop_size, self.crop_size))
        image, target = F.crop(image, *crop_params), F.crop(target, *crop_params)
        image = F.pil_to_tensor(image)  # PILToTensor
        target = torch.as_tensor(np.array(target), dtype=torch.int64)
        image = F.convert_image_dtype(image, torch.float)  # ConvertImageDtype
        image = F.normalize(image, mean=IMAGENET_MEAN, std=IMAGENET_STD)  # Normalize
        return image, target


class _PILSegmentationDataset(torch.utils.data.Dataset):
    def __init__(self, pairs: Sequence[Pair], transform):
        self.pairs, self.transform = list(pairs), transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index):
        image_path, mask_path = self.pairs[index]
        image = Image.open(image_path).convert("RGB")
        target = Image.open(mask_path)
        return self.transform(image, target)


def torchvision_reference_row(pairs: Sequence[Pair], crop_size: int,
                              scale_range: tuple[float, float]) -> Callable[[], int]:
    # The reference resizes the short side to randint(min, max); scale_range of the short side
    # gives the same range of scale factors as our TrainTransform.
    short_side = min(Image.open(pairs[0][0]).size)
    transform = TorchvisionReferenceTrain(int(scale_range[0] * short_side), int(scale_range[1] * short_side),
                                          crop_size)
    loader = torch.utils.data.DataLoader(_PILSegmentationDataset(pairs, transform), batch_size=None,
                                         shuffle=False, num_workers=0)

    def run() -> int:
        count = 0
        for image, target in loader:
            count += 1
        return count

    return run


# --------------------------------------------------------------------------- ours


def decode_image_cv2(data: bytes) -> np.ndarray:
    """JPEG/PNG bytes -> uint8 HxWx3 RGB (libjpeg-turbo through OpenCV, no BGR round trip)."""
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)


def decode_image_pil(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def decode_mask_pil(data: bytes) -> np.ndarray:
    """Palette PNG -> its label indices. (cv2.imdecode expands palettes to colours, so masks
    stored VOC-style need PIL.)"""
    return np.asarray(Image.open(io.BytesIO(data)))


def train_transform_row(pairs: Sequence[Pair], transform: TrainTransform,
                        decode_image: Callable[[bytes], np.ndarray]) -> Callable[[], int]:
    def run() -> int:
        rng = np.random.default_rng(0)
        count = 0
        for image_path, mask_path in pairs:
            image = decode_image(image_path.read_bytes())
            mask = decode_mask_pil(mask_path.read_bytes())
            transform(image, mask, rng)
            count += 1
        return count

    return run


def default_rows(pairs: Sequence[Pair], crop_size: int = 513,
                 scale_range: tuple[float, float] = (0.5, 1.5)) -> list[BenchRow]:
    """The baseline first, then our decode + TrainTransform variants (all one core)."""
    transform = TrainTransform(crop_size=crop_size, scale_range=scale_range)
    return [
        BenchRow("torchvision-reference (PIL decode + PIL transforms, DataLoader num_workers=0)",
                 torchvision_reference_row(pairs, crop_size, scale_range)),
        BenchRow("ours-cv2 (cv2.imdecode JPEG + PIL palette PNG + TrainTransform)",
                 train_transform_row(pairs, transform, decode_image_cv2)),
        BenchRow("ours-pil (PIL JPEG + PIL palette PNG + TrainTransform)",
                 train_transform_row(pairs, transform, decode_image_pil)),
    ]


def ray_data_row(pairs: Sequence[Pair], transform: TrainTransform, num_cpus: int) -> BenchRow:
    """``--ray``: the production path, ``pipelines.data.streams.train_dataset`` (manifest -> read +
    validated decode + TrainTransform in Ray Data tasks) on a local Ray with ``num_cpus`` CPUs,
    one thread per task; images/s is divided by ``num_cpus``. Each pass is a full Ray Data
    execution, so its start-up cost is included."""
    import ray

    from pipelines.data.manifest import write_manifest
    from pipelines.data.streams import train_dataset

    if not ray.is_initialized():  # own temp dir: leaves other Ray sessions' /tmp/ray alone
        ray.init(num_cpus=num_cpus, logging_level="ERROR", include_dashboard=False,
                 _temp_dir=tempfile.mkdtemp(prefix="rb", dir="/tmp"),
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "OPENCV_FOR_THREADS_NUM": "1"}})
    manifest = write_manifest(
        [{"id": image.stem, "image_uri": str(image), "mask_uri": str(mask)} for image, mask in pairs],
        str(Path(pairs[0][0]).parent / "manifest.parquet"),
    )
    dataset = train_dataset(manifest, transform, num_classes=SyntheticSpec().num_classes, seed=0)

    def run() -> int:
        return sum(len(batch["mask"]) for batch in dataset.iter_batches(batch_size=16, batch_format="numpy"))

    return BenchRow(f"ray-data (pipelines.data.streams.train_dataset, {num_cpus} CPUs)", run,
                    cores=num_cpus, in_process=False)


# --------------------------------------------------------------------------- runner


def single_thread() -> None:
    """One core per row: the per-core comparison the table reports."""
    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def _as_row(row: BenchRow | tuple) -> BenchRow:
    return row if isinstance(row, BenchRow) else BenchRow(*row)


def run_benchmark(rows: Sequence[BenchRow | tuple], repeats: int = 5, warmup: bool = True) -> list[dict]:
    """Times every row ``repeats`` times, interleaved (row A, B, C, A, B, C, ...) so that load
    from other processes hits all rows alike, and reports medians. Rows are ``BenchRow`` or
    ``(name, fn[, cores[, in_process]])`` tuples; the first row is the baseline of the ratios.

    Two rates per row: images per wall-clock second per core, and (in-process rows) images per
    CPU-second of this process, which stays meaningful on a machine shared with other work."""
    rows = [_as_row(row) for row in rows]
    if warmup:
        for row in rows:
            row.fn()
    wall: dict[str, list[float]] = {row.name: [] for row in rows}
    cpu: dict[str, list[float]] = {row.name: [] for row in rows}
    for _ in range(repeats):
        for row in rows:
            random.seed(0)  # the torchvision reference draws from Python's random module
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            images = row.fn()
            wall_s, cpu_s = time.perf_counter() - wall_start, time.process_time() - cpu_start
            wall[row.name].append(images / wall_s / row.cores)
            cpu[row.name].append(images / cpu_s if row.in_process else float("nan"))
    base_wall = statistics.median(wall[rows[0].name])
    base_cpu = statistics.median(cpu[rows[0].name])
    results = []
    for row in rows:
        per_core, per_cpu_s = statistics.median(wall[row.name]), statistics.median(cpu[row.name])
        results.append({
            "pipeline": row.name, "cores": row.cores,
            "images_per_s_per_core": per_core, "min": min(wall[row.name]), "max": max(wall[row.name]),
            "ratio": per_core / base_wall,
            "images_per_cpu_s": per_cpu_s, "ratio_cpu": per_cpu_s / base_cpu,
        })
    return results


def format_table(results: Sequence[dict]) -> str:
    def number(value: float, fmt: str) -> str:
        return "n/a" if value != value else format(value, fmt)  # NaN: not measurable in-process

    lines = ["| pipeline | cores | images/s per core (wall, median) | range | ratio vs baseline "
             "| images per CPU-second | ratio (CPU time) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['pipeline']} | {r['cores']} | {r['images_per_s_per_core']:.1f} | "
                     f"{r['min']:.0f}-{r['max']:.0f} | {r['ratio']:.2f}x | "
                     f"{number(r['images_per_cpu_s'], '.1f')} | {number(r['ratio_cpu'], '.2f')}x |")
    return "\n".join(lines)


def machine_description() -> str:
    import PIL
    import torchvision

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} logical CPUs, load average {load:.1f} at the start; "
            f"Python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
            f"OpenCV {cv2.__version__}, Pillow {PIL.__version__}, numpy {np.__version__}")


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--crop-size", type=int, default=513)
    parser.add_argument("--output", help="Markdown file whose '## Data pipeline' section is replaced")
    parser.add_argument("--ray", type=int, default=0, metavar="CPUS",
                        help="add a Ray Data row (pipelines.data.streams.train_dataset) on CPUS local Ray CPUs")
    args = parser.parse_args(argv)

    single_thread()
    with tempfile.TemporaryDirectory() as tmp:
        pairs = make_voc_like_images(tmp, args.num_images)
        machine = machine_description()
        rows = default_rows(pairs, args.crop_size)
        if args.ray:
            rows.append(ray_data_row(pairs, TrainTransform(crop_size=args.crop_size), args.ray))
        results = run_benchmark(rows, repeats=args.repeats)
    table = format_table(results)
    print(table)
    if args.output:
        command = "python bench/data_pipeline.py " + " ".join(argv if argv is not None else sys.argv[1:])
        body = (
            f"Decode + DeepLab train augmentation (scale 0.5-1.5, pad, {args.crop_size}x{args.crop_size} crop, "
            f"flip, normalise) of {args.num_images} VOC-sized synthetic images (500x375 JPEG q90 + palette PNG), "
            f"one thread per row (`torch.set_num_threads(1)`, `cv2.setNumThreads(1)`), rows interleaved, "
            f"median of {args.repeats} passes.\n\n"
            f"Command: `{command.strip()}`\n\nMachine: {machine}\n\n{table}\n"
        )
        replace_section(args.output, SECTION, body)
    return results


if __name__ == "__main__":
    main()
