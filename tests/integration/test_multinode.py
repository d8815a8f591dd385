"""The cluster path: a Ray cluster of a head and worker nodes that share no disk, data,
checkpoints and masks on S3 (moto), MLflow through a server - and nodes lost mid-job.

The cluster is this module's own (`ray start` processes with their own temp dirs and ports), not
the session's: the jobs run as separate driver processes (`python pipelines/train.py` with
RAY_ADDRESS), as `ray job submit` would run them on the head, so the test's own Ray connection
never changes. The head has no CPUs (as in ray_cluster.yaml): every task and actor runs on a
worker node, and a worker node can be killed without killing the driver's node. Each node is
stopped by killing its own process group.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest

from tests.integration.test_train import TINY
from tests.servers import RayHead, RayWorkerNode

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

# A lost raylet is declared dead after ~3 s instead of Ray's default ~15 s (GCS health checks).
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                   "RAY_health_check_timeout_ms": "1000"}


@dataclass
class Cluster:
    head: RayHead
    log_dir: Path
    env: dict[str, str]
    nodes: list[RayWorkerNode] = field(default_factory=list)

    def add_node(self, name: str, num_cpus: int = 3) -> RayWorkerNode:
        node = RayWorkerNode(self.head, name, num_cpus=num_cpus, env=self.env)
        self.nodes.append(node)  # before start: stopped at the end even if the start fails
        return node.start(self.log_dir / f"{name}.log")

    def node_named(self, node_id: str) -> RayWorkerNode | None:
        return next((node for node in self.nodes if node.node_id() == node_id), None)


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("multinode")
    env = {"AWS_ENDPOINT_URL": s3_server.endpoint_url, **FAST_NODE_DEATH}
    head = RayHead(num_cpus=0, object_store_bytes=200 * 1024**2, env=env)
    c = Cluster(head, log_dir, env)
    try:
        head.start(log_dir / "head.log")
        c.add_node("w1")
        c.add_node("w2")
        yield c
    finally:
        for node in c.nodes:
            node.stop()
        head.stop()


class Job:
    """A job's driver process on the cluster, its output lines timestamped as they arrive."""

    def __init__(self, script: str, args: list[str], cluster: Cluster, cwd: Path, env: dict | None = None):
        env = {**os.environ, "RAY_ADDRESS": cluster.head.address, "PYTHONUNBUFFERED": "1",
               "AWS_ENDPOINT_URL": cluster.env["AWS_ENDPOINT_URL"], **(env or {})}
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen([sys.executable, str(REPO / "pipelines" / script), *args], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
            raise AssertionError(f"job still running after {timeout:.0f} s:\n{self.output[-4000:]}") from None
        self._reader.join(timeout=10)
        return code

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def first(self, pattern: str) -> tuple[float, re.Match] | None:
        for t, line in list(self.lines):
            match = re.search(pattern, line)
            if match:
                return t, match
        return None


def _s3(s3_options):
    import s3fs

    return s3fs.S3FileSystem(**s3_options)


def _kill_node_holding(cluster: Cluster, class_name: str, not_before: callable, job: Job) -> RayWorkerNode:
    """Once `not_before()` holds, kills the worker node that runs an alive actor whose class name
    contains `class_name`; fails if the job ends first."""
    from ray.util.state import list_actors

    def target() -> RayWorkerNode | None:
        if job.proc.poll() is not None:
            raise AssertionError(f"the job ended before a node could be killed:\n{job.output[-3000:]}")
        if not not_before():
            return None
        # Filtered here, not by the state API (its filters miss entries after a node died).
        for actor in list_actors(address=cluster.head.dashboard_url, limit=10_000):
            if actor.state == "ALIVE" and class_name in actor.class_name:
                node = cluster.node_named(actor.node_id)
                if node is not None:
                    return node
        return None

    deadline = time.monotonic() + 600
    while (victim := target()) is None:
        assert time.monotonic() < deadline, f"no node running {class_name} to kill after 600 s"
        time.sleep(0.5)
    victim.kill()
    return victim


def test_local_paths_are_refused_on_a_multinode_cluster(cluster, s3_bucket, s3_options, tmp_path):
    """The defaults (local storage path and data, sqlite tracking) on a cluster: one line, exit 2,
    before any work."""
    train = Job("train.py", TINY + ["optim.max_iters=2"], cluster, tmp_path)
    assert train.wait(300) == 2, train.output[-3000:]
    err = [line for _, line in train.lines if line.startswith("train.py: error:")]
    assert len(err) == 1, train.output[-3000:]
    assert "Ray cluster has 3 nodes, and these paths are on one node's disk: run.storage_path=ray_results, " \
           "data.root=data/synthetic: use s3://bucket/..." in err[0]
    assert "tracking.tracking_uri=sqlite:///mlflow.db: use an MLflow server" in err[0]
    assert "--shared-fs" in err[0]
    assert not (tmp_path / "data").exists()  # refused before the synthetic data was written

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"not read before the check")
    segment = Job("segment.py", ["--model", "unused", "--input", str(tmp_path / "in"), "--output", "masks"],
                  cluster, tmp_path)
    assert segment.wait(300) == 2, segment.output[-3000:]
    err = [line for _, line in segment.lines if line.startswith("segment.py: error:")]
    assert len(err) == 1 and f"--input={tmp_path / 'in'}, --output={tmp_path / 'masks'}: use s3://" in err[0], \
        segment.output[-3000:]

    # A manifest on S3 whose rows point at this node's disk.
    import pyarrow as pa

    from pipelines.data.manifest import write_manifest

    manifest = f"{s3_bucket}/local-rows.parquet"
    write_manifest(pa.table({"id": ["a"], "image_uri": [str(tmp_path / "in" / "a.png")], "mask_uri": [""]}),
                   manifest, s3_options)
    segment = Job("segment.py", ["--model", "unused", "--input", manifest, "--output", f"{s3_bucket}/out"],
                  cluster, tmp_path)
    assert segment.wait(300) == 2, segment.output[-3000:]
    assert f"input a={tmp_path / 'in' / 'a.png'}: use s3://" in segment.output, segment.output[-3000:]


