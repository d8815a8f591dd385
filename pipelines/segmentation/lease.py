"""One run per output at a time: a lease on the output prefix, with a heartbeat and an expiry.

The lease is a sequence of create-only objects ``<output>/_lease/<epoch>.json``; the holder is
whoever created the highest epoch. Taking the lease = creating epoch ``E+1`` when epoch ``E`` is
released or expired. Creation is exclusive on every backend we support:

- object stores: ``PutObject`` with ``If-None-Match: *`` (s3fs ``pipe_file(mode="create")``);
  S3 refuses a second creation of a key (412), and so does moto's server;
- local and mounted filesystems: ``open(O_CREAT | O_EXCL)``.

So two runs that find the same expired epoch race on one key and exactly one wins. The holder
rewrites its own epoch every ``ttl/3`` seconds (heartbeat); before each rewrite it checks that no
higher epoch exists, so a holder that stalled past its expiry learns it lost the lease and stops
(``lost`` is set; the job checks it between batches and before writing its ledger). A crashed
run's lease simply expires. Clocks of the machines that share an output must agree to well
within the TTL (expiry is judged on the time written in the object).
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pipelines.common.errors import EXIT_BUSY, JobExit
from pipelines.common.uris import is_local, join_uri
from pipelines.data.storage import get_fs, make_parent_dirs, write_atomically

LEASE_DIR = "_lease"


class LeaseBusy(JobExit, RuntimeError):
    """Another live run holds the lease on this output (segment.py exits EXIT_BUSY: nothing done)."""

    exit_code, label = EXIT_BUSY, "busy"


class LeaseLost(RuntimeError):
    """This run's lease was taken over (it stalled past its expiry)."""


def _epoch_name(epoch: int) -> str:
    return f"{epoch:012d}.json"


def _now() -> float:
    return time.time()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds")


def create_exclusive(uri: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Creates ``uri`` with ``data`` only if it does not exist; False if it already did."""
    fs, path = get_fs(uri, storage_options)
    make_parent_dirs(fs, path, uri)
    if is_local(uri):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    try:
        fs.pipe_file(path, data, mode="create")  # PutObject If-None-Match: *
    except FileExistsError:
        return False
    return True


@dataclass
class Lease:
    """A held lease; use as a context manager (or call ``release``)."""

    output: str
    run_id: str
    epoch: int
    ttl_s: float
    storage_options: Mapping[str, Any] | None = None
    lost: str | None = None  # why the lease was lost, once it was
    # The run before this one held the lease and never released it: it died (killed, crashed).
    previous_died: bool = False
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def uri(self, epoch: int | None = None) -> str:
        return join_uri(self.output, LEASE_DIR, _epoch_name(self.epoch if epoch is None else epoch))

    def body(self, released: bool = False) -> bytes:
        now = _now()
        return json.dumps({"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                           "renewed_at": now, "expires_at": now + self.ttl_s, "ttl_s": self.ttl_s,
                           "expires": _iso(now + self.ttl_s), "released": released}).encode()

    def check(self) -> None:
        """Raises LeaseLost once the heartbeat has found the lease taken over."""
        if self.lost:
            raise LeaseLost(f"lost the lease on {self.output}: {self.lost}")

    def renew(self) -> None:
        fs, path = get_fs(self.uri(self.epoch + 1), self.storage_options)
        fs.invalidate_cache(posixpath.dirname(path))
        if fs.exists(path):
            self.lost = f"another run took epoch {self.epoch + 1} (this run stalled past its expiry)"
            return
        write_atomically(self.uri(), self.body(), self.storage_options)

    def _beat(self) -> None:
        last_ok = _now()
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
                last_ok = _now()
            except Exception as err:  # noqa: BLE001 - storage hiccup: retried until the expiry
                if _now() - last_ok > self.ttl_s:
                    self.lost = f"could not renew for {self.ttl_s:.0f} s ({type(err).__name__})"
            if self.lost:
                return

    def start(self) -> "Lease":
        self._thread = threading.Thread(target=self._beat, name="segment-lease", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if not self.lost:
            write_atomically(self.uri(), self.body(released=True), self.storage_options)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _epochs(output: str, storage_options) -> list[int]:
    fs, path = get_fs(join_uri(output, LEASE_DIR), storage_options)
    fs.invalidate_cache(path)
    try:
        names = [posixpath.basename(p) for p in fs.find(path)]
    except FileNotFoundError:
        return []
    return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())


def holder(output: str, storage_options: Mapping[str, Any] | None = None) -> tuple[int, dict | None]:
    """(highest epoch, its body) — (0, None) when no lease was ever taken; a body that cannot be
    read yet (just being created) reads as ``{}``, i.e. held."""
    epochs = _epochs(output, storage_options)
    if not epochs:
        return 0, None
    fs, path = get_fs(join_uri(output, LEASE_DIR, _epoch_name(epochs[-1])), storage_options)
    try:
        return epochs[-1], json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return epochs[-1], None  # deleted by a newer holder between the listing and the read
    except ValueError:
        return epochs[-1], {}


def _is_live(body: dict | None, now: float) -> bool:
    if body is None:
        return False
    if not body:
        return True
    return not body.get("released") and float(body.get("expires_at", 0)) > now


def describe(body: dict | None) -> str:
    if not body:
        return "a run that is starting"
    return f"run {body.get('run_id')} on {body.get('host')} (pid {body.get('pid')}) until {body.get('expires')}"


def acquire(output: str, run_id: str, storage_options: Mapping[str, Any] | None = None, ttl_s: float = 300.0,
            wait_s: float = 0.0, poll_s: float = 2.0) -> Lease:
    """Takes the lease on ``output`` (waiting up to ``wait_s`` for a live holder to finish) and
    starts its heartbeat; raises LeaseBusy when another live run keeps it."""
    deadline = _now() + wait_s
    while True:
        epoch, body = holder(output, storage_options)
        if epoch and body is None:
            continue  # replaced between the listing and the read: look again
        if not _is_live(body, _now()):
            lease = Lease(output, run_id, epoch + 1, ttl_s, storage_options,
                          previous_died=bool(body) and not body.get("released"))
            if create_exclusive(lease.uri(), lease.body(), storage_options):
                if epoch:  # history: deleting it keeps the listing one key long
                    fs, path = get_fs(lease.uri(epoch), storage_options)
                    fs.rm_file(path)
                return lease.start()
            continue  # another run created it first: look again
        if _now() >= deadline:
            raise LeaseBusy(f"another run holds the lease on {output}: {describe(body)}")
        time.sleep(max(0.05, min(poll_s, deadline - _now())))
