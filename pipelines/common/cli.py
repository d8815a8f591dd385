"""How every entry script ends: one line on stderr for a failure, the traceback only with --debug.

Exit codes: 0 success, 2 a whole-input or usage error (`InputError`: the message names the file or
URI and what to do), 1 anything else. URIs in messages have their passwords redacted.
"""

from __future__ import annotations

import argparse
import re
import sys
import traceback
from collections.abc import Callable, Sequence

from pipelines.common.console import quiet_mlflow
from pipelines.common.errors import EXIT_USAGE, InputError, describe_failure
from pipelines.data.storage import redact_urls

EXIT_FAILED = 1
EXIT_INTERRUPTED = 130  # the shell's code for a command ended by SIGINT


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("--verbose", action="store_true", help="keep Ray's and MLflow's own start-up, plan, progress and registry output")


_USERINFO = re.compile(r"://(?P<user>[^\s/@:]*):(?P<password>[^\s/@]+)@")


def url_passwords(argv: Sequence[str]) -> list[str]:
    """Passwords written into URIs on the command line (`s3://KEY:SECRET@bucket/...`): libraries
    quote such URIs in their own words (e.g. 'Invalid bucket name "KEY:SECRET@bucket"')."""
    return [m.group("password") for arg in argv for m in _USERINFO.finditer(arg)]


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
        elif isinstance(err, InputError):
            message = _scrubbed(" ".join(str(err).split()), secrets)[:_MESSAGE_CHARS]
            print(f"{prog}: error: {message}", file=sys.stderr)
        else:
            message = _scrubbed(describe_failure(err), secrets)[:_MESSAGE_CHARS]
            print(f"{prog}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return EXIT_USAGE if isinstance(err, InputError) else EXIT_FAILED
