"""The Segmenter (pipelines/segmentation/segmenter.py) gives the batch job's masks: a folder and a
single file, in-process and through `segment.py --local` (the job's in-process engine), against
the Ray job on the session cluster; the two engines leave the same masks and ledger; engine auto
runs a small plain job in this process without importing Ray; and a registered version's recipe
(tta.* and crf.* tags) is what the Segmenter and the job use."""

from __future__ import annotations

import contextlib
import io
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from deeplab_core.synthetic import SyntheticSpec, render_scene
from pipelines import segment, tracking
from pipelines.segmentation import crf_settings, ledger, recipe
from pipelines.segmentation.config import SegmentConfig
from pipelines.segmentation.job import run_segmentation
from pipelines.segmentation.segmenter import Segmenter
from tests.helpers import register_checkpoint, run_off_cluster, untrained_checkpoint

SIZES = {"a": (64, 96), "b": (64, 96), "c": (48, 80)}  # two sizes: batched and alone
RECIPE = dict(scales=(0.75, 1.0), flip=True, crf=True)


def _inputs(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name, (h, w) in SIZES.items():
        image, _ = render_scene(SyntheticSpec(height=h, width=w), seed=sum(map(ord, name)))
        (folder / f"{name}.png").write_bytes(_png(image))  # lossless: the same pixels everywhere
    return folder


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _masks(output: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.array(Image.open(p)) for p in sorted((output / "masks").glob("*.png"))}


def _quiet(fn, *args, **kwargs):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = fn(*args, **kwargs)
    return result, out.getvalue()


def test_a_folder_and_a_file_through_the_segmenter_equal_the_ray_jobs_masks(ray_cluster, tmp_path):
    ckpt = untrained_checkpoint(tmp_path / "ckpt", SyntheticSpec().num_classes)
    folder = _inputs(tmp_path / "in")
    report, _ = _quiet(run_segmentation, SegmentConfig(model=ckpt, input=str(folder), output=str(tmp_path / "ray"),
                                                       crf_backend="pydensecrf", **RECIPE))
    assert report.ok == 3
    job = _masks(tmp_path / "ray")

    segmenter = Segmenter.from_uri(ckpt, crf_backend="pydensecrf", **RECIPE)
    masks = segmenter(sorted(str(p) for p in folder.iterdir()))  # a batch of paths, two sizes
    assert [m.dtype for m in masks] == [np.uint8] * 3
    for name, mask in zip(sorted(SIZES), masks):
        assert mask.shape == SIZES[name]
        np.testing.assert_array_equal(mask, job[name])
    image = np.array(Image.open(folder / "c.png").convert("RGB"))
    np.testing.assert_array_equal(segmenter(image), job["c"])  # an array
    probs = segmenter.probs(image)
    assert probs.shape == (SyntheticSpec().num_classes, *SIZES["c"])
    np.testing.assert_allclose(probs.sum(0), 1, atol=1e-4)

    # One file as --input: the Ray job segments it (was "0 input(s)"), and so does --local.
    one, _ = _quiet(run_segmentation, SegmentConfig(model=ckpt, input=str(folder / "a.png"),
                                                    output=str(tmp_path / "one"), crf_backend="pydensecrf", **RECIPE))
    assert (one.read, one.ok) == (1, 1)
    np.testing.assert_array_equal(_masks(tmp_path / "one")["a"], job["a"])
    flags = ["--model", ckpt, "--scales", "0.75,1", "--crf-backend", "pydensecrf", "--local"]
    code, printed = _quiet(segment.main, [*flags, "--input", str(folder / "a.png"), "--output", str(tmp_path / "l1")])
    assert code == 0 and "segmenting in this process (--engine local)" in printed
    assert "read 1 = ok 1 + errors 0 + skipped 0" in printed
    code, _ = _quiet(segment.main, [*flags, "--input", str(folder), "--output", str(tmp_path / "l3")])
    local = _masks(tmp_path / "l3")
    assert code == 0 and set(local) == set(job)
    for name in job:
        np.testing.assert_array_equal(local[name], job[name])
    # --local is the job in this process, ledger included: a re-run skips what is settled.
    code, printed = _quiet(segment.main, [*flags, "--input", str(folder), "--output", str(tmp_path / "l3")])
    assert code == 0 and "read 3 = ok 0 + errors 0 + skipped 3" in printed


def _entries(output: Path) -> dict[str, tuple]:
    """id -> (status, stage, kind, model, settings, crf_backend) of the output's ledger."""
    return {r["id"]: (r["status"], r["stage"], r["kind"], r["model"], r["settings"], r["crf_backend"])
            for r in ledger.read_ledger(str(output)).to_pylist()}


def test_both_engines_leave_the_same_masks_and_ledger(ray_cluster, tmp_path):
    ckpt = untrained_checkpoint(tmp_path / "ckpt", SyntheticSpec().num_classes)
    folder = _inputs(tmp_path / "in")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")  # an error record either way
    runs = {}
    for engine in ("ray", "local"):
        cfg = SegmentConfig(model=ckpt, input=str(folder), output=str(tmp_path / engine), crf_backend="pydensecrf",
                            batch_size=2, engine=engine, **RECIPE)
        runs[engine], printed = _quiet(run_segmentation, cfg)
        assert f"4 input(s): segmenting {'on Ray' if engine == 'ray' else 'in this process'}" in printed
    assert [(r.ok, r.errors, r.errors_by_stage) for r in runs.values()] == [(3, 1, {"image": 1})] * 2
    assert [r.engine for r in runs.values()] == ["ray", "local"]
    ray_masks, local_masks = _masks(tmp_path / "ray"), _masks(tmp_path / "local")
    assert set(ray_masks) == set(local_masks) == set(SIZES)
    for name in SIZES:
        np.testing.assert_array_equal(local_masks[name], ray_masks[name])
    entries = _entries(tmp_path / "local")
    assert entries == _entries(tmp_path / "ray")  # statuses, and what made each mask (the redo rule's view)
    assert {k: v[:3] for k, v in entries.items()} == {
        **{name: ("ok", None, None) for name in SIZES}, "broken": ("error", "image", "permanent")}
    again, _ = _quiet(run_segmentation, cfg)  # the local run again: everything settled, nothing redone
    assert (again.ok, again.errors, again.skipped, again.engine) == (0, 0, 4, None)  # nothing ran


def test_the_in_process_engine_reads_and_writes_object_storage(ray_cluster, tmp_path, s3_bucket, s3_options):
    import s3fs

    ckpt = untrained_checkpoint(tmp_path / "ckpt", SyntheticSpec().num_classes)
    folder = _inputs(tmp_path / "in")
    fs = s3fs.S3FileSystem(key=s3_options["key"], secret=s3_options["secret"],
                           client_kwargs={"endpoint_url": s3_options["endpoint_url"]})
    fs.put(f"{folder}/", f"{s3_bucket}/in/", recursive=True)
    expected, _ = _quiet(run_segmentation, SegmentConfig(model=ckpt, input=str(folder), output=str(tmp_path / "ray"),
                                                         crf_backend="pydensecrf", **RECIPE))
    cfg = SegmentConfig(model=ckpt, input=f"{s3_bucket}/in/", output=f"{s3_bucket}/out", crf_backend="pydensecrf",
                        engine="local", storage_options=s3_options, **RECIPE)
    report, printed = _quiet(run_segmentation, cfg)
    assert "3 input(s): segmenting in this process (--engine local)" in printed
    assert (report.read, report.ok, report.engine) == (3, 3, "local")
    on_s3 = {Path(key).stem: np.array(Image.open(io.BytesIO(fs.cat(key))))
             for key in fs.glob(f"{s3_bucket}/out/masks/*.png")}
    ray_masks = _masks(tmp_path / "ray")
    assert set(on_s3) == set(ray_masks) == set(SIZES) and expected.ok == 3
    for name in SIZES:
        np.testing.assert_array_equal(on_s3[name], ray_masks[name])
    again, _ = _quiet(run_segmentation, cfg)  # the ledger on S3: nothing redone
    assert (again.ok, again.skipped) == (0, 3)


def test_auto_runs_a_small_plain_job_here_without_importing_ray(tmp_path):
    ckpt = untrained_checkpoint(tmp_path / "ckpt", SyntheticSpec().num_classes)
    folder = _inputs(tmp_path / "in")
    script = (
        "import sys\n"
        "from pipelines import segment\n"
        f"code = segment.main(['--model', {ckpt!r}, '--input', {str(folder)!r}, '--output', "
        f"{str(tmp_path / 'out')!r}, '--scales', '1', '--no-flip', '--no-crf'])\n"
        "print('exit', code, 'ray imported', 'ray' in sys.modules)\n")
    stdout = run_off_cluster(script, tmp_path)
    assert "[segment] 3 input(s): segmenting in this process (--engine auto; Ray above 1000 inputs, 32 with the " \
           "CPU CRF)" in stdout
    assert "read 3 = ok 3 + errors 0 + skipped 0" in stdout
    assert stdout.strip().splitlines()[-1] == "exit 0 ray imported False"
    assert set(_masks(tmp_path / "out")) == set(SIZES)


def test_the_versions_recipe_is_read_by_default(ray_cluster, tmp_path, sqlite_tracking_uri):
    ckpt = untrained_checkpoint(tmp_path / "ckpt", SyntheticSpec().num_classes)
    model_uri = register_checkpoint(sqlite_tracking_uri, f"deeplab-{uuid.uuid4().hex[:8]}", ckpt)
    tuned = {"bi_w": 5.0, "bi_xy_std": 50.0, "bi_rgb_std": 4.0, "pos_w": 2.0, "pos_xy_std": 1.5}
    from deeplab_core.constants import CRFParams

    with tracking.tracking_uri_set(sqlite_tracking_uri):
        tracking.set_model_version_tags(model_uri, {
            **crf_settings.tags_for(CRFParams(**tuned), "val.parquet", 0.5, 0.4),
            **recipe.tags_for((1.0, 1.25), False, "test")})
    segmenter = Segmenter.from_uri(model_uri, tracking_uri=sqlite_tracking_uri)
    assert (segmenter.scales, segmenter.flip) == ((1.0, 1.25), False)
    assert {k: getattr(segmenter.crf_params, k) for k in tuned} == tuned
    mine = Segmenter.from_uri(model_uri, tracking_uri=sqlite_tracking_uri, scales=(1.0,), flip=True)
    assert (mine.scales, mine.flip) == ((1.0,), True)  # what the caller gives wins

    folder = _inputs(tmp_path / "in")
    _, printed = _quiet(segment.main, ["--model", model_uri, "--tracking-uri", sqlite_tracking_uri, "--input",
                                       str(folder), "--output", str(tmp_path / "out"), "--no-crf"])
    assert "scales 1,1.25, flip False" in printed
    local = Segmenter.from_uri(model_uri, tracking_uri=sqlite_tracking_uri, crf=False)
    job = _masks(tmp_path / "out")
    for name in SIZES:
        np.testing.assert_array_equal(local(str(folder / f"{name}.png")), job[name])
