"""The ledger's rules and the output lease, on local files (no Ray): what a run selects, how
errors turn permanent, compaction, and that exactly one of many racing runs gets the lease."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pytest

from pipelines.segmentation import ledger, lease

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


def needs(settled: dict | None, size=10, etag=None, mtime=T0, **kw) -> tuple[bool, int]:
    """ledger.select for one listed input against one settled entry (or none)."""
    options = {"max_attempts": 3, "reprocess_changed": True, "retry_errors": False, **kw}
    listed = ledger.listed_table([SimpleNamespace(id="a", uri="u", size=size, etag=etag, mtime=mtime)])
    entries = [] if settled is None else [{"id": "a", "uri": "u", "size": 10, "etag": None, "mtime": T0,
                                           "status": "ok", "kind": None, "attempts": 0, **settled}]
    work, attempts = ledger.select(listed, pa.Table.from_pylist(entries, schema=ledger.LEDGER_SCHEMA), **options)
    return bool(work[0]), int(attempts[0])


def test_what_a_run_selects():
    ok, transient, permanent = {}, {"status": "error", "kind": "transient"}, {"status": "error", "kind": "permanent"}
    assert needs(None) == (True, 0)  # never settled, whatever its time
    assert needs(ok) == (False, 0)
    assert needs(ok, size=11) == (True, 0)  # changed: processed again
    assert needs(ok, mtime=T0 + timedelta(seconds=1)) == (True, 0)  # no etag: the mtime tells
    assert needs({"etag": "x"}, etag="x", mtime=T0 + timedelta(days=1)) == (False, 0)  # the etag wins
    assert needs({"etag": "x"}, etag="y") == (True, 0)
    assert needs({"size": None, "mtime": None}) == (False, 0)  # migrated entries: unknown is unchanged
    assert needs(ok, size=11, reprocess_changed=False) == (False, 0)
    assert needs({**transient, "attempts": 2}) == (True, 2)
    assert needs({**transient, "attempts": 3}) == (False, 3)  # used up (recorded permanent by then)
    assert needs({**permanent, "attempts": 0}) == (False, 0)
    assert needs({**permanent, "attempts": 3}, retry_errors=True) == (True, 0)
    assert needs({**permanent, "attempts": 3}, size=11) == (True, 0)  # a fixed file is tried again


def test_transient_errors_turn_permanent_after_max_attempts():
    def row(stage, before):
        return ledger.ledger_row("a", "u", 1, None, T0, "error", stage, "why", before, 3, "r")

    assert (row("image", 0)["kind"], row("image", 0)["attempts"]) == ("permanent", 0)
    assert (row("read", 0)["kind"], row("read", 0)["attempts"]) == ("transient", 1)
    last = row("model", 2)
    assert (last["kind"], last["attempts"]) == ("permanent", 3) and last["reason"].startswith("gave up after 3")
    assert ledger.ledger_row("a", "u", 1, None, T0, "ok", None, None, 2, 3, "r")["attempts"] == 0


def test_latest_entry_wins_and_compaction_keeps_only_it(tmp_path):
    out = str(tmp_path / "out")
    for n in range(4):
        rows = [ledger.ledger_row("a", "u", n, None, T0, "ok", None, None, 0, 3, f"r{n}", T0 + timedelta(n)),
                ledger.ledger_row(f"only{n}", "u", 1, None, T0, "ok", None, None, 0, 3, f"r{n}", T0)]
        ledger.write_entries(out, f"r{n}", rows)
    files = ledger.ledger_files(out).settled
    before = ledger.read_ledger(out)
    assert not ledger.compact(out, "r9", files, max_files=4)
    assert ledger.compact(out, "r9", files, max_files=3)
    assert [p.rsplit("/", 1)[1] for p in ledger.ledger_files(out).settled] == ["c-r9.parquet"]
    after = ledger.read_ledger(out)
    assert after.sort_by("id").equals(before.sort_by("id")) and after.num_rows == 5
    assert {r["id"]: r["size"] for r in after.to_pylist()}["a"] == 3


def test_one_of_many_racing_runs_gets_the_lease(tmp_path):
    out, won, busy = str(tmp_path / "out"), [], []
    start = threading.Barrier(8)

    def run(name):
        start.wait()
        try:
            won.append(lease.acquire(out, name, ttl_s=30))
        except lease.LeaseBusy:
            busy.append(name)

    threads = [threading.Thread(target=run, args=(f"run{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(busy) == 7
    won[0].release()
    assert lease.acquire(out, "next", ttl_s=30).epoch == 2


def test_a_half_written_lease_counts_as_held(tmp_path):
    out = str(tmp_path / "out")
    (tmp_path / "out" / "_lease").mkdir(parents=True)
    (tmp_path / "out" / "_lease" / "000000000001.json").write_text("")  # being created
    with pytest.raises(lease.LeaseBusy, match="starting"):
        lease.acquire(out, "me")


def test_checkpoints_of_a_killed_run_are_settled_once(tmp_path):
    from pipelines.segmentation.io import RESULTS_SCHEMA, read_results

    out = str(tmp_path / "out")

    def recorder(run):
        return ledger.RunRecorder(out, run, RESULTS_SCHEMA, flush_rows=1)

    def rows(i, run):
        result = {"id": f"i{i}", "uri": f"u{i}", "status": "ok", "run_id": run, "finished_at": T0}
        return [result], [ledger.ledger_row(f"i{i}", f"u{i}", 1, None, T0, "ok", None, None, 0, 3, run)]

    killed = recorder("killed")  # checkpoints of 2 inputs, then killed
    for i in range(2):
        killed.add(*rows(i, "killed"))
    finished = recorder("late")  # killed after its ledger file, before removing its checkpoints
    for i in range(2, 5):
        finished.add(*rows(i, "late"))
    finished.finish()  # removes its checkpoints; put one back as the leftover of a kill
    recorder("late").add(*rows(2, "late"))

    files = ledger.ledger_files(out)
    assert sorted(files.pending) == ["killed", "late"]
    assert ledger.fold_pending(out, files, RESULTS_SCHEMA) == 2
    files = ledger.ledger_files(out)
    assert not files.pending
    assert sorted(r["id"] for r in ledger.read_ledger(out).to_pylist()) == [f"i{i}" for i in range(5)]
    assert sorted(read_results(out).column("id").to_pylist()) == [f"i{i}" for i in range(5)]
