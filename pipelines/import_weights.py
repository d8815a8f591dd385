"""Import another program's trained DeepLab checkpoint as a model version of ours.

    python pipelines/import_weights.py vainf s3://b/best_deeplabv3plus_mobilenet_voc_os16.pth \\
        --arch deeplabv3plus --backbone mobilenetv2 --num-classes 21 --output-stride 16 \\
        --register deeplab --eval s3://b/voc/manifests/val.parquet
    python pipelines/import_weights.py torchvision deeplabv3_resnet101_coco-586e9e4e.pth --num-classes 21 --register deeplab
    python pipelines/import_weights.py kazuto deeplabv2_resnet101_msc-vocaug-20000.pth --num-classes 21 --output ./kazuto

Converts with deeplab_core.weights.from_{torchvision,vainf,kazuto}, writes our model.pt (with the
model's input normalisation and the source's name and sha256 in its meta) and registers it as a
new version (run in the `deeplab-imports` experiment) tagged `source.kind`, `source.file`,
`source.sha256` and, with --eval, `val_mIoU` + `val_manifest`, which `promote.py` compares with
the champion. Then `segment.py --model models:/NAME/<version>` uses it. S3 credentials come from
the AWS_* variables. See docs/models.md, "Importing weights as model versions".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (`ray job submit ... python pipelines/import_weights.py`)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.common.cli import add_common_flags, field_help, run_main  # noqa: E402
from pipelines.common.config import flag_labels, load_config  # noqa: E402
from pipelines.promotion.weights_import import (  # noqa: E402
    IMPORTERS,
    ImportWeightsConfig,
    flag,
    import_weights,
)

# config field -> (flag, metavar); defaults and help texts are the config's own.
FLAGS = {"arch": ("--arch", "ARCH"), "backbone": ("--backbone", "BACKBONE"),
         "output_stride": ("--output-stride", "{8,16}"), "registered_model": ("--register", "NAME"),
         "tracking_uri": ("--tracking-uri", "URI"), "experiment": ("--experiment", "NAME"),
         "output": ("--output", "DIR_OR_URI"), "eval_manifest": ("--eval", "MANIFEST")}


def _kinds_epilog() -> str:
    lines = ["source kinds:"]
    for kind, importer in IMPORTERS.items():
        needs = [flag(name) for name in importer.required]
        fixed = [f"{flag(name)} {value}" for name, value in importer.fixed.items()]
        detail = "; ".join(part for part in (
            f"needs {', '.join(needs)}" if needs else "",
            f"always {', '.join(fixed)}" if fixed else "",
        ) if part)
        lines.append(f"  {kind:<12} {importer.what}" + (f" ({detail})" if detail else ""))
    lines += ["", "exit codes: 0 imported, 2 bad arguments or an unusable SOURCE / output / manifest, 1 other errors"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="import_weights.py", description=__doc__.splitlines()[0], epilog=_kinds_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=list(IMPORTERS), help="program that wrote SOURCE")
    parser.add_argument("source", metavar="SOURCE", help=field_help(ImportWeightsConfig, "source"))
    parser.add_argument("--num-classes", dest="num_classes", type=int, required=True, help=field_help(ImportWeightsConfig, "num_classes"))
    for name, (option, metavar) in FLAGS.items():
        parser.add_argument(option, dest=name, metavar=metavar, default=None,
                            type=int if name == "output_stride" else str, help=field_help(ImportWeightsConfig, name))
    parser.add_argument("--no-pytorch-flavor", dest="pytorch_flavor", action="store_false",
                        help="register the pyfunc model only (skips the torch.export of the network)")
    add_common_flags(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> ImportWeightsConfig:
    names = ("kind", "source", "num_classes", *FLAGS)
    values = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    values["pytorch_flavor"] = args.pytorch_flavor
    labels = {**flag_labels(values), **{name: option for name, (option, _) in FLAGS.items()}}
    return load_config(ImportWeightsConfig, values=values, labels=labels)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        result = import_weights(config_from_args(args))
        print(json.dumps(result.summary()), flush=True)
        return 0

    return run_main("import_weights.py", body, debug=args.debug, argv=argv, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
