"""Segment a folder, bucket prefix or manifest of images with a DeepLab model, on Ray (a small job: in this process).

    python pipelines/segment.py --model models:/deeplab@champion --input s3://b/incoming/ --output s3://b/masks/
    python pipelines/segment.py --model ./checkpoints/best --input val.parquet --output ./out --eval
    python pipelines/segment.py --config segment.yaml crf_params.iterations=5
    python pipelines/segment.py --model models:/deeplab@champion --input photo.jpg --output ./out --engine local
    ray job submit --working-dir . -- python pipelines/segment.py --model ... --input ... --output ...

Every setting is a field of SegmentConfig (pipelines/segmentation/config.py): from a YAML file
(--config), the flags below, and `key=value` overrides, later ones winning. Re-running is safe:
the output's ledger records every input settled (ok, or an error); a run processes the listed
inputs that are not settled, retries transient errors up to --max-attempts runs, and holds a
lease so that one run at a time works on an output.

Exit codes: 0 done; 1 failed (or --strict and some input ended as an error); 2 unusable input,
output, model or arguments; 3 another run holds the output's lease (--lease-wait-s to wait). Storage credentials come from the
environment (AWS_* variables, instance roles). With a models:/ URI, the dense CRF uses the
version's tuned parameters (pipelines/tune_crf.py) unless --crf-* flags or crf_params.* say
otherwise. See docs/segmentation.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (`ray job submit ... python pipelines/segment.py`)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.common.cli import add_common_flags, field_help, run_main  # noqa: E402
from pipelines.common.config import flag_labels, load_config  # noqa: E402
from pipelines.common.errors import EXIT_FAILED, EXIT_OK  # noqa: E402
from pipelines.segmentation.config import SegmentConfig  # noqa: E402
from pipelines.segmentation.flags import add_crf_flags, add_tta_flags, crf_values, tta_values  # noqa: E402

# flag -> config field; the defaults and help texts are the config's own.
FLAGS = ("model", "input", "output", "max_pixels", "batch_size", "num_model_actors",
         "cpus_per_model_actor", "crf_workers", "crf_backend", "device", "precision", "runtime", "since",
         "tracking_uri", "experiment", "max_attempts", "crash_limit", "lease_ttl_s", "lease_wait_s", "redo", "engine",
         "local_max_inputs", "local_max_crf_inputs")



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file of SegmentConfig fields")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. crf_params.bi_w=5")
    for name in FLAGS:
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=field_help(SegmentConfig, name))
    add_tta_flags(p)
    p.add_argument("--crf", dest="crf", action=argparse.BooleanOptionalAction, default=None,
                   help=field_help(SegmentConfig, "crf"))
    add_crf_flags(p)
    p.add_argument("--overlays", action="store_const", const=True, default=None, help=field_help(SegmentConfig, "overlays"))
    p.add_argument("--eval", dest="evaluate", action="store_const", const=True, default=None, help=field_help(SegmentConfig, "evaluate"))
    p.add_argument("--retry-errors", dest="retry_errors", action="store_const", const=True, default=None,
                   help=field_help(SegmentConfig, "retry_errors"))
    p.add_argument("--changed", choices=("reprocess", "skip"), default=None,
                   help="a settled input listed with another size/etag: process it again (default) or skip it")
    p.add_argument("--shared-fs", dest="shared_fs", action="store_const", const=True, default=None,
                   help=field_help(SegmentConfig, "shared_fs"))
    p.add_argument("--strict", action="store_true", help="exit with status 1 if any input ended as an error")
    p.add_argument("--local", dest="engine", action="store_const", const="local",
                   help="the same as --engine local: in this process, without Ray (the ledger as always)")
    add_common_flags(p)
    return p


def config_from_args(args: argparse.Namespace) -> SegmentConfig:
    values = {name: getattr(args, name)
              for name in (*FLAGS, "crf", "overlays", "evaluate", "retry_errors", "shared_fs")
              if getattr(args, name) is not None}
    if args.changed is not None:
        values["reprocess_changed"] = args.changed == "reprocess"
    values.update(tta_values(args))
    crf = crf_values(args)
    if crf:
        values["crf_params"] = crf
    return load_config(SegmentConfig, args.config, args.overrides, values, flag_labels(values))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def segment() -> int:
        cfg = config_from_args(args)
        from pipelines.segmentation.job import run_segmentation

        report = run_segmentation(cfg, verbose=args.verbose)  # a busy lease: LeaseBusy, exit 3
        return EXIT_FAILED if args.strict and report.errors else EXIT_OK

    return run_main("segment.py", segment, debug=args.debug, argv=argv, verbose=args.verbose)


if __name__ == "__main__":
    from pipelines.common.ray_session import exit_now

    exit_now(main())  # no 6 s of teardown after the summary
