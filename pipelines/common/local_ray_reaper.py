"""Ends the processes a driver started once the driver is gone; `ensure_ray` runs it beside
the local Ray cluster it starts (`python local_ray_reaper.py DRIVER_PID`, stdin a pipe from the
driver).

Ray fate-shares only the processes a driver spawns itself (PR_SET_PDEATHSIG: gcs_server, raylet,
dashboard, monitors). The raylet's own children, the dashboard agent and the runtime-env agent,
see the raylet die within a second but then spend up to 60 s reporting it to the GCS (dead as
well) before exiting, so after a SIGKILL of the driver they outlive it by a minute. This process
keeps a list of the driver's descendants; when its stdin reaches end-of-file (the driver exited,
whatever the way) it terminates those still running, then kills what is left.

Standalone on purpose: it must not import the job's code (or Ray), only psutil.
"""

from __future__ import annotations

import os
import select
import signal
import sys

import psutil

POLL_S = 2.0  # how often the list is refreshed (Ray's processes start before this does)
GRACE_S = 3.0  # between SIGTERM and SIGKILL


def _descendants(driver: psutil.Process, me: int) -> dict[int, psutil.Process]:
    # psutil.Process keeps the creation time: a pid reused later is not taken for ours.
    return {p.pid: p for p in driver.children(recursive=True) if p.pid != me}


def _driver_gone(timeout_s: float) -> bool:
    readable, _, _ = select.select([sys.stdin], [], [], timeout_s)
    return bool(readable) and not os.read(sys.stdin.fileno(), 4096)


def watch(driver_pid: int) -> dict[int, psutil.Process]:
    """Until the driver is gone: its descendants, as last seen (plus earlier ones still alive)."""
    me = os.getpid()
    seen: dict[int, psutil.Process] = {}
    try:
        driver = psutil.Process(driver_pid)
        while True:
            seen = {pid: p for pid, p in seen.items() if p.is_running()}
            seen.update(_descendants(driver, me))
            if _driver_gone(POLL_S):
                break
    except psutil.NoSuchProcess:
        pass
    return seen


def end(processes: list[psutil.Process]) -> None:
    alive = [p for p in processes if p.is_running()]
    for process in alive:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, still = psutil.wait_procs(alive, timeout=GRACE_S)
    for process in still:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def main() -> int:
    # Ctrl-C and a group SIGTERM reach the driver too: it shuts its Ray down, and this process
    # cleans up only after the driver has gone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    end(list(watch(int(sys.argv[1])).values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
