"""Ray Data pipelines end to end on the session's Ray cluster, on local disk and on moto S3:
synthetic VOC layout + every kind of bad input -> manifest -> validate -> train / eval streams."""

from __future__ import annotations

import hashlib
import io
import threading

import cv2
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from deeplab_core.palette import voc_palette
from deeplab_core.synthetic import SyntheticSpec
from deeplab_core.transforms import TrainTransform
from pipelines.data.errors import read_errors
from pipelines.data.manifest import read_manifest, write_manifest
from pipelines.common.uris import join_uri
from pipelines.data.storage import get_fs
from pipelines.data.streams import eval_dataset, train_dataset, validate_manifest
from pipelines.data.synthetic import write_synthetic_voc

NUM_CLASSES = 6
SPEC = SyntheticSpec(num_classes=NUM_CLASSES, height=48, width=64)
MAX_PIXELS = 20_000  # > 64 x 48, < the "gigantic" 200 x 150 image below
NUM_GOOD_SCENES = 6
SECRET = "do-not-log-9f3c2a"


def png(array: np.ndarray, mode: str | None = None, palette: bool = False) -> bytes:
    image = Image.fromarray(array, mode)
    if palette:
        image.putpalette(voc_palette())
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def jpeg(array: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".jpg", array[..., ::-1])
    assert ok
    return data.tobytes()


def labels(height: int, width: int, top: int = 0) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : height // 2, :] = 2
    mask[0, :] = 255
    mask[-1, -1] = top
    return mask


