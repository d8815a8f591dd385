"""Registry promotion against a real `mlflow server` (sqlite backend, artifacts on local disk)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import closing
from pathlib import Path

import pytest
import torch

from pipelines.promotion.job import mlflow_evaluator, promote
from pipelines.common.errors import EXIT_UNRELIABLE
from pipelines.promotion.policy import DEFAULT_ALIAS, PromotionPolicy
from pipelines.tracking.promotion import (
    LOCK_SUFFIX,
    PromotionError,
    UnreliableEvaluation,
    UsageError,
    error_share_tag,
    evaluation_tags,
)
from pipelines.tracking import WEIGHTS_TAG, file_sha256

REPO = Path(__file__).resolve().parents[2]
MANIFEST = "s3://bucket/voc/val.parquet"


@pytest.fixture
def client(mlflow_server):
    from mlflow import MlflowClient

    # Explicit registry URI: MLFLOW_REGISTRY_URI left in the environment by other code must not win.
    return MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)


@pytest.fixture
def model_name() -> str:
    return f"deeplab-{uuid.uuid4().hex[:8]}"


def register_version(client, name: str, tmp_path: Path, metric: float | None,
                     manifest: str | None = MANIFEST, checkpoint: Path | None = None) -> str:
    """A run with a checkpoint directory (default: a tiny stand-in model.pt in the project's
    layout) registered as a new version of `name` with its weights' digest. `metric` is recorded
    as promotion's own evaluation on `manifest` (as if an earlier promotion had measured it); the
    registered model gets `manifest` as the operator's validation manifest when it is created.
    Returns the version number."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, tags={"val_manifest": manifest} if manifest else None)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    run = client.create_run(experiment_id="0")
    ckpt = checkpoint
    if ckpt is None:
        ckpt = tmp_path / uuid.uuid4().hex / "model"
        ckpt.mkdir(parents=True)
        torch.save({"model": {"classifier.weight": torch.zeros(3, 4, 1, 1)},
                    "model_config": {"arch": "deeplabv3", "backbone": "resnet18", "num_classes": 3},
                    "meta": {"val_mIoU": metric}}, ckpt / "model.pt")
    client.log_artifacts(run.info.run_id, str(ckpt), artifact_path="model")
    client.set_terminated(run.info.run_id)
    tags = {WEIGHTS_TAG: file_sha256(ckpt / "model.pt")}
    if metric is not None:
        value_key, manifest_key = evaluation_tags("val_mIoU", manifest)
        tags.update({value_key: repr(metric), manifest_key: manifest, error_share_tag(manifest): "0.0"})
    version = client.create_model_version(name, source=f"{run.info.artifact_uri}/model",
                                          run_id=run.info.run_id, tags=tags)
    return str(version.version)


def champion_of(client, name: str) -> str | None:
    return client.get_registered_model(name).aliases.get(DEFAULT_ALIAS)


def tags_of(client, name: str, version: str) -> dict[str, str]:
    return client.get_model_version(name, version).tags


class CountingEvaluator:
    """Stands in for pipelines.segmentation.evaluation.evaluate_model: fixed mIoU per version, calls recorded."""

    def __init__(self, miou_by_version: dict[str, float], num_errors: int = 0):
        self.miou_by_version = miou_by_version
        self.num_errors = num_errors
        self.calls: list[tuple[str, str]] = []

    def __call__(self, model_uri: str, manifest_uri: str) -> dict[str, float]:
        self.calls.append((model_uri, manifest_uri))
        return {"mIoU": self.miou_by_version[model_uri.rsplit("/", 1)[1]], "pixel_acc": 0.9,
                "num_images": 100 - self.num_errors, "num_errors": self.num_errors}


def test_first_version_becomes_champion_and_decision_is_recorded(client, model_name, tmp_path):
    v1 = register_version(client, model_name, tmp_path, 0.61)
    decision = promote(model_name, v1, client=client)
    assert decision.outcome == "promoted" and decision.exit_code == 0
    assert champion_of(client, model_name) == v1
    tags = tags_of(client, model_name, v1)
    assert tags["promotion.decision"] == "promoted"
    assert tags["promotion.compared_to"] == "none"
    assert tags["promotion.champion_value"] == "none"
    assert float(tags["promotion.candidate_value"]) == 0.61
    assert tags["promotion.metric"] == "val_mIoU"
    assert tags["promotion.reason"] == "no champion yet"
    assert tags["promotion.time"].endswith("+00:00")
    # The lock is released.
    assert not client.search_registered_models(f"name = '{model_name}{LOCK_SUFFIX}'")


