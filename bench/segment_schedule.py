"""The scheduled tick's fixed cost: `segment.py --since last` after N settled inputs.

For each storage (local disk, moto S3 on loopback) and N (default 1k, 10k, 100k), a fresh child
process builds the state N earlier runs would have left, then times two ticks:

- no-op: nothing new under the input prefix;
- +10: ten new images (a tiny DeepLabv3+ MobileNetV2 x0.25, scale 1, no CRF: the model is not
  what is measured; Ray is started before the tick and not counted).

`--inputs` chooses how the tick learns of its inputs (column "input"):

- listing: `--input <prefix>`, the N images under it, listed every tick;
- feed: `--input '<feed>/*.parquet'`, every manifest an upstream writer delivered (N/1,000
  manifests of 1,000 settled keys, plus one of the 10 new keys for +10); the tick lists the feed
  folder, not the images;
- manifest: `--input <feed>/new.parquet`, only the latest delivery (empty for the no-op, the 10
  new keys for +10).

With a feed or a manifest the N settled images are not written (no tick reads or lists them:
only the ledger's N entries and the feed's manifests exist); the 10 new images are.

Columns: wall seconds; requests (S3: every HTTP request moto's server logged during the tick,
from the driver and the Ray workers; local: filesystem calls through fsspec in the driver,
outermost calls only); peak RSS of the driver above its level before the tick (MiB, sampled).

The state is that of the code being measured: with the ledger (this version) the inputs as
listed, settled in one compacted ledger file; without it (the version before the ledger) one
results part per batch of 4 images, every mask, and `_state.json`'s watermark. `--code
LABEL=DIR` (repeatable) measures other checkouts' `pipelines` too, each configuration of them
right after this one's (a shared machine's load then weighs on both alike; every row records the
1-minute load average):

    python bench/segment_schedule.py                                    # this checkout, table
    git archive <before> | tar -x -C /tmp/before                        # the version before
    python bench/segment_schedule.py --code before=/tmp/before --json rows.jsonl --output docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTION = "Scheduled segmentation: the tick's fixed cost"
NEW_IMAGES = 10


# --------------------------------------------------------------------------- measuring


class PeakRSS:
    """The process's resident set, sampled every 5 ms; ``peak_mib`` above the level at start."""

    def __init__(self) -> None:
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def peak_mib(self) -> float:
        return (self.peak - self.start) / 2**20


class LocalCalls:
    """Counts outermost fsspec LocalFileSystem calls (a call made inside another is not counted)
    and os.scandir calls (one per directory listed: the listing walks with it, not with fsspec)."""

    NAMES = ("ls", "find", "info", "exists", "isdir", "isfile", "_open", "cat_file", "pipe_file", "rm", "rm_file",
             "mv", "makedirs", "mkdir", "put_file", "get_file", "touch", "glob", "walk")

    def __init__(self) -> None:
        from fsspec.implementations.local import LocalFileSystem

        self.count, self._depth = 0, threading.local()
        for name in self.NAMES:
            original = getattr(LocalFileSystem, name, None)
            if original is not None:
                setattr(LocalFileSystem, name, self._wrap(original))
        self.listings = 0
        scandir = os.scandir

        def counted_scandir(*args, **kwargs):
            self.listings += 1
            if getattr(self._depth, "n", 0) == 0:
                self.count += 1
            return scandir(*args, **kwargs)

        os.scandir = counted_scandir

    def _wrap(self, original):
        def counted(*args, **kwargs):
            depth = getattr(self._depth, "n", 0)
            if depth == 0:
                self.count += 1
            self._depth.n = depth + 1
            try:
                return original(*args, **kwargs)
            finally:
                self._depth.n = depth
        return counted


