"""The segmentation product against a hand-written loop on the same images, fresh processes, interleaved.

The product is `pipelines/segment.py` as a user runs it (`--engine auto`: in this process for a
small plain job, else on a local Ray), and with `--engine ray` (and `--engine local`) beside it;
the hand loop does the same work by hand.

Same work: decode (PIL), the same checkpoint through ``predict_probs`` (1 torch thread), for
`tta-crf` the same scales + flip and pydensecrf in a process pool of --crf-workers (a CRF is
handed to the pool as soon as its probabilities exist, so model and CRF overlap, as in the
product), the same palette PNG written per image. Both are timed from process start to process
exit (imports, model load, Ray start and stop included: what a user waits for), with the time
to the first mask on disk. A 1-image run of each gives the fixed cost. Ratios are seconds of a
runner / seconds of the first runner (--runners): hand loop / product > 1, the product is faster.

    python bench/segment_vs_loop.py --model ray_results/deeplab-demo/checkpoint_<time> --images 64
    # engine auto's threshold: in-process against Ray at a few sizes, plain (docs/segmentation.md)
    python bench/segment_vs_loop.py --model ... --images 16,64,256 --modes plain --runners local,ray
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TTA_SCALES = "0.75,1,1.25"


def _write_images(folder: Path, count: int) -> None:
    from PIL import Image

    from deeplab_core.synthetic import SyntheticSpec, render_scene

    folder.mkdir(parents=True, exist_ok=True)
    spec = SyntheticSpec(height=375, width=500)
    for i in range(count):
        Image.fromarray(render_scene(spec, 10**6 + i)[0]).save(folder / f"img_{i:04d}.jpg", quality=90)


def _timed(cmd: list[str], masks: Path) -> tuple[float, float | None, int]:
    """(seconds to process exit, seconds to the first mask on disk, exit code)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    first: list[float] = []
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def watch() -> None:
        while proc.poll() is None and not first:
            if masks.exists() and any(masks.glob("*.png")):
                first.append(time.monotonic() - start)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    code = proc.wait()
    total = time.monotonic() - start
    watcher.join()
    return total, (first[0] if first else None), code


PRODUCT_EXTRA: list[str] = []  # --product-args: e.g. --precision fp32, the hand loop's arithmetic


def product_cmd(model: str, images: Path, out: Path, mode: str, crf_workers: int, engine: str = "auto") -> list[str]:
    cmd = [sys.executable, "pipelines/segment.py", "--model", model, "--input", str(images), "--output", str(out),
           "--crf-workers", str(crf_workers), "--engine", engine, *PRODUCT_EXTRA]
    return cmd + (["--scales", TTA_SCALES] if mode == "tta-crf" else ["--scales", "1", "--no-flip", "--no-crf"])


def hand_cmd(model: str, images: Path, out: Path, mode: str, crf_workers: int) -> list[str]:
    return [sys.executable, __file__, "--hand-loop", "--model", model, "--input", str(images), "--output", str(out),
            "--mode", mode, "--crf-workers", str(crf_workers)]


def _crf_and_write(args) -> None:
    image, probs, path = args
    from deeplab_core.crf import dense_crf
    from deeplab_core.palette import colorize

    colorize(dense_crf(image, probs.astype("float32")).argmax(0).astype("uint8")).save(path)


def hand_loop(model_uri: str, input_dir: str, output: str, mode: str, crf_workers: int) -> None:
    """What one would write by hand: no Ray, one process (+ a CRF pool)."""
    import multiprocessing

    import numpy as np
    import torch
    from PIL import Image

    from deeplab_core.palette import colorize
    from deeplab_core.transforms import normalize
    from deeplab_core.tta import predict_probs
    from pipelines.tracking import load_model
    from pipelines.data.checkpoints import normalisation_of

    torch.set_num_threads(1)
    model, meta = load_model(str(Path(model_uri).resolve()))
    model.eval()
    mean, std = normalisation_of(meta, model)
    masks = Path(output) / "masks"
    masks.mkdir(parents=True, exist_ok=True)
    tta = mode == "tta-crf"
    scales = tuple(float(s) for s in TTA_SCALES.split(",")) if tta else (1.0,)
    pool = multiprocessing.get_context("fork").Pool(crf_workers) if tta else None
    pending = []
    for path in sorted(Path(input_dir).glob("*.jpg")):
        image = np.asarray(Image.open(path).convert("RGB"))
        probs = predict_probs(model, normalize(image, mean, std)[None], scales=scales, flip=tta)[0].numpy()
        target = masks / f"{path.stem}.png"
        if pool is None:
            colorize(probs.argmax(0).astype(np.uint8)).save(target)
        else:
            pending.append(pool.apply_async(_crf_and_write, ((image, probs.astype(np.float16), target),)))
    for result in pending:
        result.get()
    if pool is not None:
        pool.close()
        pool.join()


