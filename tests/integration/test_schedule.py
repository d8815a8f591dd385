"""Scheduled segmentation (`--since last`, the CronJob's command) on local folders and moto S3:
the ledger never skips an input, retries what may heal and not what cannot, survives an input
that kills its worker, and lets one run at a time work on an output.

After every scenario: every listed input is settled (ok or an error record) and each ok input
has exactly one mask. Times of S3 objects are the server's: the tests that need an old or a
future `LastModified` set it in moto's own backend (the server runs in this process), as an
object uploaded slowly or by a skewed clock would carry it.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from deeplab_core.synthetic import SyntheticSpec, render_scene
from pipelines.common.uris import join_uri
from pipelines.data.storage import get_fs
from pipelines.data.synthetic import encode_scene
from pipelines.segmentation.config import SegmentConfig
from pipelines.segmentation.job import run_segmentation
from tests.helpers import untrained_checkpoint

REPO = Path(__file__).resolve().parents[2]
SPEC = SyntheticSpec(height=32, width=48)
OLD = datetime(2020, 1, 1, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return untrained_checkpoint(tmp_path_factory.mktemp("ckpt"), SPEC.num_classes)


class Place:
    """An input prefix and an output prefix on one backend, and what a test does to files there."""

    def __init__(self, kind: str, root: str, options: dict | None) -> None:
        self.kind, self.root, self.options = kind, root, options
        self.input, self.output = join_uri(root, "incoming"), join_uri(root, "segmented")
        self.fs, _ = get_fs(root, options)

    def path(self, name: str) -> str:
        return get_fs(join_uri(self.input, name), self.options)[1]

    def put(self, name: str, when: datetime | None = None, data: bytes | None = None, **kwargs) -> None:
        if data is None:
            data, _ = encode_scene(*render_scene(SPEC, seed=sum(map(ord, name))), jpeg_quality=85)
        if self.kind == "local":
            Path(self.path(name)).parent.mkdir(parents=True, exist_ok=True)
            Path(self.path(name)).write_bytes(data)
        else:
            self.fs.pipe_file(self.path(name), data, **kwargs)
        if when is not None:
            self.set_time(name, when)

    def set_time(self, name: str, when: datetime) -> None:
        if self.kind == "local":
            os.utime(self.path(name), (when.timestamp(), when.timestamp()))
            return
        from moto.s3.models import s3_backends

        bucket, key = self.path(name).split("/", 1)
        backend = next(b for a in s3_backends.values() for b in a.values() if bucket in b.buckets)
        backend.get_object(bucket, key).last_modified = when.replace(tzinfo=None)

    def cfg(self, checkpoint: str, **kwargs) -> SegmentConfig:
        values = dict(model=checkpoint, input=self.input, output=self.output, scales=(1.0,), flip=False, crf=False,
                      since="last", batch_size=2, storage_options=self.options, progress_every_s=60, **kwargs)
        # Settings the version before the ledger lacks are left out there: each scenario then
        # runs on that version as it is, and fails on what it does (checked against it).
        return SegmentConfig(**{k: v for k, v in values.items() if k in SegmentConfig.model_fields})

    def listed(self, sub: str, suffix: str) -> list[str]:
        uri = join_uri(self.output, sub) if sub else self.input
        _, base = get_fs(uri, self.options)
        self.fs.invalidate_cache()
        try:
            return sorted(p[len(base.rstrip("/")) + 1:] for p in self.fs.find(base) if p.endswith(suffix))
        except FileNotFoundError:
            return []


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path) -> Place:
    if request.param == "local":
        return Place("local", str(tmp_path), None)
    options = request.getfixturevalue("s3_options")
    bucket = request.getfixturevalue("s3_bucket")
    return Place("s3", bucket, options)


def segment(cfg: SegmentConfig):
    with contextlib.redirect_stdout(io.StringIO()):
        return run_segmentation(cfg)


def ledger_view(place: Place) -> dict[str, dict]:
    from pipelines.segmentation.ledger import read_ledger

    return {row["id"]: row for row in read_ledger(place.output, place.options).to_pylist()}


def assert_all_settled(place: Place) -> None:
    """inputs == settled (ok + errors: the results view, which every version writes, and the
    ledger where there is one), and each ok input has exactly one mask, nothing else."""
    from pipelines.segmentation.io import read_results

    inputs = {name.rsplit(".", 1)[0] for name in place.listed("", ".jpg")}
    results = {row["id"]: row["status"] for row in read_results(place.output, place.options).to_pylist()}
    assert set(results) == inputs
    ok = {i for i, status in results.items() if status == "ok"}
    assert place.listed("masks", ".png") == sorted(f"{i}.png" for i in ok)
    if SegmentConfig.model_fields.get("max_attempts"):  # the ledger agrees with the results
        view = ledger_view(place)
        assert {i: row["status"] for i, row in view.items()} == results
        assert all(row["kind"] in ("transient", "permanent") for row in view.values() if row["status"] == "error")


# --------------------------------------------------------------------------- scenarios


def test_late_old_and_future_dated_files_are_all_processed(ray_cluster, checkpoint, place):
    now = datetime.now(timezone.utc)
    place.put("a.jpg")
    place.put("future.jpg", when=now + timedelta(days=365))  # a skewed clock
    cfg = place.cfg(checkpoint)
    first = segment(cfg)
    assert (first.read, first.ok, first.errors) == (2, 2, 0)

    place.put("late_old.jpg", when=OLD)  # `mv`, `rsync -a`, a camera uploading late
    place.put("b.jpg")
    second = segment(cfg)
    assert (second.read, second.ok, second.skipped, second.errors) == (4, 2, 2, 0)
    assert_all_settled(place)
    assert {i for i, row in ledger_view(place).items() if row["run_id"] == second.run_id} == {"late_old", "b"}

    if place.kind == "local":
        return  # the etag (S3) way is enough here; the mtime and size ways: tests/unit/test_ledger.py
    # A changed input (new bytes under the same name, so a new etag) is processed again; an
    # unchanged one never, whatever its time.
    place.put("a.jpg", data=encode_scene(*render_scene(SPEC, seed=99), jpeg_quality=85)[0], when=OLD)
    third = segment(cfg)
    assert (third.ok, third.skipped) == (1, 3)
    assert ledger_view(place)["a"]["run_id"] == third.run_id
    assert_all_settled(place)


def test_transient_errors_are_retried_and_permanent_ones_are_not(ray_cluster, checkpoint, place):
    place.put("good.jpg")
    place.put("corrupt.jpg", data=b"\xff\xd8\xff\xe0 not really a JPEG")  # permanent: undecodable
    if place.kind == "local":  # unreadable: a link whose target is not there yet (then restored old)
        os.symlink(os.path.join(place.root, "restored", "heals.jpg"), place.path("heals.jpg"))
        os.symlink(os.path.join(place.root, "restored", "never.jpg"), place.path("never.jpg"))
        os.utime(place.path("heals.jpg"), (OLD.timestamp(),) * 2, follow_symlinks=False)
    else:  # unreadable: archived (GET -> InvalidObjectState) until restored
        place.put("heals.jpg", when=OLD, StorageClass="GLACIER")
        place.put("never.jpg", when=OLD, StorageClass="GLACIER")
    cfg = place.cfg(checkpoint, max_attempts=2)
    first = segment(cfg)
    assert (first.read, first.ok, first.errors) == (4, 1, 3)
    assert_all_settled(place)

    if place.kind == "local":
        target = Path(place.root, "restored", "heals.jpg")
        target.parent.mkdir()
        target.write_bytes(encode_scene(*render_scene(SPEC, seed=5), jpeg_quality=85)[0])
        os.utime(target, (OLD.timestamp(), OLD.timestamp()))
    else:
        bucket, key = place.path("heals.jpg").split("/", 1)
        place.fs.call_s3("restore_object", Bucket=bucket, Key=key, RestoreRequest={"Days": 1})
    second = segment(cfg)
    # heals is segmented; never fails its 2nd and last attempt; corrupt is not tried again.
    assert (second.ok, second.errors, second.skipped) == (1, 1, 2)
    assert_all_settled(place)
    third = segment(cfg)  # nothing left that may heal: a no-op tick
    assert (third.ok, third.errors, third.skipped) == (0, 0, 4)
    assert_all_settled(place)

    view = ledger_view(place)
    assert (view["corrupt"]["stage"], view["corrupt"]["kind"], view["corrupt"]["run_id"]) == (
        "image", "permanent", first.run_id)
    assert (view["heals"]["status"], view["heals"]["run_id"]) == ("ok", second.run_id)
    assert (view["never"]["stage"], view["never"]["kind"]) == ("read", "permanent")
    assert "gave up after 2 attempts" in view["never"]["reason"]


@pytest.mark.timeout(400)
def test_an_input_that_kills_its_worker_ends_as_one_error_record(ray_cluster, checkpoint, place, monkeypatch):
    stage = "model" if place.kind == "local" else "decode"  # an actor's process, a task's process
    monkeypatch.setenv("DEEPLAB_SEGMENT_TEST_ABORT", f"{stage}:poison")
    for name in ("a.jpg", "poison.jpg", "b.jpg", "c.jpg"):
        place.put(name)
    report = segment(place.cfg(checkpoint, crash_limit=1))
    assert (report.read, report.ok, report.errors) == (4, 3, 1)
    assert report.errors_by_stage == {stage: 1}
    assert_all_settled(place)
    poison = ledger_view(place)["poison"]
    assert (poison["stage"], poison["kind"], poison["attempts"]) == (stage, "transient", 1)
    assert "worker process died" in poison["reason"]
    errors = [row for key in place.listed("errors", ".parquet")
              for row in pq.read_table(place.fs.open(get_fs(join_uri(place.output, "errors", key),
                                                                place.options)[1])).to_pylist()]
    assert [(e["id"], e["stage"]) for e in errors] == [("poison", stage)]


def test_two_runs_started_together_do_the_work_once(ray_cluster, checkpoint, place, s3_server):
    for i in range(4):
        place.put(f"img_{i}.jpg")
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address, "AWS_ENDPOINT_URL": s3_server.endpoint_url}
    cmd = [sys.executable, "pipelines/segment.py", "--model", checkpoint, "--input", place.input,
           "--output", place.output, "--since", "last", "--scales", "1", "--no-flip", "--no-crf",
           "--batch-size", "2"]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outcomes = sorted((p.wait(timeout=300), p.stderr.read()) for p in procs)
    (done, _), (busy, message) = outcomes
    assert (done, busy) == (0, 3), outcomes
    assert message.strip().count("\n") == 0 and "busy: another run holds the lease" in message
    assert_all_settled(place)
    rows = [row["id"] for key in place.listed("results", ".parquet")
            for row in pq.read_table(place.fs.open(get_fs(join_uri(place.output, "results", key),
                                                          place.options)[1])).to_pylist()]
    assert sorted(rows) == [f"img_{i}" for i in range(4)]  # each image once: nothing twice, none lost


def test_a_crashed_runs_lease_expires_and_a_waiting_run_gets_it(place):
    from pipelines.segmentation import lease

    held = lease.acquire(place.output, "crashed", place.options, ttl_s=2.0)
    held._stop.set()  # the run "crashes": no more heartbeats, no release
    with pytest.raises(lease.LeaseBusy, match="run crashed"):
        lease.acquire(place.output, "second", place.options, ttl_s=2.0)
    start = time.monotonic()
    with lease.acquire(place.output, "third", place.options, ttl_s=2.0, wait_s=30, poll_s=0.2) as third:
        assert 1.0 < time.monotonic() - start < 20 and third.epoch == 2
    held.renew()  # the crashed run wakes up: it learns it lost the lease
    with pytest.raises(lease.LeaseLost):
        held.check()
    assert lease.acquire(place.output, "fourth", place.options, ttl_s=2.0).epoch == 3  # released: free


def test_results_of_older_versions_are_read_and_migrated(ray_cluster, checkpoint, tmp_path):
    """An output written per batch by a version without the ledger: nothing is segmented twice
    (the same code reads S3 and local files; one backend is enough here)."""
    import pyarrow as pa

    from pipelines.data.storage import write_atomically
    from pipelines.segmentation.io import RESULTS_SCHEMA, read_results
    from pipelines.segmentation.ledger import parquet_bytes

    place = Place("local", str(tmp_path), None)
    place.put("a.jpg")
    place.put("b.jpg")
    now = datetime.now(timezone.utc)
    for n, name in enumerate(("a", "b")):
        row = {"id": name, "uri": join_uri(place.input, f"{name}.jpg"), "output_uri": "", "overlay_uri": None,
               "status": "ok" if name == "a" else "error", "classes": [0], "seconds_decode": 0.0,
               "seconds_model": 0.0, "seconds_crf": None, "crf_backend": None, "run_id": "old",
               "model_uri": checkpoint, "finished_at": now}
        table = pa.Table.from_pylist([row], schema=pa.schema([f for f in RESULTS_SCHEMA if f.name in row]))
        write_atomically(join_uri(place.output, "results", f"old-{n}.parquet"), parquet_bytes(table), place.options)
    write_atomically(join_uri(place.output, "masks", "a.png"), b"png", place.options)
    report = segment(place.cfg(checkpoint))
    assert (report.ok, report.skipped) == (1, 1)  # b had an error row: segmented; a was finished
    assert ledger_view(place)["b"]["run_id"] == report.run_id
    assert sorted(read_results(place.output, place.options).column("id").to_pylist()) == ["a", "b"]
    assert_all_settled(place)


class Listings:
    """Every listing of ``place`` while recording: directories os.scandir opens (local), or
    (bucket, prefix) of the ListObjects calls moto's backend serves (S3, any client: driver and
    Ray workers). A spy on the real server and filesystem: the calls still happen."""

    def __init__(self, place: Place, monkeypatch) -> None:
        self.place, self.seen = place, []
        if place.kind == "local":
            scandir = os.scandir

            def spy(path=".", *args):
                self.seen.append(os.path.abspath(os.fspath(path)).rstrip("/") + "/")
                return scandir(path, *args)

            monkeypatch.setattr(os, "scandir", spy)
            return
        from moto.s3.models import S3Backend

        for name in ("list_objects", "list_objects_v2"):
            original = getattr(S3Backend, name)

            def spy(backend, bucket, prefix, *args, _original=original, **kwargs):
                self.seen.append(f"{bucket.name}/{prefix or ''}")
                return _original(backend, bucket, prefix, *args, **kwargs)

            monkeypatch.setattr(S3Backend, name, spy)

    def of_images(self) -> list[str]:
        """The listings that would see an image: of the input prefix or anything above it."""
        images = self.place.path("x").rsplit("/", 1)[0].rstrip("/") + "/"
        if self.place.kind == "local":
            images = os.path.abspath(images).rstrip("/") + "/"
        return [p for p in self.seen if images.startswith(p) or p.startswith(images)]


def test_a_feed_of_manifests_settles_new_keys_once_without_listing_the_images(
        ray_cluster, checkpoint, place, monkeypatch):
    """`--input '<feed>/*.parquet'`: each manifest names new keys (what an event-notification
    writer or S3 Inventory delivers); a tick reads the feed and the ledger, lists no image."""
    from pipelines.data.manifest import write_manifest
    from pipelines.segmentation.io import read_results

    names = [f"a{i}" for i in range(3)] + [f"b{i}" for i in range(3)]
    for name in names:
        place.put(f"{name}.jpg")
    feed = join_uri(place.root, "feed")

    def deliver(number: int, ids: list[str]) -> None:
        rows = [{"id": i, "image_uri": join_uri(place.input, f"{i}.jpg")} for i in ids]
        write_manifest(rows, join_uri(feed, f"{number:04d}.parquet"), place.options)

    cfg = place.cfg(checkpoint).model_copy(update={"input": join_uri(feed, "*.parquet")})
    listings = Listings(place, monkeypatch)
    deliver(1, ["a0", "a1", "a2"])
    first = segment(cfg)
    assert (first.read, first.ok, first.skipped, first.errors) == (3, 3, 0, 0)

    # Two deliveries before the next tick, one repeating a settled key (notifications come at
    # least once): the new keys of both are processed, the repeat is skipped.
    deliver(2, ["b0", "a1"])
    deliver(3, ["b1", "b2"])
    second = segment(cfg)
    assert (second.read, second.ok, second.skipped, second.errors) == (6, 3, 3, 0)
    noop = segment(cfg)  # nothing delivered since
    assert (noop.read, noop.ok, noop.skipped, noop.errors) == (6, 0, 6, 0)

    assert listings.seen and listings.of_images() == []  # the feed and the output were listed, no image
    monkeypatch.undo()
    assert_all_settled(place)
    assert {i for i, row in ledger_view(place).items() if row["run_id"] == second.run_id} == {"b0", "b1", "b2"}
    rows = [row["id"] for key in place.listed("results", ".parquet")
            for row in pq.read_table(place.fs.open(get_fs(join_uri(place.output, "results", key),
                                                          place.options)[1])).to_pylist()]
    assert sorted(rows) == sorted(names)  # each image processed exactly once
    assert sorted(read_results(place.output, place.options).column("id").to_pylist()) == sorted(names)