def test_better_version_replaces_champion_worse_one_is_refused(client, model_name, tmp_path):
    v1 = register_version(client, model_name, tmp_path, 0.60)
    v2 = register_version(client, model_name, tmp_path, 0.65)
    v3 = register_version(client, model_name, tmp_path, 0.62)
    promote(model_name, v1, client=client)

    better = promote(model_name, v2, client=client)
    assert better.outcome == "promoted" and champion_of(client, model_name) == v2
    assert tags_of(client, model_name, v2)["promotion.compared_to"] == v1

    worse = promote(model_name, v3, client=client)
    assert worse.outcome == "rejected" and worse.exit_code == 3
    assert champion_of(client, model_name) == v2
    tags = tags_of(client, model_name, v3)
    assert tags["promotion.decision"] == "rejected"
    assert tags["promotion.compared_to"] == v2
    assert float(tags["promotion.candidate_value"]) == 0.62
    assert float(tags["promotion.champion_value"]) == 0.65
    assert "0.62 < champion v2 0.65" in tags["promotion.reason"]
    assert "REJECTED" in worse.summary() and "stays v2" in worse.summary()


def test_margin_and_direction(client, model_name, tmp_path):
    v1 = register_version(client, model_name, tmp_path, 0.500)
    v2 = register_version(client, model_name, tmp_path, 0.500)  # a tie
    v3 = register_version(client, model_name, tmp_path, 0.505)
    promote(model_name, v1, client=client)
    # At least as good as the champion: a tie is promoted without a margin...
    assert promote(model_name, v2, client=client).outcome == "promoted"
    # ...and +0.005 is not enough when +0.01 is required.
    strict = PromotionPolicy(min_improvement=0.01)
    assert promote(model_name, v3, client=client, policy=strict).outcome == "rejected"
    assert champion_of(client, model_name) == v2
    # For a loss, lower wins: 0.505 is worse than 0.500.
    loss = PromotionPolicy(higher_is_better=False)
    assert promote(model_name, v3, client=client, policy=loss).outcome == "rejected"
    # Promoting the champion again changes nothing.
    same = promote(model_name, v2, client=client)
    assert same.outcome == "unchanged" and same.exit_code == 0


def test_dry_run_changes_nothing(client, model_name, tmp_path):
    v1 = register_version(client, model_name, tmp_path, 0.70)
    v2 = register_version(client, model_name, tmp_path, 0.75)
    v3 = register_version(client, model_name, tmp_path, None, manifest=None)
    promote(model_name, v1, client=client)
    before = {v: tags_of(client, model_name, v) for v in (v1, v2, v3)}

    decision = promote(model_name, v2, client=client, dry_run=True)
    assert decision.outcome == "promoted" and decision.dry_run
    assert decision.summary().startswith("DRY-RUN PROMOTED")
    # Even a dry run that has to evaluate records nothing.
    evaluator = CountingEvaluator({v1: 0.70, v3: 0.80})
    assert promote(model_name, v3, client=client, dry_run=True, val_manifest=MANIFEST,
                   evaluate=evaluator).outcome == "promoted"
    assert len(evaluator.calls) == 1  # v1 has the metric for MANIFEST already

    assert champion_of(client, model_name) == v1
    assert {v: tags_of(client, model_name, v) for v in (v1, v2, v3)} == before


def test_versions_without_a_metric_on_the_manifest_are_evaluated_once(client, model_name, tmp_path):
    other = "s3://bucket/voc/val-2012.parquet"
    v1 = register_version(client, model_name, tmp_path, 0.70)
    v2 = register_version(client, model_name, tmp_path, None, manifest=None)
    # The training job's own metric tag (on a manifest it chose) is not what promotion goes by.
    client.set_model_version_tag(model_name, v2, "val_mIoU", "0.99")
    promote(model_name, v1, client=client)
    evaluator = CountingEvaluator({v1: 0.66, v2: 0.68})

    decision = promote(model_name, v2, client=client, val_manifest=other, evaluate=evaluator)
    # Neither was measured by promotion on `other`: both are evaluated there.
    assert sorted(evaluator.calls) == [(f"models:/{model_name}/{v}", other) for v in (v1, v2)]
    assert decision.outcome == "promoted"
    assert (decision.candidate_value, decision.champion_value) == (0.68, 0.66)
    assert champion_of(client, model_name) == v2
    value_key, manifest_key = evaluation_tags("val_mIoU", other)
    for version, value in ((v1, "0.66"), (v2, "0.68")):
        tags = tags_of(client, model_name, version)
        assert (tags[value_key], tags[manifest_key], tags[error_share_tag(other)]) == (value, other, "0.0")
    assert tags_of(client, model_name, v2)["val_mIoU"] == "0.99"  # left as the training job wrote it

    # The recorded values are reused: a second comparison evaluates nothing.
    again = CountingEvaluator({})
    assert promote(model_name, v1, client=client, val_manifest=other, evaluate=again).outcome == "rejected"
    assert again.calls == []