class MotoLog:
    """moto's server in its own process; its access log (one line per HTTP request) is the count."""

    def __init__(self, workdir: Path) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = workdir / "moto.log"
        self.proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1",
                                      "-p", str(self.port)], stdout=subprocess.DEVNULL,
                                     stderr=self.log.open("w"))
        self.endpoint = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while "Running on" not in self.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)

    def requests(self) -> list[str]:
        """The logged requests as "METHOD /path" (werkzeug colours non-200 lines)."""
        return [m.group(1) for m in re.finditer(r'"(?:\x1b\[[0-9;]*m)*([A-Z]+ \S+) HTTP/1\.1', self.log.read_text())]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


# --------------------------------------------------------------------------- the state N runs leave


def small_jpeg() -> bytes:
    from deeplab_core.synthetic import SyntheticSpec, render_scene
    from pipelines.data.synthetic import encode_scene

    return encode_scene(*render_scene(SyntheticSpec(height=16, width=16), 0), jpeg_quality=50)[0]


def put_many(fs, files: dict[str, bytes], local: bool) -> None:
    if local:
        for path, data in files.items():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_bytes(data)
        return
    items = list(files.items())
    for start in range(0, len(items), 2000):  # s3fs sends a dict's PUTs concurrently
        fs.pipe(dict(items[start:start + 2000]))


def settle_ledger(input_uri: str, output: str, options) -> None:
    """This version: the inputs as listed now, settled ok in one compacted ledger file."""
    from pipelines.segmentation import io as seg_io
    from pipelines.segmentation import ledger

    if hasattr(seg_io, "list_input_table"):
        t = seg_io.list_input_table(input_uri, options, exclude_prefix=output)
        items = zip(*(t[c].to_pylist() for c in ("id", "uri", "size", "etag", "mtime")))
    else:  # the ledger's first version
        items = ((i.id, i.uri, i.size, i.etag, i.mtime)
                 for i in seg_io.list_inputs(input_uri, options, exclude_prefix=output).items)
    rows = [ledger.ledger_row(*item, "ok", None, None, 0, 3, "bench") for item in items]
    ledger.write_entries(output, f"{ledger.COMPACT_PREFIX}bench", rows, options)


def settle_per_batch(fs, input_uri: str, output: str, options, local: bool) -> None:
    """The version before the ledger: a results part per batch of 4, every mask, the watermark."""
    from datetime import datetime, timezone

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.common.uris import join_uri
    from pipelines.data.storage import get_fs
    from pipelines.segmentation import io as seg_io

    listing = seg_io.list_inputs(input_uri, options, exclude_prefix=output)
    now = datetime.now(timezone.utc)
    files = {}
    for start in range(0, len(listing.items), 4):
        rows = [{"id": i.id, "uri": i.uri, "output_uri": join_uri(output, "masks", i.id + ".png"),
                 "overlay_uri": None, "status": "ok", "classes": [0], "seconds_decode": 0.0, "seconds_model": 0.0,
                 "seconds_crf": None, "crf_backend": None, "run_id": "bench", "model_uri": "m", "finished_at": now,
                 "crf_source": None, "crf_params": None} for i in listing.items[start:start + 4]]
        buffer = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows, schema=seg_io.RESULTS_SCHEMA), buffer)
        files[get_fs(join_uri(output, "results", f"bench-{start:08d}.parquet"), options)[1]] = buffer.getvalue().to_pybytes()
    for item in listing.items:
        files[get_fs(join_uri(output, "masks", item.id + ".png"), options)[1]] = b"\x89PNG"
    put_many(fs, files, local)
    seg_io.write_state(output, listing.watermark.isoformat(), {}, options)


# --------------------------------------------------------------------------- one child: one storage, one N


