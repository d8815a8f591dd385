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

from pipelines.common.errors import EXIT_USAGE, InputError  # noqa: E402
from pipelines.training.config import load_train_config  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (see configs/); defaults are the embedded demo")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.max_iters=100")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = load_train_config(args.config, args.overrides)
    except InputError as exc:
        parser.error(str(exc))
    from pipelines.training.job import print_config, run_training

    if args.print_config:
        print_config(cfg)
        return 0
    try:
        outcome = run_training(cfg)
    except InputError as exc:
        print(f"train.py: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(outcome.summary_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