def test_node_losses_during_training_and_segmentation(cluster, s3_server, s3_options, s3_bucket, mlflow_server,
                                                      tmp_path):
    """Train with 2 workers on 2 nodes, checkpoints on S3; kill a worker's node once the first
    checkpoint is registered: the run resumes from the latest one and registers a version. Then
    segment with it and kill the node running the model actor: every input ends with exactly one
    mask and no error record."""
    tag = uuid.uuid4().hex[:8]
    model_name, name = f"mn-{tag}", "mn"
    storage = f"{s3_bucket}/ray_results"
    started = time.monotonic()
    train = Job("train.py", TINY + [
        f"data.root={s3_bucket}/synthetic", f"run.storage_path={storage}", f"run.name={name}",
        f"tracking.tracking_uri={mlflow_server.url}", f"tracking.experiment={model_name}",
        f"tracking.registered_model={model_name}", "tracking.register=always", "data.synthetic.num_train=24", "data.synthetic.num_val=8",
        "optim.max_iters=30", "run.val_every=30", "run.checkpoint_every=10", "run.log_every=1",
        "run.max_failures=3", "scaling.placement_strategy=SPREAD",
    ], cluster, tmp_path)
    fs = _s3(s3_options)

    def first_checkpoint_registered() -> bool:
        fs.invalidate_cache()  # Train's controller writes this once it has registered a checkpoint
        return fs.exists(f"{storage}/{name}/checkpoint_manager_snapshot.json")

    victim = _kill_node_holding(cluster, "RayTrainWorker", first_checkpoint_registered, train)
    killed_at = time.monotonic()
    reached = max((int(m.group(1)) for t, line in list(train.lines) if t <= killed_at
                   for m in [re.search(r"\[train\] it (\d+)/30", line)] if m), default=0)
    cluster.add_node("w3")  # a replacement, as an autoscaler would start; segmentation uses it below
    assert train.wait(900) == 0, train.output[-5000:]
    train_s = time.monotonic() - started
    resumed = train.first(r"\[train\] resumed from iteration (\d+)")
    assert resumed is not None, train.output[-5000:]
    resumed_at, match = resumed
    start_it = int(match.group(1))
    print(f"\n[multinode] training: killed node {victim.name} at iteration ~{reached}; resumed from "
          f"{start_it} ({reached - start_it} iterations redone) {resumed_at - killed_at:.0f} s after the kill; "
          f"{train_s:.0f} s in all")
    assert start_it >= 10 and start_it % 10 == 0 and resumed_at > killed_at

    summary = train.first(r"\[train\] val mIoU (\S+) at iteration (\d+); checkpoint (\S+); model version (\S+)")
    assert summary is not None, train.output[-3000:]
    _, match = summary
    assert match.group(3).startswith(f"{storage}/{name}/checkpoint_") and match.group(4) == "1"
    assert fs.exists(f"{match.group(3)}/model.pt")
    client = mlflow.MlflowClient(mlflow_server.url)
    version = client.get_model_version(model_name, "1")
    assert version.tags["iteration"] == match.group(2)
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(version.run_id, "loss")]
    assert sorted(steps) == list(range(1, 31)), steps  # no step lost, none logged twice

    # Segmentation on the two nodes left; the model actor's node is killed mid-run.
    from deeplab_core.synthetic import SyntheticSpec
    from pipelines.data.synthetic import write_synthetic_voc

    count = 24
    inputs = write_synthetic_voc(f"{s3_bucket}/incoming", count, 0, spec=SyntheticSpec(height=192, width=256),
                                 seed=7, storage_options=s3_options)["train_manifest"]
    output = f"{s3_bucket}/masks-out"
    started = time.monotonic()
    segment = Job("segment.py", ["--model", f"models:/{model_name}/1", "--input", inputs, "--output", output,
                                 "--tracking-uri", mlflow_server.url, "--no-crf", "--batch-size", "2"],
                  cluster, tmp_path)

    def masks() -> int:
        fs.invalidate_cache()
        return len(fs.glob(f"{output}/masks/*.png"))

    victim = _kill_node_holding(cluster, "MapWorker", lambda: masks() >= 4, segment)
    killed_at = time.monotonic()
    done_at_kill = masks()
    assert segment.wait(600) == 0, segment.output[-5000:]
    print(f"[multinode] segmentation: killed node {victim.name} {killed_at - started:.0f} s after the start, "
          f"with {done_at_kill}/{count} masks written; {time.monotonic() - started:.0f} s in all")
    for t, line in segment.lines:
        if line.startswith("[segment]"):
            print(f"[multinode]   +{t - started:.0f} s {line}")
    assert done_at_kill < count, "the run had finished: the kill did not exercise the failure path"
    assert f"read {count} = ok {count} + errors 0 + skipped 0" in segment.output, segment.output[-3000:]
    fs.invalidate_cache()
    written = sorted(Path(p).stem for p in fs.glob(f"{output}/masks/*.png"))
    assert written == [f"synth_{i:06d}" for i in range(count)]  # every input, exactly one mask
    from pipelines.segmentation.io import finished_ids

    fs.invalidate_cache()
    assert finished_ids(output, s3_options) == set(written)
    errors = [p for p in fs.glob(f"{output}/errors/*.parquet")]
    assert not errors or sum(len(pq.read_table(fs.open(p, "rb"))) for p in errors) == 0
