"""The Cityscapes importer on a raw download (`*_gtFine_labelIds.png` only): train-id masks are
written beside the raw ones once, as cityscapesscripts' createTrainIdLabelImgs writes them, and
the manifest points at them. (The label table itself is checked against cityscapesscripts in
test_peer_weights.test_cityscapes_tables_match_cityscapesscripts.)"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.data.importers import import_cityscapes
from pipelines.data.manifest import read_manifest
from pipelines.import_dataset import run as import_dataset

STEMS = ("aachen/aachen_000000_000019", "aachen/aachen_000001_000019", "bochum/bochum_000000_000313")


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def raw_layout(root: Path, split: str = "val") -> dict[str, np.ndarray]:
    """leftImg8bit + raw gtFine label ids (every official id 0..33, -1 as 255, and unused values)."""
    rng = np.random.default_rng(0)
    raw = {}
    for stem in STEMS:
        image = root / "leftImg8bit" / split / f"{stem}_leftImg8bit.png"
        label = root / "gtFine" / split / f"{stem}_gtFine_labelIds.png"
        for path in (image, label):
            path.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(png(rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)))
        ids = np.concatenate([np.arange(34), [255, 40, 200], rng.integers(0, 34, 80 - 37)]).astype(np.uint8)
        raw[stem] = rng.permutation(ids).reshape(8, 10)
        label.write_bytes(png(raw[stem]))
    return raw


def official_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """cityscapesscripts' own mapping (createTrainIdLabelImgs: trainId, 255 for ignored labels;
    ids it has no label for stay outside every class, 255 here)."""
    from cityscapesscripts.helpers.labels import id2label

    def one(label_id: int) -> int:
        label = id2label.get(label_id)
        return 255 if label is None or label.trainId in (255, -1) else label.trainId

    return np.vectorize(one)(label_ids).astype(np.uint8)


def test_raw_label_ids_become_train_id_masks_once(tmp_path, capsys):
    raw = raw_layout(tmp_path)
    out = str(tmp_path / "val.parquet")
    import_cityscapes(str(tmp_path), "val", out)
    assert f"cityscapes: {len(STEMS)} *_gtFine_labelIds.png without *_gtFine_labelTrainIds.png" in capsys.readouterr().err

    rows = read_manifest(out).to_pylist()
    assert [row["id"] for row in rows] == sorted(STEMS)
    for row in rows:
        assert row["mask_uri"] == str(tmp_path / "gtFine" / "val" / f"{row['id']}_gtFine_labelTrainIds.png")
        written = np.asarray(Image.open(row["mask_uri"]))
        assert written.dtype == np.uint8 and np.array_equal(written, official_train_ids(raw[row["id"]]))

    # Idempotent: a second import writes nothing, and an existing train-id file is never replaced.
    kept = tmp_path / "gtFine" / "val" / f"{STEMS[0]}_gtFine_labelTrainIds.png"
    kept.write_bytes(png(np.zeros((8, 10), np.uint8)))
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*_labelTrainIds.png")}
    import_cityscapes(str(tmp_path), "val", out)
    assert "cityscapes:" not in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*_labelTrainIds.png")} == mtimes
    assert not np.asarray(Image.open(kept)).any()
    assert not [p for p in tmp_path.rglob(".*tmp-*")]  # no temp files left behind


def test_only_missing_train_id_masks_are_written(tmp_path, capsys):
    raw_layout(tmp_path)
    first = tmp_path / "gtFine" / "val" / f"{STEMS[0]}_gtFine_labelTrainIds.png"
    first.write_bytes(png(np.full((8, 10), 7, np.uint8)))  # e.g. an interrupted earlier conversion
    result = import_dataset(["cityscapes", str(tmp_path), "--split", "val", "--out", str(tmp_path / "m.jsonl")])
    assert result["rows"] == len(STEMS) and result["rows_without_mask"] == 0
    out, err = capsys.readouterr()
    assert f"cityscapes: {len(STEMS) - 1} *_gtFine_labelIds.png" in err and json.loads(out)["rows"] == len(STEMS)
    assert (np.asarray(Image.open(first)) == 7).all()
    assert len(list(tmp_path.rglob("*_labelTrainIds.png"))) == len(STEMS)
    assert all(os.path.getsize(p) > 0 for p in tmp_path.rglob("*_labelTrainIds.png"))


def test_raw_labels_on_an_object_store(clean_aws_env):
    """Non-local storage (fsspec's memory://, like S3: no directories, writes are single PUTs)."""
    import fsspec

    fs = fsspec.filesystem("memory")
    root = "memory://cityscapes-raw"
    label_ids = np.array([[7, 8, 26], [0, 33, 24]], np.uint8)
    fs.pipe_file(f"{root}/leftImg8bit/train/ulm/ulm_000000_000019_leftImg8bit.png", png(np.zeros((2, 3, 3), np.uint8)))
    fs.pipe_file(f"{root}/gtFine/train/ulm/ulm_000000_000019_gtFine_labelIds.png", png(label_ids))
    try:
        rows = read_manifest(import_cityscapes(root, "train", f"{root}/train.parquet")).to_pylist()
        # (memory:// URIs come back as memory:///...: the listing's spelling, as for the images)
        assert rows[0]["mask_uri"].endswith("cityscapes-raw/gtFine/train/ulm/ulm_000000_000019_gtFine_labelTrainIds.png")
        written = np.asarray(Image.open(io.BytesIO(fs.cat_file(rows[0]["mask_uri"]))))
        assert np.array_equal(written, official_train_ids(label_ids))
    finally:
        fs.rm(root, recursive=True)
