"""What one listing of an S3 input prefix costs the driver: s3fs `find` (what the tick uses),
the tick's own `list_input_table` on top of it, and pyarrow's native S3 listing, on moto.

Each is run twice in one process against the same N keys; the table gives the best wall time,
the process CPU time and the HTTP requests moto logged (ListObjectsV2 pages of 1,000 keys):

    python bench/s3_listing.py --n 5000
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.segment_schedule import MotoLog  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=5000)
    args = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-s3-listing-"))
    atexit.register(shutil.rmtree, workdir, True)
    moto = MotoLog(workdir)
    atexit.register(moto.stop)
    for name in ("AWS_DEFAULT_REGION", "AWS_REGION"):  # a region makes s3fs send a location constraint
        os.environ.pop(name, None)
    options = {"endpoint_url": moto.endpoint, "key": "testing", "secret": "testing"}

    import pyarrow.fs as pafs

    from pipelines.data.storage import get_fs, pyarrow_filesystem
    from pipelines.segmentation.io import list_input_table

    fs, _ = get_fs("s3://listing", options)
    fs.mkdir("listing")
    keys = [f"listing/in/s/{i:07d}.jpg" for i in range(args.n)]
    for start in range(0, len(keys), 2000):  # s3fs sends a dict's PUTs concurrently
        fs.pipe({k: b"x" for k in keys[start:start + 2000]})
    native, native_path = pyarrow_filesystem("s3://listing/in", options)
    ways = {
        "s3fs find (detail)": lambda: len(fs.find("listing/in", detail=True)),
        "list_input_table (s3fs + arrow)": lambda: list_input_table("s3://listing/in", options).num_rows,
        "pyarrow S3FileSystem (no ETag)": lambda: len(native.get_file_info(pafs.FileSelector(native_path,
                                                                                            recursive=True))),
    }
    rows = []
    for name, way in ways.items():
        best = None
        for _ in range(2):
            fs.invalidate_cache()
            time.sleep(0.3)  # moto's log catches up
            before = len(moto.requests())
            wall, cpu = time.monotonic(), time.process_time()
            found = way()
            wall, cpu = time.monotonic() - wall, time.process_time() - cpu
            time.sleep(0.3)
            run = (wall, cpu, len(moto.requests()) - before, found)
            best = run if best is None or run[0] < best[0] else best
        rows.append((name, *best))
    base_cpu = rows[0][2]
    print(f"{args.n:,} keys on moto, load {os.getloadavg()[0]:.1f}")
    print("| listing | seconds | driver CPU s | CPU vs s3fs find | requests | found |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, wall, cpu, requests, found in rows:
        print(f"| {name} | {wall:.2f} | {cpu:.3f} | {cpu / base_cpu:.2f}x | {requests} | {found:,} |")


if __name__ == "__main__":
    main()