def bad_inputs() -> dict[str, tuple[bytes | None, bytes | None, str | None]]:
    """id -> (image bytes or None = missing file, mask bytes or None = missing file, expected
    error stage or None when the row must pass, possibly converted)."""
    rng = np.random.default_rng(0)
    rgb = cv2.GaussianBlur(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), (0, 0), 2)
    good_jpeg, good_png = jpeg(rgb), png(rgb)
    good_mask = png(labels(48, 64), palette=True)
    return {
        "converted_gray": (png(rgb[:30, :40, 0], "L"), png(labels(30, 40), palette=True), None),
        "converted_rgba": (png(np.dstack([rgb, np.zeros((48, 64), np.uint8)]), "RGBA"), good_mask, None),
        "converted_16bit": (cv2.imencode(".png", rgb.astype(np.uint16) * 257)[1].tobytes(), good_mask, None),
        "corrupt_jpeg": (good_jpeg[:2] + bytes(300) + good_jpeg[302:], good_mask, "image"),
        "truncated_jpeg": (good_jpeg[: len(good_jpeg) // 2], good_mask, "image"),
        "truncated_png": (good_png[: len(good_png) * 2 // 3], good_mask, "image"),
        "zero_bytes": (b"", good_mask, "image"),
        "text_file": (b"this is not an image\n", good_mask, "image"),
        "gigantic": (jpeg(cv2.resize(rgb, (200, 150))), png(labels(150, 200), palette=True), "image"),
        "missing_image": (None, good_mask, "read"),
        "missing_mask": (good_jpeg, None, "read"),
        "truncated_mask": (good_jpeg, good_mask[: len(good_mask) // 2], "mask"),
        "mask_wrong_size": (good_jpeg, png(labels(24, 32), palette=True), "mask"),
        "mask_out_of_range": (good_jpeg, png(labels(48, 64, top=9), palette=True), "mask"),
    }


def build_dataset(root_uri: str, options) -> tuple[str, dict[str, str | None]]:
    """Synthetic scenes + bad inputs in one manifest; returns (manifest URI, id -> expected stage)."""
    synthetic = write_synthetic_voc(root_uri, NUM_GOOD_SCENES, 2, spec=SPEC, seed=1,
                                    storage_options=options)
    table = read_manifest(synthetic["train_manifest"], options)
    expected = {row_id: None for row_id in table.column("id").to_pylist()}
    fs, base = get_fs(root_uri, options)
    rows = []
    for row_id, (image, mask, stage) in bad_inputs().items():
        image_uri = join_uri(root_uri, "bad", f"{row_id}.img")
        mask_uri = join_uri(root_uri, "bad", f"{row_id}.mask.png")
        if image is not None:
            fs.pipe_file(get_fs(image_uri, options)[1], image)
        if mask is not None:
            fs.pipe_file(get_fs(mask_uri, options)[1], mask)
        rows.append({"id": row_id, "image_uri": image_uri, "mask_uri": mask_uri})
        expected[row_id] = stage
    rows.append({"id": "no_mask_uri", "image_uri": table.column("image_uri")[0].as_py(),
                 "mask_uri": None})
    expected["no_mask_uri"] = "mask"
    manifest = pa.concat_tables([table, pa.Table.from_pylist(rows, schema=table.schema)])
    uri = write_manifest(manifest, join_uri(root_uri, "all.parquet"), options)
    return uri, expected


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        (tmp_path / "data" / "bad").mkdir(parents=True)
        return str(tmp_path / "data"), None
    # moto accepts any credentials: a distinctive secret lets the test prove it is never logged.
    options = {**request.getfixturevalue("s3_options"), "secret": SECRET}
    return f"{request.getfixturevalue('s3_bucket')}/data", options


def digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


def test_validate_then_train_and_eval_streams(ray_cluster, storage, capfd):
    root_uri, options = storage
    manifest_uri, expected = build_dataset(root_uri, options)
    out_dir = join_uri(root_uri, "validated")

    clean_uri, summary = validate_manifest(manifest_uri, out_dir, NUM_CLASSES, options,
                                           max_pixels=MAX_PIXELS)

    bad = {row_id: stage for row_id, stage in expected.items() if stage is not None}
    good = [row_id for row_id, stage in expected.items() if stage is None]
    assert (summary.read, summary.ok, summary.errors) == (len(expected), len(good), len(bad))
    errors = {record.id: record for record in read_errors(join_uri(out_dir, "errors.parquet"), options)}
    assert {row_id: record.stage for row_id, record in errors.items()} == bad
    assert errors["missing_mask"].uri.endswith("missing_mask.mask.png")
    assert errors["missing_mask"].reason == "file not found"
    assert errors["mask_wrong_size"].reason == "mask 24x32 does not match image 48x64"
    assert "[9]" in errors["mask_out_of_range"].reason
    assert "exceeds max_pixels" in errors["gigantic"].reason
    assert "truncated" in errors["truncated_jpeg"].reason
    assert read_manifest(clean_uri, options).column("id").to_pylist() == good  # manifest order

    # Train stream: shuffled, augmented crops; every clean row exactly once per epoch.
    transform = TrainTransform(crop_size=(40, 56))
    train = train_dataset(clean_uri, transform, NUM_CLASSES, options, seed=0)
    rows = train.take_all()
    assert len(rows) == len(good)
    for row in rows:
        assert row["image"].dtype == np.float32 and row["image"].shape == (3, 40, 56)
        assert row["mask"].dtype == np.int64 and row["mask"].shape == (40, 56)
        assert set(np.unique(row["mask"])) <= set(range(NUM_CLASSES)) | {255}

    # Eval stream: manifest order, whole images at their own size, bad rows as error rows.
    eval_rows = eval_dataset(manifest_uri, NUM_CLASSES, options, max_pixels=MAX_PIXELS).take_all()
    assert [row["id"] for row in eval_rows] == list(expected)
    expected["no_mask_uri"] = None  # eval accepts image-only rows (inference), with a 0x0 mask
    for row in eval_rows:
        stage = expected[row["id"]]
        assert row["status"] == ("ok" if stage is None else "error")
        assert row["stage"] == stage
        if stage is None:
            height, width = (30, 40) if row["id"] == "converted_gray" else (48, 64)
            assert row["image"].dtype == np.uint8 and row["image"].shape == (height, width, 3)
            mask_shape = (0, 0) if row["id"] == "no_mask_uri" else (height, width)
            assert row["mask"].dtype == np.uint8 and row["mask"].shape == mask_shape
        else:
            assert row["image"].size == 0 and row["reason"]
    gray = next(row for row in eval_rows if row["id"] == "converted_gray")["image"]
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])  # grayscale -> RGB

    # Storage options travel to the workers inside the batch callables, never into logs.
    logged = [repr(train), str(train), train.stats(), *capfd.readouterr()]
    assert not any(SECRET in text for text in logged)


def test_eval_without_masks_reads_images_only(ray_cluster, tmp_path):
    synthetic = write_synthetic_voc(str(tmp_path / "d"), 0, 3, spec=SPEC, seed=2)
    rows = eval_dataset(synthetic["val_manifest"], with_masks=False).take_all()
    assert [row["id"] for row in rows] == ["synth_000000", "synth_000001", "synth_000002"]
    assert "mask" not in rows[0] and rows[0]["image"].shape == (48, 64, 3)
    assert all(row["status"] == "ok" for row in rows)


def deterministic_transform() -> TrainTransform:
    """Full-size crop, no scaling, no flip: the output identifies its input."""
    return TrainTransform(crop_size=(SPEC.height, SPEC.width), scale_range=(1.0, 1.0), flip_prob=0.0)


def test_streaming_split_gives_disjoint_shards(ray_cluster, tmp_path):
    synthetic = write_synthetic_voc(str(tmp_path / "d"), 8, 0, spec=SPEC, seed=3)
    ds = train_dataset(synthetic["train_manifest"], deterministic_transform(), NUM_CLASSES, seed=0)
    shards = ds.streaming_split(2, equal=True)  # what ray.train's DataConfig does per worker
    seen: list[list[str]] = [[], []]

    def consume(index: int) -> None:
        for batch in shards[index].iter_batches(batch_size=2, batch_format="numpy"):
            seen[index].extend(digest(image) for image in batch["image"])

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [len(s) for s in seen] == [4, 4]
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0] + seen[1])) == 8


def test_seeded_runs_repeat_and_epochs_differ(ray_cluster, tmp_path):
    synthetic = write_synthetic_voc(str(tmp_path / "d"), 4, 0, spec=SPEC, seed=4)
    transform = TrainTransform(crop_size=32, scale_range=(0.5, 1.5))

    def epoch(ds) -> set[str]:
        return {digest(row["image"]) for row in ds.iter_rows()}

    first = train_dataset(synthetic["train_manifest"], transform, NUM_CLASSES, seed=11)
    again = train_dataset(synthetic["train_manifest"], transform, NUM_CLASSES, seed=11)
    first_epoch = epoch(first)
    assert epoch(again) == first_epoch  # same seed, same augmentations
    assert epoch(first) != first_epoch  # the next epoch of one run draws new augmentations
