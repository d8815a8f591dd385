"""Build a manifest from a dataset layout at any URI (listing it once, so runs never list again).

    python pipelines/import_dataset.py voc s3://bucket/VOC2012 --split train \\
        --out s3://bucket/manifests/voc_train.parquet [--mask-dir SegmentationClassAug]
    python pipelines/import_dataset.py cityscapes /data/cityscapes --split val --out val.parquet
    python pipelines/import_dataset.py folders s3://b/images --masks s3://b/masks --out m.jsonl
    python pipelines/import_dataset.py synthetic s3://b/synth --num-train 1000 --num-val 200

S3 endpoint and credentials come from the AWS_* variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
...) or ``--storage-option name=value`` (repeatable; values are never printed).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a file (`ray job submit ... python pipelines/import_dataset.py`)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.common.cli import add_common_flags, run_main  # noqa: E402
from pipelines.common.errors import EXIT_OK, InputError  # noqa: E402
from pipelines.data import importers  # noqa: E402
from pipelines.data.manifest import read_manifest  # noqa: E402
from pipelines.data.storage import check_access  # noqa: E402


def _parse_storage_options(pairs: Sequence[str]) -> dict:
    options: dict = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise InputError(f"--storage-option expects name=value, got {name!r}")
        try:
            options[name] = json.loads(value)  # numbers, booleans, nested client_kwargs
        except ValueError:
            options[name] = value
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python pipelines/import_dataset.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--storage-option", action="append", default=[], metavar="NAME=VALUE",
                        help="fsspec storage option (e.g. endpoint_url=http://minio:9000)")
    layouts = parser.add_subparsers(dest="layout", required=True)

    voc = layouts.add_parser("voc", help="PASCAL VOC: ImageSets/Segmentation/{split}.txt")
    voc.add_argument("root")
    voc.add_argument("--split", required=True)
    voc.add_argument("--out", required=True, help="manifest URI (.parquet, .csv or .jsonl)")
    voc.add_argument("--mask-dir", default="SegmentationClass")

    cityscapes = layouts.add_parser(
        "cityscapes", help="leftImg8bit/ + gtFine/*_labelTrainIds.png (written once from *_labelIds.png where missing)")
    cityscapes.add_argument("root")
    cityscapes.add_argument("--split", required=True)
    cityscapes.add_argument("--out", required=True)

    folders = layouts.add_parser("folders", help="images/ + masks/ matched by relative path")
    folders.add_argument("images")
    folders.add_argument("--masks", help="omit for an inference-only manifest")
    folders.add_argument("--out", required=True)
    folders.add_argument("--strict", action="store_true", help="fail on masks without an image")

    synthetic = layouts.add_parser("synthetic", help="write the synthetic dataset (VOC layout)")
    synthetic.add_argument("root")
    synthetic.add_argument("--num-train", type=int, required=True)
    synthetic.add_argument("--num-val", type=int, required=True)
    synthetic.add_argument("--seed", type=int, default=0)
    add_common_flags(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        run(args)
        return EXIT_OK

    return run_main("import_dataset.py", body, debug=args.debug, argv=argv, verbose=args.verbose)


def run(args: argparse.Namespace | Sequence[str]) -> dict:
    """Imports as the parsed (or raw) arguments say; prints and returns the result as a dict."""
    if not isinstance(args, argparse.Namespace):
        args = build_parser().parse_args(args)
    options = _parse_storage_options(args.storage_option) or None
    if args.layout == "synthetic":
        from pipelines.data.synthetic import write_synthetic_voc

        check_access(args.root, options)
        result = write_synthetic_voc(args.root, args.num_train, args.num_val, seed=args.seed,
                                     storage_options=options)
    else:
        source = args.images if args.layout == "folders" else args.root
        check_access(source, options, must_exist=True)
        check_access(args.out, options)
        if args.layout == "voc":
            uri = importers.import_voc(args.root, args.split, args.out, options, mask_dir=args.mask_dir)
        elif args.layout == "cityscapes":
            uri = importers.import_cityscapes(args.root, args.split, args.out, options)
        else:
            uri = importers.import_folders(args.images, args.masks, args.out, options,
                                          strict=args.strict)
        table = read_manifest(uri, options)
        result = {"manifest": uri, "rows": table.num_rows,
                  "rows_without_mask": table.column("mask_uri").null_count}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(main())
