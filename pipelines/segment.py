"""Segment a folder, bucket prefix or manifest of images with a DeepLab model, on Ray.

    python pipelines/segment.py --model models:/deeplab@champion --input s3://b/incoming/ --output s3://b/masks/
    python pipelines/segment.py --model ./checkpoints/best --input val.parquet --output ./out --eval
    ray job submit --working-dir . -- python pipelines/segment.py --model ... --input ... --output ...

Re-running is safe: finished images (an ok results row and its mask) are skipped. Storage
credentials come from the environment (AWS_* variables, instance roles). See docs/segmentation.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (`ray job submit ... python pipelines/segment.py`)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.segmentation import DEFAULT_SCALES, CRFParams, SegmentConfig  # noqa: E402


def _scales(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"scales must be comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"scales must be positive, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="models:/name@alias, models:/name/version, runs:/<id>/model, or a checkpoint dir/URI")
    p.add_argument("--input", required=True, help="URI prefix of images, or a manifest (.parquet/.csv/.jsonl)")
    p.add_argument("--output", required=True, help="output URI prefix (any fsspec URI)")
    p.add_argument("--scales", type=_scales, default=DEFAULT_SCALES,
                   help="test-time scales, comma-separated (default %(default)s; '1' for single scale)")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="no horizontal-flip averaging")
    p.add_argument("--fusion", choices=("mean", "max"), default="mean",
                   help="how scales are fused: mean (v3/v3+) or max (v2 MSC)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="memory budget: largest scaled image run whole; bigger ones are tiled")
    p.add_argument("--crf", action=argparse.BooleanOptionalAction, default=True, help="dense CRF (default on)")
    p.add_argument("--crf-iterations", type=int, default=CRFParams.iterations)
    p.add_argument("--overlays", action="store_true", help="also write colour overlays (overlays/<id>.jpg)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-model-actors", type=int, default=1)
    p.add_argument("--cpus-per-model-actor", type=float, default=1.0,
                   help="CPU actors: torch threads per actor (ignored on GPU)")
    p.add_argument("--crf-workers", type=int, default=2, help="CRF processes running at once")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: one GPU per model actor when the cluster has GPUs")
    p.add_argument("--since", default=None,
                   help="prefix inputs only: files modified at/after this ISO time, or 'last' "
                        "(the watermark of the previous run in <output>/_state.json)")
    p.add_argument("--eval", dest="evaluate", action="store_true",
                   help="with ground-truth masks (manifest mask_uri): mIoU table plain / +MS+flip / +CRF")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (for models:/ and runs:/ URIs, and to log the run)")
    p.add_argument("--experiment", default="deeplab-segmentation", help="MLflow experiment for the run")
    p.add_argument("--strict", action="store_true", help="exit with status 1 if any input ended as an error")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = SegmentConfig(
            model=args.model, input=args.input, output=args.output, scales=args.scales, flip=args.flip,
            fusion=args.fusion, max_pixels=args.max_pixels, crf=args.crf,
            crf_params=CRFParams(iterations=args.crf_iterations), overlays=args.overlays,
            batch_size=args.batch_size, num_model_actors=args.num_model_actors,
            cpus_per_model_actor=args.cpus_per_model_actor, crf_workers=args.crf_workers,
            device=args.device, since=args.since, evaluate=args.evaluate,
            tracking_uri=args.tracking_uri, experiment=args.experiment,
        )
    except ValueError as err:
        parser.error(str(err))
    from pipelines.segmentation import run_segmentation

    report = run_segmentation(cfg)
    return 1 if args.strict and report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
