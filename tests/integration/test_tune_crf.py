"""CRF parameter search on the session Ray cluster with a real MLflow registry (sqlite), then
batch segmentation picking up the version's tuned set.

A tiny untrained DeepLabv3+ (MobileNetV2 x0.25) registered as version 1 of a fresh model, and
six 64 x 96 synthetic scenes with masks.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from deeplab_core.constants import CRFParams
from deeplab_core.synthetic import SyntheticSpec
from pipelines import segment, tracking, tune_crf
from pipelines.data.synthetic import write_synthetic_voc
from pipelines.segmentation import crf_settings, crf_tuning, recipe
from pipelines.segmentation.crf_tuning import TuneCRFConfig, run_crf_tuning
from pipelines.segmentation.io import read_results
from tests.helpers import register_checkpoint, untrained_checkpoint

SPEC = SyntheticSpec(height=64, width=96)
SCALES = "0.75,1"
FIELDS = crf_settings.TUNED_FIELDS


@pytest.fixture
def registered(tmp_path, sqlite_tracking_uri):
    """(models:/<name>/1, val manifest, tracking URI)."""
    ckpt = untrained_checkpoint(tmp_path / "ckpt", SPEC.num_classes)
    data = write_synthetic_voc(str(tmp_path / "data"), 0, 6, SPEC, seed=5)
    model_uri = register_checkpoint(sqlite_tracking_uri, f"deeplab-{uuid.uuid4().hex[:8]}", ckpt)
    return model_uri, data["val_manifest"], sqlite_tracking_uri


def _version_tags(model_uri: str, tracking_uri: str) -> dict[str, str]:
    import mlflow

    name, version = model_uri.removeprefix("models:/").split("/")
    return dict(mlflow.MlflowClient(tracking_uri).get_model_version(name, version).tags)


def test_random_search_never_loses_to_the_defaults_and_tags_the_version(ray_cluster, registered, tmp_path):
    import mlflow

    model_uri, manifest, tracking_uri = registered
    cfg = TuneCRFConfig(model=model_uri, manifest=manifest, num_images=4, num_samples=5, iterations=3,
                        scales=(0.75, 1.0), tracking_uri=tracking_uri, storage_path=str(tmp_path / "tune"))
    result = run_crf_tuning(cfg)

    assert len(result.trials) == 5 and sum(t.is_default for t in result.trials) == 1
    assert result.best_score >= result.default_score
    assert result.best_score == max(t.mIoU for t in result.trials)
    # The trials scored the shared probabilities: the default trial equals a direct computation.
    with tracking.tracking_uri_set(tracking_uri):
        data, num_classes = crf_tuning.load_tuning_data(cfg, model_uri)
    direct = crf_tuning.score(data, num_classes, CRFParams(iterations=3))["mIoU"]
    assert result.default_score == pytest.approx(direct, abs=1e-9)

    tags = _version_tags(model_uri, tracking_uri)
    assert crf_settings.tuned_from_tags(tags) == {k: getattr(result.best, k) for k in FIELDS}
    assert tags["crf.manifest"] == manifest
    assert float(tags["crf.score"]) == pytest.approx(result.best_score)
    assert float(tags["crf.default_score"]) == pytest.approx(result.default_score)

    run = mlflow.MlflowClient(tracking_uri).get_run(result.run_id)
    assert run.data.metrics["best_mIoU"] == pytest.approx(result.best_score)
    assert run.data.metrics["default_mIoU"] == pytest.approx(result.default_score)
    assert run.data.params["num_trials"] == "5"
    trials = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=result.run_id, artifact_path="trials.json", dst_path=str(tmp_path / "a"),
        tracking_uri=tracking_uri)).read_text())["trials"]
    assert len(trials) == 5


def test_grid_search_cli_then_segment_uses_the_tuned_set(ray_cluster, registered, tmp_path):
    import mlflow

    model_uri, manifest, tracking_uri = registered
    code = tune_crf.main([
        "--model", model_uri, "--manifest", manifest, "--num-images", "3", "--search", "grid",
        "--iterations", "2", "--scales", SCALES, "--tracking-uri", tracking_uri,
        "--storage-path", str(tmp_path / "tune"),
        "grid={bi_w: [6], bi_xy_std: [15], bi_rgb_std: [], pos_w: [], pos_xy_std: []}",
    ])
    assert code == 0
    tags = _version_tags(model_uri, tracking_uri)
    tuned = crf_settings.tuned_from_tags(tags)
    assert tuned is not None and tuned["bi_w"] in (4.0, 6.0) and tuned["bi_xy_std"] in (15.0, 67.0)
    # The scales the set was tuned with go with it, and are the next run's default.
    assert (tags["tta.scales"], tags["tta.flip"], tags["tta.source"]) == ("0.75,1.0", "true", "tune_crf")
    with tracking.tracking_uri_set(tracking_uri):
        again = recipe.applied(TuneCRFConfig(model=model_uri, manifest=manifest), model_uri)
    assert (again.tta.scales, again.tta.flip) == ((0.75, 1.0), True)

    def segment_run(output: Path, *extra: str) -> tuple[list[dict], dict]:
        assert segment.main(["--model", model_uri, "--input", manifest, "--output", str(output), "--eval",
                             "--scales", SCALES, "--crf-iterations", "2", "--tracking-uri", tracking_uri,
                             *extra]) == 0
        rows = read_results(str(output)).to_pylist()
        experiment = mlflow.MlflowClient(tracking_uri).get_experiment_by_name("deeplab-segmentation")
        latest = mlflow.MlflowClient(tracking_uri).search_runs(
            [experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
        return rows, latest.data.params

    rows, params = segment_run(tmp_path / "out")
    assert {r["crf_source"] for r in rows} == {"tuned"}
    used = json.loads(rows[0]["crf_params"])
    assert {k: used[k] for k in FIELDS} == tuned and used["iterations"] == 2
    assert params["crf_source"] == "tuned" and float(params["crf_bi_w"]) == tuned["bi_w"]

    rows, params = segment_run(tmp_path / "out-explicit", "--crf-bi-w", "9")
    assert {r["crf_source"] for r in rows} == {"tuned+explicit"}
    assert json.loads(rows[0]["crf_params"])["bi_w"] == 9.0
    assert json.loads(rows[0]["crf_params"])["bi_xy_std"] == tuned["bi_xy_std"]
    assert params["crf_source"] == "tuned+explicit" and float(params["crf_bi_w"]) == 9.0


def test_evaluate_model_uses_the_versions_tuned_crf_set(ray_cluster, registered, tmp_path):
    """evaluate_model (promotion's scorer) with crf=True runs a registered version's `crf.*` set,
    as segment.py does; it used to resolve the parameters again without the tags (defaults)."""
    import torch

    from pipelines.data.checkpoints import save_checkpoint_dir
    from pipelines.tracking import load_model
    from pipelines.data.manifest import read_manifest
    from pipelines.data.rows import RowDecoder
    from pipelines.segmentation.evaluation import evaluate_model
    from pipelines.data.checkpoints import normalisation_of

    first_uri, manifest, tracking_uri = registered
    # The untrained network says one class everywhere, which no CRF changes: its classifier's bias
    # is evened out over these images, so that every class appears and the CRF set matters.
    with tracking.tracking_uri_set(tracking_uri):
        model, meta = load_model(first_uri)
    rows = read_manifest(manifest).to_pylist()
    decoded = RowDecoder(None, SPEC.num_classes, 10**7, require_masks=False, read_masks=False).decode_rows(
        [r["id"] for r in rows], [r["image_uri"] for r in rows])
    from deeplab_core.transforms import normalize

    batch = torch.stack([normalize(d.image, *normalisation_of(meta, model)) for d in decoded])
    last = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels == SPEC.num_classes][-1]
    with torch.no_grad():
        last.bias -= model.eval()(batch).mean((0, 2, 3))
    name = first_uri.removeprefix("models:/").split("/")[0]
    model_uri = register_checkpoint(tracking_uri, name, save_checkpoint_dir(model, tmp_path / "balanced", meta))
    tuned = CRFParams(bi_w=10.0, bi_xy_std=5.0, bi_rgb_std=40.0, pos_w=6.0, pos_xy_std=3.0)
    options = dict(scales=(1.0,), crf=True, crf_backend="pydensecrf", batch_size=6)
    with tracking.tracking_uri_set(tracking_uri):
        defaults = evaluate_model(model_uri, manifest, **options)
        tracking.set_model_version_tags(model_uri, crf_settings.tags_for(tuned, manifest, 0.5, 0.4))
        by_tags = evaluate_model(model_uri, manifest, **options)
        explicit = evaluate_model(model_uri, manifest, crf_params=tuned, **options)
        explicit_defaults = evaluate_model(model_uri, manifest, crf_params=CRFParams(), **options)
    assert explicit["mIoU"] != pytest.approx(defaults["mIoU"], abs=1e-6)  # the sets are told apart
    assert by_tags["mIoU"] == explicit["mIoU"] and by_tags["pixel_acc"] == explicit["pixel_acc"]
    assert explicit_defaults["mIoU"] == defaults["mIoU"]  # explicit parameters still win over the tags