def test_the_operator_not_the_candidate_chooses_the_manifest(client, model_name, tmp_path):
    """A candidate tagged with its own easy manifest and a high metric is judged on the registered
    model's manifest, by a fresh evaluation."""
    v1 = register_version(client, model_name, tmp_path, 0.60)
    promote(model_name, v1, client=client)
    v2 = register_version(client, model_name, tmp_path, None, manifest=None)
    easy = "s3://attacker/easy.parquet"
    for key, value in {"val_manifest": easy, "val_mIoU": "0.99"}.items():
        client.set_model_version_tag(model_name, v2, key, value)
    evaluator = CountingEvaluator({v2: 0.50})
    decision = promote(model_name, v2, client=client, evaluate=evaluator)
    assert evaluator.calls == [(f"models:/{model_name}/{v2}", MANIFEST)]
    assert decision.outcome == "rejected" and decision.val_manifest == MANIFEST
    assert champion_of(client, model_name) == v1


def test_an_evaluation_with_too_many_failed_rows_decides_nothing(client, model_name, tmp_path):
    v1 = register_version(client, model_name, tmp_path, 0.60)
    promote(model_name, v1, client=client)
    v2 = register_version(client, model_name, tmp_path, None, manifest=None)
    failing = CountingEvaluator({v2: 0.95}, num_errors=2)  # 2 % of the rows failed
    with pytest.raises(UnreliableEvaluation, match="2.0% of the rows failed") as caught:
        promote(model_name, v2, client=client, evaluate=failing)
    assert caught.value.exit_code == EXIT_UNRELIABLE == 4
    assert champion_of(client, model_name) == v1
    # The recorded share keeps refusing without a new evaluation; a looser limit accepts it.
    with pytest.raises(UnreliableEvaluation):
        promote(model_name, v2, client=client, evaluate=CountingEvaluator({}))
    loose = PromotionPolicy(max_error_share=0.05)
    assert promote(model_name, v2, client=client, policy=loose, evaluate=CountingEvaluator({})).promoted
    assert champion_of(client, model_name) == v2


def test_replaced_weights_are_refused_before_evaluation(client, model_name, tmp_path, mlflow_server):
    v1 = register_version(client, model_name, tmp_path, None)
    run_id = client.get_model_version(model_name, v1).run_id
    [stored] = (mlflow_server.root / "artifacts").rglob(f"{run_id}/artifacts/model/model.pt")
    stored.write_bytes(stored.read_bytes() + b"swapped")  # through the artifact store, after registration
    with pytest.raises(UsageError, match=f"do not match its {WEIGHTS_TAG} tag"):
        mlflow_evaluator(client)(f"models:/{model_name}/{v1}", MANIFEST)
    assert champion_of(client, model_name) is None


