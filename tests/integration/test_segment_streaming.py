"""Masks stream out of a CRF run as they are made, a kill loses only the batches in flight, and a
resource plan the cluster cannot schedule is refused, on the session Ray cluster (4 CPUs).

Three CRF tasks (pydensecrf, 1 CPU each) and the model actor (1 CPU) hold all four CPUs, the
way one actor and one CRF task hold a 2-CPU machine: a write step that needs a CPU of its own
waits until the end of the run (before: first mask at 266 s of a 273 s run). One run goes to its
end: its masks are spread over the run (file times). A second run is killed (SIGKILL, process
group) once half of the masks are on disk, and a re-run redoes only what was in flight. The kill
is triggered by the masks, not by a time: two runs on a loaded machine differ in pace by a third
or more, so "half way through the first run's span" left 10-12 of 32 masks one time and 19 another.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deeplab_core.synthetic import SyntheticSpec
from pipelines.common.errors import InputError
from pipelines.data.synthetic import write_synthetic_voc
from pipelines.segmentation.config import SegmentConfig
from pipelines.segmentation.job import run_segmentation
from tests.helpers import untrained_checkpoint

REPO = Path(__file__).resolve().parents[2]
COUNT = 32
SPEC = SyntheticSpec(height=192, width=256)  # CRF seconds well above the per-batch overheads


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("stream")
    data = write_synthetic_voc(str(root / "data"), 0, COUNT, SPEC, seed=11)
    checkpoint = untrained_checkpoint(root / "ckpt", SPEC.num_classes)
    return root, data["val_manifest"], checkpoint


def _start(ray_cluster, checkpoint: str, manifest: str, output: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "pipelines/segment.py", "--model", checkpoint, "--input", manifest,
           "--output", str(output), "--batch-size", "2", "--crf-workers", "3", "--crf-iterations", "10",
           "--scales", "1", "--no-flip", *extra]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _wait_for_line(proc: subprocess.Popen, prefix: str, lines: list[str]) -> float:
    """Reads the run's output until a line starting with `prefix`; the time it was seen."""
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(prefix):
            return time.time()
    raise AssertionError(f"no {prefix!r} line; output:\n{''.join(lines)}")


def _mask_times(output: Path) -> list[float]:
    return sorted(p.stat().st_mtime for p in (output / "masks").glob("*.png"))


def test_masks_are_written_as_they_are_made_and_a_kill_loses_only_the_batches_in_flight(setup, ray_cluster):
    root, manifest, checkpoint = setup
    full = _start(ray_cluster, checkpoint, manifest, root / "full")
    lines: list[str] = []
    started = _wait_for_line(full, "[segment] model ", lines)  # Ray is up, the pipeline starts
    ended = _wait_for_line(full, "[segment] read ", lines)  # the summary line
    full.communicate(timeout=120)
    times = _mask_times(root / "full")
    assert len(times) == COUNT, "".join(lines)
    span = ended - times[0]
    assert span >= 0.3 * (ended - started), f"first mask {span:.1f} s before the end of a {ended - started:.1f} s run"

    # Outcomes recorded after every batch (the default is every 60 s: a kill then loses its last
    # interval's record, docs/segmentation.md); a short lease so the re-run need not wait 5 min.
    killed = _start(ray_cluster, checkpoint, manifest, root / "killed", "checkpoint_every_s=0.01", "lease_ttl_s=3")
    try:
        deadline = time.time() + 300
        while len(_mask_times(root / "killed")) < COUNT // 2 and killed.poll() is None and time.time() < deadline:
            time.sleep(0.02)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)  # the driver dies without any clean-up
        killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    on_disk = len(_mask_times(root / "killed"))
    assert COUNT // 2 <= on_disk < COUNT

    # A kill loses at most the batches in flight: the re-run skips what the killed run recorded
    # and ends with every mask, one per input.
    rerun = _start(ray_cluster, checkpoint, manifest, root / "killed", "lease_wait_s=60")  # the lease expires
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out[-3000:]
    summary = re.search(r"read (\d+) = ok (\d+) \+ errors (\d+) \+ skipped (\d+)", out)
    assert summary, out[-3000:]
    read, ok, errors, skipped = map(int, summary.groups())
    assert (read, errors, ok + skipped) == (COUNT, 0, COUNT)
    # The killed run's record counts (outcomes checkpointed per batch); masks the driver had not
    # yet received when it died (3 CRF tasks of 2 images, plus what Ray Data had not handed on:
    # up to 10 of 16 on a loaded machine) are segmented again, never lost.
    assert skipped > 0, f"{on_disk} masks on disk at the kill, none settled"
    assert len(_mask_times(root / "killed")) == COUNT


def test_a_plan_the_cluster_cannot_schedule_is_refused_before_ray_data_starts(setup, ray_cluster):
    root, manifest, checkpoint = setup
    cfg = SegmentConfig(model=checkpoint, input=manifest, output=str(root / "refused"), cpus_per_model_actor=4)
    started = time.monotonic()
    with pytest.raises(InputError, match=r"^resource plan does not fit the cluster: .*"
                                         r"what fits: --cpus-per-model-actor 3$"):
        run_segmentation(cfg)  # 4 CPUs: a 4-CPU actor leaves no room for decode (before: a hang)
    assert time.monotonic() - started < 60
    assert not (root / "refused" / "masks").exists()
