"""The one skeleton of every entry script: flags derived from its config (`field_help`), the
common flags, and `run_main`: one line on stderr for a failure, the traceback only with --debug.

Exit codes (the table is pipelines/common/errors.py): 0 success, 2 a whole-input or usage error
(`InputError`: the message names the file or URI and what to do), a `JobExit`'s own code (a busy
lease 3, promotion's 3 and 4), 1 anything else. URIs in messages have their passwords redacted.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence

from pydantic import BaseModel

from pipelines.common.console import quiet_mlflow
from pipelines.common.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, InputError, JobExit, describe_failure
from pipelines.common.redaction import redact_urls, url_passwords


def field_help(config: type[BaseModel], name: str) -> str:
    """A flag's help: the config field's description and its default (the config's, written once)."""
    field = config.model_fields[name]
    default = None if field.is_required() else field.get_default(call_default_factory=True)
    return (field.description or name.replace("_", " ")) + ("" if default is None else f" (default: {default})")


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("--verbose", action="store_true", help="keep Ray's and MLflow's own start-up, plan, progress and registry output")


def _scrubbed(text: str, secrets: Sequence[str]) -> str:
    text = redact_urls(str(text))
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


_MESSAGE_CHARS = 500


def run_main(prog: str, body: Callable[[], int], debug: bool = False, argv: Sequence[str] | None = None,
             verbose: bool = False) -> int:
    """`body()`'s exit code, or the exit code of its failure after printing it as one line (the
    scrubbed traceback with `debug`). `verbose` keeps Ray's and MLflow's own console output."""
    secrets = url_passwords(sys.argv[1:] if argv is None else argv)
    quiet_mlflow(verbose)
    try:
        return body()
    except KeyboardInterrupt as stop:  # Ctrl-C: one line (the job's own, if it has one), 128 + SIGINT
        print(f"{prog}: {stop.args[0] if stop.args else 'stopped (Ctrl-C)'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - the top of the job: report, don't dump
        if debug:
            print(_scrubbed(traceback.format_exc(), secrets), file=sys.stderr, end="")
        elif isinstance(err, (InputError, JobExit)):
            message = _scrubbed(" ".join(str(err).split()), secrets)[:_MESSAGE_CHARS]
            print(f"{prog}: {getattr(err, 'label', 'error')}: {message}", file=sys.stderr)
        else:
            message = _scrubbed(describe_failure(err), secrets)[:_MESSAGE_CHARS]
            print(f"{prog}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return exit_code_of(err)


def exit_code_of(err: BaseException) -> int:
    """The exit code of a failure: a JobExit's own, EXIT_USAGE for an InputError, else EXIT_FAILED."""
    if isinstance(err, JobExit):
        return err.exit_code
    return EXIT_USAGE if isinstance(err, InputError) else EXIT_FAILED
