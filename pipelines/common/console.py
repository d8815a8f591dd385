"""One console voice: the jobs' own lines, and Ray's start-up and plan chatter only when asked.

Ray Data prints an execution plan, progress bars and "Starting execution" lines for every
dataset, from the driver and from Train's split coordinators (which inherit the driver's
DataContext); a training run of a few minutes printed ~175 of them. `quiet_ray()` turns those
off before the datasets are built; `--verbose` on the entry scripts keeps them.
"""

from __future__ import annotations

import logging
import os

_RAY_LOGGERS = ("ray.data", "ray.train", "ray.tune")


def quiet_mlflow() -> None:
    """MLflow logs at INFO by default ("Creating initial MLflow database tables...", alembic's
    migrations); the jobs print what matters themselves. The caller's MLFLOW_LOGGING_LEVEL wins."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is first imported
    level = getattr(logging, os.environ["MLFLOW_LOGGING_LEVEL"].upper(), logging.WARNING)
    for name in ("mlflow", "alembic"):  # already imported: mlflow set its own level then
        logging.getLogger(name).setLevel(level)


def quiet_ray(verbose: bool = False) -> None:
    """Call before building any Ray Data dataset. With `verbose`, Ray keeps its own defaults."""
    if verbose or os.environ.get("DEEPLAB_VERBOSE") == "1":
        os.environ["DEEPLAB_VERBOSE"] = "1"
        return
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    for name in _RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
