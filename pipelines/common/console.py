"""One console voice: the jobs' own lines, and Ray's and MLflow's chatter only when asked.

Ray Data prints an execution plan, progress bars and "Starting execution" lines for every
dataset, from the driver and from Train's split coordinators (which inherit the driver's
DataContext); a training run of a few minutes printed ~175 of them. `quiet_ray()` turns those
off before the datasets are built; `--verbose` (DEEPLAB_VERBOSE=1) on the entry scripts keeps
Ray's and MLflow's defaults everywhere.

Ray's worker processes (split coordinators, Train's dataset manager) do not inherit the driver's
logging levels: what they need travels as environment variables of the local cluster we start
(`local_cluster_env`).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile

_RAY_LOGGERS = ("ray.data", "ray.train", "ray.tune")
# Warns once per process that progress bars are off - which is our choice, made in quiet_ray.
_RAY_DATA_PROGRESS_LOGGER = "ray.data._internal.progress"
# Ray >= 2.59 turns token authentication on for a new local cluster and says so each start.
_RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
_RAY_AUTH_NOTICE = "Token authentication is enabled for this Ray cluster"


def is_verbose() -> bool:
    return os.environ.get("DEEPLAB_VERBOSE") == "1"


def set_verbose(verbose: bool) -> bool:
    """Records `--verbose` for every later check in this process; whether it is on."""
    if verbose:
        os.environ["DEEPLAB_VERBOSE"] = "1"
    return is_verbose()


def quiet_mlflow(verbose: bool = False) -> None:
    """MLflow logs at INFO by default ("Creating initial MLflow database tables...", alembic's
    migrations) and draws a tqdm bar for every artifact copy (a model log "downloads" its local
    files); the jobs print what matters themselves. The caller's MLFLOW_* settings win."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is first imported
    level = getattr(logging, os.environ["MLFLOW_LOGGING_LEVEL"].upper(), logging.WARNING)
    for name in ("mlflow", "alembic"):  # already imported: mlflow set its own level then
        logging.getLogger(name).setLevel(level)
    if not set_verbose(verbose):
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # read at each copy


def quiet_ray(verbose: bool = False) -> None:
    """Call before building any Ray Data dataset. With `verbose`, Ray keeps its own defaults."""
    if set_verbose(verbose):
        return
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    for name in _RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger(_RAY_DATA_PROGRESS_LOGGER).setLevel(logging.ERROR)


class _DropNotice(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet_local_ray_start() -> None:
    """Drops Ray's "token authentication is enabled" notice (a new local cluster gets token
    auth by default; it stays on). Only that notice: its "disabled" warning still shows."""
    if not is_verbose():
        logging.getLogger(_RAY_AUTH_LOGGER).addFilter(_DropNotice(_RAY_AUTH_NOTICE))


def local_cluster_env() -> dict[str, str]:
    """Environment variables for the workers of a local cluster we start: Ray Data's logging
    config (RAY_DATA_LOGGING_CONFIG, Ray's documented hook) with its console handler at WARNING
    - the split coordinators print "Dataset ... execution finished" at INFO every epoch - and
    the progress-bars-off notice dropped. The files under the session's ray-data.log keep all."""
    if is_verbose() or "RAY_DATA_LOGGING_CONFIG" in os.environ:
        return {}
    try:
        from ray.data._internal.logging import DEFAULT_CONFIG
    except ImportError:  # a Ray without it: its own defaults, a few lines more
        return {}
    config = json.loads(json.dumps(DEFAULT_CONFIG))
    config["handlers"]["console"]["level"] = "WARNING"
    config["loggers"][_RAY_DATA_PROGRESS_LOGGER] = {"level": "ERROR"}
    text = json.dumps(config, sort_keys=True)  # JSON is YAML, which Ray Data reads
    # A private folder of this run's own (mode 0700, unpredictable name), never reused: a fixed
    # name in the shared /tmp would let another local user plant a config whose handler class
    # runs code in every worker. Removed when the driver exits (its local Ray goes with it).
    folder = tempfile.mkdtemp(prefix="deeplab-ray-data-logging-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = os.path.join(folder, "logging.yaml")
    with open(path, "x") as f:
        f.write(text)
    return {"RAY_DATA_LOGGING_CONFIG": path}
