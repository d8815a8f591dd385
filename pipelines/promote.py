"""Move the champion alias of a registered model to a candidate version if it is as good.

    python pipelines/promote.py --model deeplab --candidate 7
    python pipelines/promote.py --model deeplab --candidate latest --dry-run

Every setting is a field of PromoteConfig (pipelines/promotion/job.py): flags, or `--config FILE`
plus `key=value` overrides. Exit codes: 0 promoted, 3 rejected, 2 usage / unknown model or
version / replaced weights, 4 too many failed rows in an evaluation, 1 other errors.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (`ray job submit ... python pipelines/promote.py`)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.common.cli import add_common_flags, field_help, run_main  # noqa: E402
from pipelines.common.config import flag_labels, load_config  # noqa: E402
from pipelines.promotion.job import PromoteConfig  # noqa: E402

EPILOG = """\
exit codes:
  0  promoted (or the candidate already is the champion)
  3  rejected: the champion stays (not an error; cron can tell it apart)
  2  usage error: bad arguments, unknown model or version, no manifest to evaluate on,
     weights that do not match the version's weights.sha256 tag
  4  an evaluation had more than --max-error-share failed rows: nothing moved
  1  registry unreachable or any other error

The decision is printed as one line and recorded on the candidate version as tags
promotion.decision, promotion.reason, promotion.compared_to, promotion.metric,
promotion.candidate_value, promotion.champion_value, promotion.time (and a few more).
Network behaviour follows MLflow's MLFLOW_HTTP_REQUEST_MAX_RETRIES / MLFLOW_HTTP_REQUEST_TIMEOUT;
this command defaults them to 2 retries and 30 s so that an unreachable server fails fast.
"""

VALUE_FLAGS = ("model", "candidate", "metric", "min_improvement", "val_manifest", "max_error_share", "alias",
               "tracking_uri", "registry_uri", "lock_timeout")
SWITCHES = ("lower_is_better", "dry_run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="promote.py", description=__doc__.splitlines()[0], epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of PromoteConfig fields")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    for name in VALUE_FLAGS:
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=field_help(PromoteConfig, name))
    for name in SWITCHES:
        parser.add_argument("--" + name.replace("_", "-"), dest=name, action="store_const", const=True,
                            default=None, help=field_help(PromoteConfig, name))
    add_common_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    values = {name: getattr(args, name) for name in (*VALUE_FLAGS, *SWITCHES) if getattr(args, name) is not None}

    def body() -> int:
        cfg = load_config(PromoteConfig, args.config, args.overrides, values, flag_labels(values))
        from pipelines.promotion.job import run_promotion

        decision = run_promotion(cfg)  # PromotionError: its own exit code (the table above)
        print(decision.summary(), flush=True)
        return decision.exit_code

    return run_main("promote", body, debug=args.debug, argv=argv, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