def child(args: argparse.Namespace) -> None:
    if args.code:  # the child gets one plain directory
        sys.path.insert(0, args.code[0])
    sys.path.insert(1, str(REPO))
    import importlib.util

    import torch

    from deeplab_core.models import build_model
    from deeplab_core.synthetic import SyntheticSpec, render_scene
    from pipelines.data.checkpoints import save_checkpoint_dir
    from pipelines.common.uris import join_uri
    from pipelines.data.storage import get_fs
    from pipelines.data.synthetic import encode_scene
    from pipelines.segmentation.config import SegmentConfig
    from pipelines.segmentation.job import run_segmentation

    has_ledger = importlib.util.find_spec("pipelines.segmentation.ledger") is not None
    workdir = Path(tempfile.mkdtemp(prefix="bench-schedule-"))
    atexit.register(shutil.rmtree, workdir, True)  # up to 100k files; runs last (after moto stops)
    local = args.storage == "local"
    moto = None
    if local:
        root, options = str(workdir / "data"), None
    else:
        moto = MotoLog(workdir)
        atexit.register(moto.stop)  # however the child ends
        os.environ.update({"AWS_ENDPOINT_URL": moto.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": "testing"})
        for name in ("AWS_DEFAULT_REGION", "AWS_REGION"):  # a region makes s3fs send a location constraint
            os.environ.pop(name, None)
        options = {"endpoint_url": moto.endpoint, "key": "testing", "secret": "testing"}
        root = "s3://bench"
    fs, _ = get_fs(root, options)
    if not local:
        fs.mkdir("bench")
    input_uri, output = join_uri(root, "incoming"), join_uri(root, "segmented")

    def path(uri: str) -> str:
        return get_fs(uri, options)[1]

    setup = time.monotonic()
    feed = join_uri(root, "feed")
    if args.input_kind == "listing":
        data = small_jpeg()
        put_many(fs, {path(join_uri(input_uri, "s", f"{i:07d}.jpg")): data for i in range(args.n)}, local)
        if has_ledger:
            settle_ledger(input_uri, output, options)
        else:
            settle_per_batch(fs, input_uri, output, options, local)
        tick_input = input_uri
    else:  # the deliveries so far, all settled: one manifest per 1,000 keys
        for start in range(0, args.n, 1000):
            deliver(join_uri(feed, f"h-{start // 1000:06d}.parquet"),
                    [join_uri(input_uri, "s", f"{i:07d}.jpg") for i in range(start, min(start + 1000, args.n))],
                    options)
        settle_ledger(join_uri(feed, "h-*.parquet"), output, options)
        tick_input = join_uri(feed, "*.parquet" if args.input_kind == "feed" else "new.parquet")
        if args.input_kind == "manifest":  # the no-op tick's delivery: nothing new
            deliver(join_uri(feed, "new.parquet"), [], options)
    setup = time.monotonic() - setup

    torch.manual_seed(0)
    model = build_model("deeplabv3plus", backbone="mobilenetv2", num_classes=6, width_mult=0.25, output_stride=16)
    ckpt = str(save_checkpoint_dir(model, workdir / "ckpt", {"note": "bench"}))
    cfg = SegmentConfig(model=ckpt, input=tick_input, output=output, scales=(1.0,), flip=False, crf=False,
                        since="last", batch_size=4, storage_options=options)
    counter = LocalCalls() if local else None

    def tick(name: str) -> dict:
        before = counter.count if local else len(moto.requests())
        listings_before = counter.listings if local else 0
        with PeakRSS() as rss:
            start, cpu = time.monotonic(), time.process_time()
            with open(os.devnull, "w") as sink, _stdout(sink):
                report = run_segmentation(cfg)
            seconds, cpu = time.monotonic() - start, time.process_time() - cpu
        time.sleep(0.5 if not local else 0)  # let moto flush its log
        if local:
            requests, kinds, pages = counter.count - before, {}, counter.listings - listings_before
        else:
            lines = moto.requests()[before:]
            requests = len(lines)
            pages = sum(1 for line in lines if line.startswith("GET ") and "list-type=2" in line)
            kinds = {}
            for line in lines:
                method = line.split(" ", 1)[0]
                kinds[method] = kinds.get(method, 0) + 1
        fs.invalidate_cache()
        start = time.monotonic()
        if args.input_kind != "listing":  # a feed's tick lists no image
            pass
        elif local:  # the one listing a listing tick cannot avoid, alone: names, sizes and times of every file
            walk_stat(path(input_uri))
        else:
            fs.find(path(input_uri), detail=True)
        listing = time.monotonic() - start if args.input_kind == "listing" else None
        return {"tick": name, "n": args.n, "storage": args.storage, "code": "ledger" if has_ledger else "watermark",
                "input": args.input_kind, "listing_s": round(listing, 3) if listing is not None else None,
                "seconds": round(seconds, 3), "cpu_s": round(cpu, 3), "load": round(os.getloadavg()[0], 1),
                "requests": requests, "listing_requests": pages, "by_method": kinds,
                "peak_rss_mib": round(rss.peak_mib, 1), "ok": report.ok, "skipped": report.skipped,
                "setup_s": round(setup, 1)}

    print(json.dumps(tick("no-op")), flush=True)
    spec = SyntheticSpec(height=64, width=96)
    put_many(fs, {path(join_uri(input_uri, "new", f"{i}.jpg")): encode_scene(*render_scene(spec, i), jpeg_quality=85)[0]
                  for i in range(NEW_IMAGES)}, local)
    if args.input_kind != "listing":  # the delivery that names them
        deliver(join_uri(feed, "new.parquet"), [join_uri(input_uri, "new", f"{i}.jpg") for i in range(NEW_IMAGES)],
                options)
    from pipelines.common.ray_session import ensure_ray

    ensure_ray()  # started before the tick (not timed); ends with this process however it ends
    print(json.dumps(tick(f"+{NEW_IMAGES}")), flush=True)


def deliver(uri: str, image_uris: list[str], options) -> None:
    """A manifest of ``image_uris`` (ids: the path under the input prefix), as a feed writer would."""
    import pyarrow as pa

    from pipelines.data.manifest import write_manifest

    ids = [u.split("/incoming/", 1)[1].rsplit(".", 1)[0] for u in image_uris]
    write_manifest(pa.table({"id": pa.array(ids, pa.string()), "image_uri": pa.array(image_uris, pa.string())}),
                   uri, options)


def walk_stat(root: str) -> int:
    """Every file under ``root`` stat-ed (os.scandir): the floor of a local listing that tells a
    changed file; returns how many."""
    stack, n = [root], 0
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir():
                    stack.append(entry.path)
                else:
                    entry.stat()
                    n += 1
    return n


class _stdout:
    """The job's own progress lines go to ``sink`` (this process's stdout carries the JSON)."""

    def __init__(self, sink) -> None:
        self.sink = sink

    def __enter__(self):
        self.saved, sys.stdout = sys.stdout, self.sink

    def __exit__(self, *exc):
        sys.stdout = self.saved


# --------------------------------------------------------------------------- the table


def table(rows: list[dict]) -> str:
    lines = ["| code | storage | input | settled N | tick | seconds | driver CPU s | listing alone s | requests | "
             "of which LIST | requests by method | peak RSS MiB | load |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    nan = float("nan")
    for r in rows:
        methods = ", ".join(f"{k} {v}" for k, v in sorted(r["by_method"].items())) or "-"
        pages = f"{r['listing_requests']:,}" if "listing_requests" in r else "-"
        listing = r.get("listing_s")
        lines.append(f"| {r['label']} | {r['storage']} | {r.get('input', 'listing')} | {r['n']:,} | {r['tick']} | {r['seconds']:.2f} | "
                     f"{r.get('cpu_s', nan):.2f} | {'-' if listing is None else f'{listing:.2f}'} | "
                     f"{r['requests']:,} | {pages} | {methods} | {r['peak_rss_mib']:.0f} | {r.get('load', nan):.0f} |")
    return "\n".join(lines)


def run_child(n: int, storage: str, code: str | None, timeout: float, input_kind: str = "listing") -> list[dict]:
    cmd = [sys.executable, __file__, "--child", "--n", str(n), "--storage", storage, "--input-kind", input_kind]
    if code:
        cmd += ["--code", code]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=code or REPO)
    except subprocess.TimeoutExpired:
        return [{"tick": "no-op", "n": n, "storage": storage, "input": input_kind, "seconds": float("nan"), "requests": 0,
                 "by_method": {}, "peak_rss_mib": float("nan"), "timeout": timeout}]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode and len(rows) < 2:
        print(out.stderr[-3000:], file=sys.stderr)
    return rows


def section(rows: list[dict], command: str, labels: str) -> str:
    """The docs section: how it was measured, the table, and the no-op tick's growth."""
    import platform

    lines = [
        f"`{command}` (each configuration in a fresh process; this "
        f"machine: {os.cpu_count()} cores shared with other work, Python {platform.python_version()}; the "
        "load column is the 1-minute load average when the tick ended). " + labels + " Requests: S3 = every "
        "HTTP request moto's server logged during the tick (driver and Ray workers), LIST = its "
        "ListObjectsV2 pages (1,000 keys each: the inputs', `ledger/`'s and `_lease/`'s); local = fsspec "
        "calls and os.scandir calls (LIST: one per directory) in the driver. Driver CPU s: the driver process's CPU time during the tick (steadier than "
        "the wall time on a loaded machine). Listing alone: the input prefix listed once with sizes "
        "and times right after the tick (local: os.scandir + stat; S3: s3fs find).",
        "",
        table(rows),
        "",
    ]
    for label in sorted({r["label"] for r in rows}):
        for storage, kind in ((s, k) for s in ("local", "s3") for k in ("listing", "feed", "manifest")):
            noop = {r["n"]: r for r in rows if (r["label"], r["storage"], r.get("input", "listing"), r["tick"])
                    == (label, storage, kind, "no-op")}
            if len(noop) >= 2 and min(noop) in noop:
                small, large = noop[min(noop)], noop[max(noop)]
                cpu = (f", {large['cpu_s'] / max(small['cpu_s'], 1e-9):.1f}x the driver's CPU time"
                       if "cpu_s" in small and "cpu_s" in large else "")
                listing = (f"; the tick takes {large['seconds'] / large['listing_s']:.1f}x the listing alone"
                           if large.get("listing_s") else "")
                lines.append(f"- {label}, {storage}, {kind}: the no-op tick at {large['n']:,} settled inputs takes "
                             f"{large['seconds'] / max(small['seconds'], 1e-9):.1f}x the time at {small['n']:,}{cpu}, "
                             f"and {large['requests']:,} requests ({small['requests']:,} at {small['n']:,}){listing}.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000,10000,100000")
    p.add_argument("--storage", default="local,s3")
    p.add_argument("--code", action="append", default=[], metavar="LABEL=DIR",
                   help="also measure this checkout's pipelines/ (repeatable)")
    p.add_argument("--label", default="after", help="this checkout's label")
    p.add_argument("--labels", default="", help="what the labels are (the docs section's text)")
    p.add_argument("--json", default=None, help="append the rows to this JSON-lines file")
    p.add_argument("--output", default=None, help="Markdown file to write the section to (from --json rows)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per child")
    p.add_argument("--inputs", default="listing,feed,manifest",
                   help="how ticks learn of their inputs: listing (the prefix), feed (a glob of every "
                        "manifest delivered), manifest (the latest delivery only); other checkouts: listing only")
    p.add_argument("--input-kind", default="listing", help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    rows = []
    codes = [(args.label, None)] + [tuple(c.split("=", 1)) for c in args.code]
    for storage in args.storage.split(","):
        for n in (int(s) for s in args.sizes.split(",")):
            for label, code, kind in [(label, code, kind) for label, code in codes
                                      for kind in (args.inputs.split(",") if code is None else ["listing"])]:
                for row in run_child(n, storage, code, args.timeout, kind):
                    row["label"] = label
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    if args.json:
                        with open(args.json, "a") as f:
                            f.write(json.dumps(row) + "\n")
    if args.output and args.json:
        rows = [json.loads(line) for line in Path(args.json).read_text().splitlines()]
        sys.path.insert(0, str(REPO))
        from bench.report import replace_section

        command = "python bench/segment_schedule.py " + " ".join(sys.argv[1:])
        replace_section(args.output, SECTION, section(rows, command, args.labels))
    print(table(rows))


if __name__ == "__main__":
    main()
