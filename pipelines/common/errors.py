"""Errors about a job's whole input, as opposed to one bad row (those become error records).

Entry scripts print an `InputError` as one line on stderr and exit with `EXIT_USAGE`, before any
work starts: a missing manifest, too few rows to train on, an unusable model or output. Any other
failure prints as the one line `describe_failure` makes of it.
"""

from __future__ import annotations

import re

# The exit codes of every entry script, in one table (pipelines/common/cli.py: run_main).
EXIT_OK = 0  # done (promote.py: promoted, or the candidate already is the champion)
EXIT_FAILED = 1  # anything else: a failed stage, an unreachable server (segment.py --strict: error rows)
EXIT_USAGE = 2  # unusable input, output, model or arguments (InputError), before any work starts
EXIT_BUSY = 3  # segment.py: another run holds the output's lease; nothing was done
EXIT_REJECTED = 3  # promote.py: the champion stays (not an error; cron can tell it apart)
EXIT_UNRELIABLE = 4  # promote.py: an evaluation with too many failed rows; nothing moved
EXIT_INTERRUPTED = 130  # Ctrl-C (the shell's code for a command ended by SIGINT)
FAILURE_ATTR = "deeplab_failure"  # set by remember_failure


class InputError(ValueError):
    """A whole-input problem; the message names the file or URI and what to do."""


class JobExit(Exception):
    """A failure an entry script reports as one line `<prog>: <label>: <message>` with its own exit
    code (e.g. promotion's, a busy lease)."""

    exit_code = EXIT_FAILED
    label = "error"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# The header Ray puts above a task's or actor's traceback: `ray::MapBatches(write_stage)() (pid=1, ip=10.0.0.2)`.
_RAY_HEADER = re.compile(r"^ray::(?P<name>\S+?)(?:\(\))? \(pid=\d+, ip=(?P<ip>[^,)\s]+)")


def _innermost_traceback_exception(text: str) -> str | None:
    """The innermost exception's `Type: message` in a formatted traceback: Python prints a chain
    innermost first, so it is the first line at column 0 after the first `  File` frame (with its
    continuation lines up to the next blank line or frame)."""
    lines = _ANSI.sub("", text).splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("  File ")), None)
    if start is None:
        return None
    for i in range(start, len(lines)):
        line = lines[i]
        if line and not line.startswith(" ") and not line.startswith("ray::"):
            message = [line]
            for follow in lines[i + 1:]:
                if not follow.strip() or follow.startswith("  File ") or follow.startswith(("The above", "During")):
                    break
                message.append(follow)
            return " ".join(" ".join(message).split())
    return None


def _ray_task_where(text: str) -> str | None:
    """`write_stage on node 10.0.0.2` from a Ray task/actor error's header."""
    match = _RAY_HEADER.search(_ANSI.sub("", text).lstrip())
    if match is None:
        return None
    name = match.group("name").rsplit("->", 1)[-1]  # fused Ray Data stages: the failing one is last
    inner = re.fullmatch(r"\w+\((?P<fn>[\w.<>]+)\)", name)  # MapBatches(write_stage) -> write_stage
    return f"{inner.group('fn') if inner else name} on node {match.group('ip')}"


def _is_ray_task_error(err: BaseException) -> bool:
    return any(cls.__name__ == "RayTaskError" for cls in type(err).__mro__)


def remember_failure(err: BaseException) -> BaseException:
    """Records on `err` the one-line description of the innermost exception of its chain, where
    the chain is still whole: Ray sends a worker's exception to the driver without `__cause__`,
    but with its attributes."""
    inner = err
    while (inner.__cause__ or (None if inner.__suppress_context__ else inner.__context__)) is not None:
        inner = inner.__cause__ or inner.__context__
    try:
        setattr(err, FAILURE_ATTR, describe_failure(inner))
    except Exception:  # noqa: BLE001 - an exception type without attributes keeps its own message
        pass
    return err


def describe_failure(err: BaseException) -> str:
    """One line for a failure: `Type: message` of the exception itself, or - for errors raised
    inside Ray tasks, actors and Train workers, whose wrappers carry a whole traceback - where it
    happened and the innermost exception: `write_stage on node 10.0.0.2: NoCredentialsError: ...`,
    `train worker rank 0: RuntimeError: ...`."""
    remembered = getattr(err, FAILURE_ATTR, None)
    if isinstance(remembered, str):
        return remembered
    failures = getattr(err, "worker_failures", None)  # ray.train.WorkerGroupError
    if isinstance(failures, dict) and failures:
        rank = min(failures)
        return f"train worker rank {rank}: {describe_failure(failures[rank])}"
    controller = getattr(err, "controller_failure", None)  # ray.train.ControllerError
    if isinstance(controller, BaseException):
        return f"train controller: {describe_failure(controller)}"
    if _is_ray_task_error(err):
        text = str(err)
        innermost = _innermost_traceback_exception(text)
        where = _ray_task_where(text)
        if innermost:
            return f"{where}: {innermost}" if where else innermost
        cause = getattr(err, "cause", None)
        if isinstance(cause, BaseException) and cause is not err:
            return f"{where}: {describe_failure(cause)}" if where else describe_failure(cause)
    message = " ".join(str(err).split())
    return f"{type(err).__name__}: {message}" if message else type(err).__name__
