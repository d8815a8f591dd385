"""Outputs know what made them (pipelines/segmentation/provenance.py): the scheduled run after a
promotion of @champion, other settings, `--redo none|all`, and ledgers from before the fields.

Real local Ray cluster and a sqlite MLflow registry; the model is the tiny untrained checkpoint
(what is compared is which version made a mask, not its quality).
"""

from __future__ import annotations

import contextlib
import io
import uuid
from pathlib import Path

import pyarrow.parquet as pq

from deeplab_core.synthetic import SyntheticSpec, render_scene
from pipelines.data.synthetic import encode_scene
from pipelines import tracking
from pipelines.segmentation import ledger
from pipelines.segmentation.config import SegmentConfig
from pipelines.segmentation.job import run_segmentation
from tests.helpers import register_checkpoint, untrained_checkpoint

SPEC = SyntheticSpec(height=32, width=48)


def _inputs(folder: Path, names: list[str]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        data, _ = encode_scene(*render_scene(SPEC, seed=sum(map(ord, name))), jpeg_quality=85)
        (folder / f"{name}.jpg").write_bytes(data)
    return str(folder)


def _segment(**values) -> tuple[object, str]:
    cfg = SegmentConfig(**{"scales": (1.0,), "flip": False, "crf": False, "batch_size": 2, "progress_every_s": 60,
                           **values})
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        report = run_segmentation(cfg)
    return report, out.getvalue()


def _made_by(output: str) -> dict[str, str]:
    return {row["id"]: row["model"] for row in ledger.read_ledger(output).to_pylist()}


def _promote_logged(tracking_uri: str, name: str, checkpoint: str) -> str:
    """A version as training registers one (a logged MLflow model), made @champion."""
    import mlflow

    from pipelines.data.checkpoints import MODEL_FILE

    client = mlflow.MlflowClient(tracking_uri)
    run_id = client.create_run(client.get_experiment_by_name(name).experiment_id).info.run_id
    version = tracking.log_checkpoint_model(tracking_uri, run_id, Path(checkpoint) / MODEL_FILE, name, {}, {},
                                            pytorch_flavor=False)
    client.set_registered_model_alias(name, "champion", version)
    return f"models:/{name}/{version}"


def test_after_a_promotion_the_scheduled_run_resegments_with_the_new_champion(ray_cluster, tmp_path,
                                                                               sqlite_tracking_uri, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)  # sqlite MLflow keeps artifacts under ./mlruns
    name = f"deeplab-{uuid.uuid4().hex[:8]}"
    ckpt = untrained_checkpoint(tmp_path / "ckpt", SPEC.num_classes)
    v1 = register_checkpoint(sqlite_tracking_uri, name, ckpt, alias="champion")
    job = dict(model=f"models:/{name}@champion", input=_inputs(tmp_path / "in", ["a", "b", "c"]),
               output=str(tmp_path / "out"), tracking_uri=sqlite_tracking_uri, since="last")
    first, _ = _segment(**job)
    assert first.ok == 3
    assert _made_by(job["output"]) == {"a": v1, "b": v1, "c": v1}
    settings = {row["settings"] for row in ledger.read_ledger(job["output"]).to_pylist()}
    assert len(settings) == 1 and '"scales": [1.0]' in settings.pop()

    v2 = _promote_logged(sqlite_tracking_uri, name, ckpt)  # the promotion
    second, printed = _segment(**job)  # the CronJob's command: --redo changed by default
    assert (second.ok, second.skipped) == (3, 0)
    # Its MLflow run spans the job and links its input and the version it used.
    client = mlflow.MlflowClient(sqlite_tracking_uri)
    found = client.search_runs([client.get_experiment_by_name("deeplab-segmentation").experiment_id],
                               order_by=["attributes.start_time DESC"], max_results=1)[0]
    run = client.get_run(found.info.run_id)  # search_runs leaves model inputs out
    assert run.info.end_time - run.info.start_time >= 900 * second.seconds
    assert [(d.dataset.name, job["input"] in d.dataset.source) for d in run.inputs.dataset_inputs] == [
        ("input manifest", True)]
    name2, number = v2.removeprefix("models:/").split("/")
    assert [m.model_id for m in run.inputs.model_inputs] == [
        tracking.logged_model_id(client.get_model_version(name2, number))]
    assert f"3 settled input(s) were made differently (model {v1} -> {v2})" in printed
    assert "--redo changed" in printed
    assert _made_by(job["output"]) == {"a": v2, "b": v2, "c": v2}
    third, printed = _segment(**job)  # made by the champion now: a no-op tick, no line
    assert (third.ok, third.skipped) == (0, 3) and "made differently" not in printed

    v3 = register_checkpoint(sqlite_tracking_uri, name, ckpt, alias="champion")
    kept, printed = _segment(**job, redo="none")
    assert (kept.ok, kept.skipped) == (0, 3)
    assert f"3 settled input(s) were made differently (model {v2} -> {v3}): kept as they are" in printed
    assert _made_by(job["output"]) == {"a": v2, "b": v2, "c": v2}

    # Other settings count as well (scales here); --redo all redoes even what matches.
    rescaled, printed = _segment(**{**job, "model": v2}, scales=(0.5, 1.0))
    assert rescaled.ok == 3 and "scales [1.0] -> [0.5, 1.0]" in printed
    everything, _ = _segment(**{**job, "model": v2}, scales=(0.5, 1.0), redo="all")
    assert (everything.ok, everything.skipped) == (3, 0)


def test_ledger_entries_from_before_the_fields_read_and_are_not_redone(ray_cluster, tmp_path):
    ckpt = untrained_checkpoint(tmp_path / "ckpt", SPEC.num_classes)
    job = dict(model=ckpt, input=_inputs(tmp_path / "in", ["a", "b"]), output=str(tmp_path / "out"))
    first, _ = _segment(**job)
    assert first.ok == 2
    made = _made_by(job["output"])
    assert set(made) == {"a", "b"} and all(m.startswith("sha256:") and len(m) == 71 for m in made.values())
    # Rewrite the ledger as the version before wrote it: no model / settings / crf_backend columns.
    for path in Path(job["output"], ledger.LEDGER_DIR).glob("*.parquet"):
        table = pq.read_table(path)
        pq.write_table(table.drop_columns(["model", "settings", "crf_backend"]), path)
    assert _made_by(job["output"]) == {"a": None, "b": None}
    again, printed = _segment(**job, scales=(0.75,))  # unknown never counts as different
    assert (again.ok, again.skipped) == (0, 2) and "made differently" not in printed