@pytest.mark.slow
def test_real_evaluation_of_versions_without_metrics(client, model_name, tmp_path, ray_cluster, mlflow_server):
    """The default evaluator: pipelines.segmentation.evaluation on models:/ URIs served by this MLflow server."""
    from deeplab_core import build_model
    from deeplab_core.synthetic import SyntheticSpec
    from pipelines.data.checkpoints import save_checkpoint_dir
    from pipelines.data.synthetic import write_synthetic_voc

    manifest = write_synthetic_voc(str(tmp_path / "data"), 0, 3, spec=SyntheticSpec(num_classes=3, height=48, width=64),
                                   seed=5)["val_manifest"]
    versions = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model("deeplabv3plus", backbone="mobilenetv2", num_classes=3, width_mult=0.25).eval()
        ckpt = save_checkpoint_dir(model, tmp_path / f"ckpt{seed}")
        versions.append(register_version(client, model_name, tmp_path, None, manifest=None, checkpoint=ckpt))
    v1, v2 = versions
    import mlflow

    tracking_before, env_before = mlflow.get_tracking_uri(), dict(os.environ)
    promote(model_name, v1, client=client, val_manifest=manifest)
    decision = promote(model_name, v2, client=client, val_manifest=manifest)
    # Evaluation used the client's server without changing the process' MLflow settings.
    assert mlflow.get_tracking_uri() == tracking_before and dict(os.environ) == env_before

    value_key, manifest_key = evaluation_tags("val_mIoU", manifest)
    recorded = {v: float(tags_of(client, model_name, v)[value_key]) for v in versions}
    assert all(0.0 <= value <= 1.0 for value in recorded.values())
    assert tags_of(client, model_name, v2)[manifest_key] == manifest
    assert (decision.candidate_value, decision.champion_value) == (recorded[v2], recorded[v1])
    assert decision.promoted == (recorded[v2] >= recorded[v1])
    assert champion_of(client, model_name) == (v2 if decision.promoted else v1)


def test_missing_metric_without_a_manifest_is_a_usage_error(client, model_name, tmp_path):
    register_version(client, model_name, tmp_path, None, manifest=None)
    with pytest.raises(UsageError, match="--val-manifest"):
        promote(model_name, "latest", client=client)


def test_unknown_model_and_version(client, model_name, tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        promote(model_name, "1", client=client)
    register_version(client, model_name, tmp_path, 0.5)
    with pytest.raises(UsageError, match="no version 7"):
        promote(model_name, "7", client=client)
    with pytest.raises(UsageError, match="version number or 'latest'"):
        promote(model_name, "best", client=client)


def test_latest_picks_the_newest_version(client, model_name, tmp_path):
    first = register_version(client, model_name, tmp_path, 0.1)
    newest = register_version(client, model_name, tmp_path, 0.2)
    client.set_model_version_tag(model_name, first, "note", "touched last, still not the newest")
    decision = promote(model_name, "latest", client=client)
    assert decision.candidate == newest == "2"


def test_concurrent_promotions_leave_a_consistent_state(client, model_name, tmp_path):
    values = {register_version(client, model_name, tmp_path, v): v for v in (0.50, 0.71, 0.64, 0.58, 0.69)}
    first, *candidates = values
    promote(model_name, first, client=client)
    start = threading.Barrier(len(candidates))
    results, errors = {}, []

    def run(version: str) -> None:
        try:
            start.wait()
            results[version] = promote(model_name, version, client=client, lock_timeout_s=300)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(v,)) for v in candidates]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors

    best = max(values, key=values.get)
    assert champion_of(client, model_name) == best
    # Every decision was taken against the champion of its moment and says so consistently.
    for version, decision in results.items():
        tags = tags_of(client, model_name, version)
        assert tags["promotion.decision"] == decision.outcome
        compared = tags["promotion.compared_to"]
        assert float(tags["promotion.champion_value"]) == values[compared]
        accepted = values[version] >= values[compared]
        assert (tags["promotion.decision"] == "promoted") == accepted
    # The chain of promotions is a strictly ordered history ending at the best version.
    promoted = [v for v, d in results.items() if d.outcome == "promoted"]
    assert best in promoted
    assert not client.search_registered_models(f"name = '{model_name}{LOCK_SUFFIX}'")


def test_stale_lock_is_broken_and_a_held_lock_times_out(client, model_name, tmp_path):
    v1 = register_version(client, model_name, tmp_path, 0.5)
    client.create_registered_model(model_name + LOCK_SUFFIX, tags={"owner": "crashed-host:1:x"})
    with pytest.raises(PromotionError, match="timed out"):
        promote(model_name, v1, client=client, lock_timeout_s=0.5)
    assert champion_of(client, model_name) is None
    decision = promote(model_name, v1, client=client, stale_lock_s=0.0)
    assert decision.outcome == "promoted" and champion_of(client, model_name) == v1


# ---------------------------------------------------------------------------------------------
# The command line, as cron or an operator runs it.


