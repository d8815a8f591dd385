"""Connecting to Ray and deciding on GPUs: one way for every job."""

from __future__ import annotations

import os


def ensure_ray(reserved_cpus: int = 0, verbose: bool = False) -> None:
    """Connect to `RAY_ADDRESS` (a cluster, or `ray job submit`'s), else start a local Ray.

    A local Ray gets at least `reserved_cpus + 2` logical CPUs: training workers hold theirs for
    the whole run, and the Ray Data tasks feeding them need some left over or ingestion stalls.
    """
    import ray

    from pipelines.common.console import quiet_ray

    quiet_ray(verbose)
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="WARNING")
    else:
        # A local cluster cannot be preempted; Train's preemption watcher only logs an E-level
        # "actor constructor failed" line there.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        ray.init(num_cpus=max(os.cpu_count() or 1, reserved_cpus + 2), logging_level="WARNING")


def use_gpu(setting: str | bool, needed: int = 1) -> bool:
    """`"auto"`: whether the cluster has `needed` GPUs; `"cuda"`/True: yes; `"cpu"`/False: no."""
    if setting == "auto":
        import ray

        return ray.cluster_resources().get("GPU", 0) >= needed
    return setting is True or setting == "cuda"
