"""A local Ray started by `ensure_ray` ends with its driver, even a SIGKILLed one (issue #13, 8c),
and Ray's internals that ask the state API from inside it (Ray Train's placement-group cleaner)
find it while another Ray runs on the machine (the session's): before, they auto-detected and
printed a 30-line "multiple active Ray instances" traceback in every training run.

Starts its own local cluster in a driver subprocess (not the session's); only the processes
descended from that driver are ever inspected or killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray  # noqa: F401 - puts Ray's bundled psutil on sys.path

import psutil  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

DRIVER = """
import sys, time
from pipelines.common.ray_session import ensure_ray
ensure_ray()
import ray
ray.get(ray.remote(lambda: 1).remote())  # a worker process too

@ray.remote
def actors_seen_from_inside():  # what Ray Train's PlacementGroupCleaner does: no address given
    from ray.util.state import list_actors
    return sorted(a.name for a in list_actors() if a.name)

marker = ray.remote(type("Marker", (), {"ping": lambda self: 1})).options(name="ours-marker").remote()
ray.get(marker.ping.remote())
print("state api:", ray.get(actors_seen_from_inside.remote()), flush=True)
print("ready", flush=True)
time.sleep(600)
"""


def _start_driver(tmp_path: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray of its own
    env["PYTHONPATH"] = str(REPO)
    return subprocess.Popen([sys.executable, "-c", DRIVER], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_ready(driver: subprocess.Popen, timeout_s: float) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout_s
    for line in driver.stdout:
        lines.append(line)
        if line.startswith("ready") or time.monotonic() > deadline:
            break
    return lines


def _running(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (a zombie has ended; its reaping is up to whoever adopted it)."""
    running = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                running.append(process)
        except psutil.NoSuchProcess:
            pass
    return running


def _wait_gone(processes: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    while (alive := _running(processes)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return alive


def test_sigkilled_driver_leaves_no_ray_process(tmp_path, ray_cluster):
    driver = _start_driver(tmp_path)  # ray_cluster: another Ray on this machine
    descendants: list[psutil.Process] = []
    try:
        lines = _wait_ready(driver, timeout_s=180)
        assert lines and lines[-1].startswith("ready"), "".join(lines)[-3000:]
        assert "state api: ['ours-marker']\n" in lines, "".join(lines)[-3000:]
        time.sleep(3)  # the reaper's first look at the tree (it polls every 2 s)
        descendants = psutil.Process(driver.pid).children(recursive=True)
        names = {p.name() for p in descendants}
        assert "raylet" in names and "gcs_server" in names, names
        assert any("RuntimeEnvAgent" in n or "DashboardAgent" in n for n in names), names  # what used to stay
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=10)
        # Without the reaper the raylet's agents outlived the driver by ~60 s.
        alive = _wait_gone(descendants, timeout_s=20)
        assert not alive, [(p.pid, p.name()) for p in alive]
    finally:
        if driver.poll() is None:
            driver.kill()
        for process in descendants:  # whatever this test started, never anything else
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