RUNNERS = {  # name -> command maker
    "product": product_cmd,  # as a user runs it: --engine auto
    "product ray": functools.partial(product_cmd, engine="ray"),
    "product local": functools.partial(product_cmd, engine="local"),
    "hand loop": hand_cmd,
}
RUNNER_FLAGS = {"auto": "product", "ray": "product ray", "local": "product local", "hand": "hand loop"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="checkpoint dir")
    p.add_argument("--images", default="64", help="image counts, comma-separated (a 1-image run is added)")
    p.add_argument("--tta-images", default=None, help="image counts of the tta-crf rows (default --images)")
    p.add_argument("--modes", default="plain,tta-crf")
    p.add_argument("--runners", default="auto,ray,hand", help=f"of {','.join(RUNNER_FLAGS)}; the first is the "
                                                               "denominator of the ratios")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--crf-workers", type=int, default=2)
    p.add_argument("--product-args", default="", help="extra segment.py flags, e.g. '--precision fp32' (the hand "
                   "loop runs fp32 NCHW; the product's default --precision auto is bf16 + channels_last on CPUs "
                   "with native bf16)")
    p.add_argument("--hand-loop", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.hand_loop:
        hand_loop(a.model, a.input, a.output, a.mode, a.crf_workers)
        return 0
    PRODUCT_EXTRA[:] = a.product_args.split()
    model = str(Path(a.model).resolve())
    work = Path(tempfile.mkdtemp(prefix="seg-vs-loop-"))
    counts = {"plain": _counts(a.images), "tta-crf": _counts(a.tta_images or a.images)}
    runners = [RUNNER_FLAGS[name] for name in a.runners.split(",")]
    rows = []
    try:
        for mode in a.modes.split(","):
            for count in counts[mode]:
                folder = work / f"in-{count}"
                if not folder.exists():
                    _write_images(folder, count)
                for repeat in range(a.repeats):
                    # interleaved, the order alternating between repeats: load drifts hit all alike
                    for name in (runners if repeat % 2 == 0 else runners[::-1]):
                        out = work / f"out-{name.replace(' ', '')}-{mode}-{count}-{repeat}"
                        cmd = RUNNERS[name](model, folder, out, mode, a.crf_workers)
                        total, first, code = _timed(cmd, out / "masks")
                        written = len(list((out / "masks").glob("*.png")))
                        rows.append((mode, count, repeat, name, total, first, code, written))
                        print(f"# {mode} {count} images, {name}: {total:.1f} s, first mask "
                              f"{first if first is None else round(first, 1)} s, exit {code}, {written} masks",
                              flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()
    print(f"\nload average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; {os.cpu_count()} CPUs; model {a.model}")
    base, others = runners[0], runners[1:]
    print("| mode | images | run | " + " | ".join(f"{n} s" for n in runners) + " | "
          + " | ".join(f"{n}/{base}" for n in others) + " | " + " | ".join(f"{n} first mask s" for n in runners) + " |")
    print("|---|---:|---:|" + "---:|" * (3 * len(runners) - 1))
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    for mode, count, repeat in dict.fromkeys((r[0], r[1], r[2]) for r in rows):
        got = {r[3]: r for r in rows if r[:3] == (mode, count, repeat)}
        print(f"| {mode} | {count} | {repeat + 1} | " + " | ".join(f"{got[n][4]:.1f}" for n in runners) + " | "
              + " | ".join(f"{got[n][4] / got[base][4]:.2f}" for n in others) + " | "
              + " | ".join(fmt(got[n][5]) for n in runners) + " |")
    return 0


def _counts(text: str) -> list[int]:
    return [1] + [int(c) for c in text.split(",") if int(c) != 1]


if __name__ == "__main__":
    sys.exit(main())
