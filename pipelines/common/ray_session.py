"""Connecting to Ray and deciding on GPUs: one way for every job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

# The local cluster's reaper (see local_ray_reaper.py); kept so its stdin pipe stays open for
# as long as this process lives.
_reaper: subprocess.Popen | None = None


def ensure_ray(reserved_cpus: int = 0, verbose: bool = False) -> None:
    """Connect to `RAY_ADDRESS` (a cluster, or `ray job submit`'s), else start a local Ray.

    A local Ray gets at least `reserved_cpus + 2` logical CPUs: training workers hold theirs for
    the whole run, and the Ray Data tasks feeding them need some left over or ingestion stalls.
    It ends with this process, however this process ends (`start_reaper`).
    """
    import ray

    from pipelines.common.console import local_cluster_env, quiet_local_ray_start, quiet_ray

    quiet_ray(verbose)
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="WARNING")
        return
    # A local cluster cannot be preempted; Train's preemption watcher only logs an E-level
    # "actor constructor failed" line there.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    quiet_local_ray_start()
    # Ray's internals that ask the state API from inside the cluster (Ray Train's placement-group
    # cleaner) look for "the" local Ray when given no address, and print a 30-line "multiple
    # active Ray instances" traceback when another Ray runs on this machine: name our dashboard.
    port = _free_port()
    env_vars = {**local_cluster_env(), "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
    ray.init(num_cpus=max(os.cpu_count() or 1, reserved_cpus + 2), logging_level="WARNING",
             dashboard_host="127.0.0.1", dashboard_port=port, runtime_env={"env_vars": env_vars})
    start_reaper()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def exit_now(code: int) -> NoReturn:
    """Ends an entry script's process with `code` at once, without the interpreter's finalisation
    (2-3 s of module teardown once torch, Ray and pyarrow are loaded) or Ray's graceful stop of a
    local cluster (1.5-2 s): the tail after a segment run's summary was 6 s. A local cluster is
    ours: its GCS and raylet die with this process (Ray's fate-sharing) and the reaper ends the
    rest, as after any exit. A cluster we only joined is left with `ray.shutdown()` first. Call
    it only when all output is written (stdio and logging are flushed here)."""
    import logging

    if _reaper is None and "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def start_reaper() -> subprocess.Popen:
    """A watcher that ends this process's descendants (the local Ray) once this process is gone,
    even by SIGKILL: Ray's own fate-sharing misses the raylet's agents (local_ray_reaper.py)."""
    global _reaper
    if _reaper is not None and _reaper.poll() is None:
        return _reaper
    import psutil  # Ray's bundled copy once ray is imported

    env = {**os.environ, "PYTHONPATH": str(Path(psutil.__file__).resolve().parents[1])}
    _reaper = subprocess.Popen([sys.executable, str(Path(__file__).with_name("local_ray_reaper.py")), str(os.getpid())],
                               stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
    return _reaper


def use_gpu(setting: str | bool, needed: int = 1) -> bool:
    """`"auto"`: whether the cluster has `needed` GPUs; `"cuda"`/True: yes; `"cpu"`/False: no."""
    if setting == "auto":
        import ray

        return ray.cluster_resources().get("GPU", 0) >= needed
    return setting is True or setting == "cuda"
