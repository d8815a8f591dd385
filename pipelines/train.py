"""Train a DeepLab model on Ray.

    python pipelines/train.py                                  # embedded demo defaults
    python pipelines/train.py --config configs/voc_deeplabv3plus_r101.yaml optim.max_iters=30000
    ray job submit --working-dir . -- python pipelines/train.py --config configs/...

Overrides are `section.key=value` (values parsed as YAML). Re-running with the same run.name and
run.storage_path resumes from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (`ray job submit ... python pipelines/train.py`)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.common.cli import add_common_flags, run_main  # noqa: E402
from pipelines.training.config import load_train_config  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (see configs/); defaults are the embedded demo")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.max_iters=100")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--shared-fs", action="store_true",
                        help="local paths are on a filesystem every node mounts (NFS): same as run.shared_fs=true")
    add_common_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def train() -> int:
        cfg = load_train_config(args.config, [*args.overrides, *(["run.shared_fs=true"] if args.shared_fs else [])])
        from pipelines.training.job import print_config, run_training

        if args.print_config:
            print_config(cfg)
            return 0
        print(run_training(cfg, verbose=args.verbose).summary_line())
        return 0

    return run_main("train.py", train, debug=args.debug, argv=argv, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
