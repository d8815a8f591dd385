"""Search dense-CRF parameters for a model on Ray Tune and store the best set on its version.

    python pipelines/tune_crf.py --model models:/deeplab@champion --manifest val.parquet \
        --num-images 8 --num-samples 16 --tracking-uri sqlite:///mlflow.db
    python pipelines/tune_crf.py --model ... --manifest ... --search grid grid.bi_w=[3,4,5]

Every setting is a field of TuneCRFConfig (pipelines/segmentation/crf_tuning.py): from a YAML file
(--config), the flags below, and `key=value` overrides. The model's probabilities are computed
once and shared with every trial; the DeepLab defaults are always one of the trials. The best set
becomes the version's tags `crf.*`, which pipelines/segment.py then uses by default.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (`python pipelines/tune_crf.py`)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.common.cli import add_common_flags, field_help, run_main  # noqa: E402
from pipelines.common.config import flag_labels, load_config  # noqa: E402
from pipelines.segmentation.crf_tuning import TuneCRFConfig  # noqa: E402
from pipelines.segmentation.flags import add_tta_flags, tta_values  # noqa: E402

FLAGS = {"model": str, "manifest": str, "num_images": int, "num_samples": int, "search": str, "seed": int,
         "iterations": int, "max_concurrent": int, "storage_path": str, "tracking_uri": str, "experiment": str}



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file of TuneCRFConfig fields")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. grid.bi_w=[3,5]")
    for name, kind in FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None,
                       help=field_help(TuneCRFConfig, name))
    add_tta_flags(p)
    p.add_argument("--no-tag", dest="tag_version", action="store_const", const=False, default=None,
                   help="do not store the best set on the model version")
    add_common_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    values = {name: getattr(args, name) for name in (*FLAGS, "tag_version") if getattr(args, name) is not None}
    values.update(tta_values(args))

    def tune() -> int:
        cfg = load_config(TuneCRFConfig, args.config, args.overrides, values, flag_labels(values))
        from pipelines.segmentation.crf_tuning import run_crf_tuning

        run_crf_tuning(cfg)
        return 0

    return run_main("tune_crf.py", tune, debug=args.debug, argv=argv, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