def run_cli(*args: str, tracking_uri: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MLFLOW_HTTP_REQUEST") and k != "MLFLOW_REGISTRY_URI"}
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    return subprocess.run([sys.executable, "pipelines/promote.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_exit_codes_and_one_line_per_decision(client, mlflow_server, model_name, tmp_path):
    v1 = register_version(client, model_name, tmp_path, 0.60)
    v2 = register_version(client, model_name, tmp_path, 0.55)
    v3 = register_version(client, model_name, tmp_path, 0.66)
    url = mlflow_server.url
    runs = [run_cli("--model", model_name, "--candidate", v, tracking_uri=url) for v in (v1, v2)]
    # The best of the rest, and an operator's dry run of it, concurrently from two processes.
    procs = [subprocess.Popen([sys.executable, "pipelines/promote.py", "--model", model_name,
                               "--candidate", v3, *extra], cwd=REPO, text=True,
                              env={**os.environ, "MLFLOW_TRACKING_URI": url},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for extra in ([], ["--dry-run"])]
    outputs = [p.communicate(timeout=60) for p in procs]

    assert [r.returncode for r in runs] == [0, 3]
    assert runs[0].stdout.splitlines() == [
        f"PROMOTED {model_name} v{v1}: no champion yet on {MANIFEST}; champion moved to v{v1}"]
    assert runs[1].stdout.startswith(f"REJECTED {model_name} v{v2}: val_mIoU 0.55 < champion v{v1} 0.6")
    assert len(runs[1].stdout.splitlines()) == 1
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert outputs[0][0].startswith(f"PROMOTED {model_name} v{v3}")
    assert outputs[1][0].startswith("DRY-RUN ")
    assert champion_of(client, model_name) == v3


def test_cli_unknown_model_version_and_bad_arguments(mlflow_server, client, model_name, tmp_path):
    missing = run_cli("--model", model_name, "--candidate", "1", tracking_uri=mlflow_server.url)
    assert missing.returncode == 2
    # one line, and what the (shared) server has instead
    assert missing.stderr.strip().startswith(f"promote: error: registered model '{model_name}' does not exist; ")
    assert len(missing.stderr.strip().splitlines()) == 1
    register_version(client, model_name, tmp_path, 0.5)
    no_version = run_cli("--model", model_name, "--candidate", "9", tracking_uri=mlflow_server.url)
    assert no_version.returncode == 2 and "has no version 9" in no_version.stderr
    bad = run_cli("--model", model_name, "--min-improvement", "-1", tracking_uri=mlflow_server.url)
    assert bad.returncode == 2 and "--min-improvement" in bad.stderr
    assert champion_of(client, model_name) is None


def test_cli_unreachable_server_fails_fast_with_one_line():
    with closing(socket.socket()) as held:  # bound, not listening: refused, and no one else gets it
        held.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{held.getsockname()[1]}"
        started = time.monotonic()
        result = run_cli("--model", "deeplab", "--candidate", "1", tracking_uri=url)
        elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert result.stderr.strip() == f"promote: error: cannot reach the MLflow registry at {url}"
    assert result.stdout == ""
    assert elapsed < 30, f"took {elapsed:.1f}s"


def test_cli_refuses_a_missing_local_database(tmp_path, capsys):
    from pipelines.promote import main

    missing = tmp_path / "nope.db"
    assert main(["--candidate", "1", "--tracking-uri", f"sqlite:///{missing}"]) == 2
    assert f"no MLflow database at {missing}" in capsys.readouterr().err
    assert not missing.exists(), "a mistyped path must not leave an empty database behind"


def test_breaking_a_stale_lock_never_deletes_a_fresh_one(client, model_name):
    """Another promoter breaks the stale lock and takes a fresh one between our look at the lock
    and our delete: compare-and-delete on the owner leaves the fresh lock alone."""
    from pipelines.tracking.promotion import _break_if_stale

    lock = model_name + LOCK_SUFFIX
    client.create_registered_model(lock, tags={"owner": "crashed-host:1:x"})

    class Interleaved(type(client)):
        """The real client; the first look at the lock is followed by the other promoter's moves."""

        swapped = False

        def get_registered_model(self, name):
            seen = super().get_registered_model(name)
            if name == lock and not self.swapped:
                self.swapped = True
                super().delete_registered_model(lock)  # the other promoter broke it...
                super().create_registered_model(lock, tags={"owner": "fresh-host:2:y"})  # ...and holds it
            return seen

    racing = Interleaved(tracking_uri=client.tracking_uri, registry_uri=client._registry_uri)
    _break_if_stale(racing, lock, stale_after_s=0.0)
    assert client.get_registered_model(lock).tags["owner"] == "fresh-host:2:y"
    assert not [m for m in client.search_registered_models(f"name LIKE '{lock}%'") if m.name != lock]
