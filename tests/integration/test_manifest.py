"""Manifests and the three importers on local disk and on moto S3 (the importers only list files,
so the layouts hold placeholder bytes).
"""

from __future__ import annotations

import logging

import pyarrow as pa
import pytest

from pipelines.data.importers import import_cityscapes, import_folders, import_voc
from pipelines.data.manifest import ManifestError, read_manifest, write_manifest
from pipelines.common.uris import join_uri
from pipelines.data.storage import get_fs
from tests.helpers import put_placeholders


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """(root URI, storage options) on local disk and in a fresh moto bucket."""
    if request.param == "local":
        return str(tmp_path / "data"), None
    bucket = request.getfixturevalue("s3_bucket")
    return f"{bucket}/data", request.getfixturevalue("s3_options")


ROWS = [
    {"id": "007", "image_uri": "s3://b/img/007.jpg", "mask_uri": "s3://b/m/007.png"},
    {"id": "010", "image_uri": "s3://b/img/010.jpg", "mask_uri": ""},
    {"id": "a/b", "image_uri": "s3://b/img/a/b.jpg", "mask_uri": None},
]


@pytest.mark.parametrize("ext", ["parquet", "csv", "jsonl"])
def test_round_trip_in_every_format(root, ext):
    root_uri, options = root
    uri = write_manifest(ROWS, join_uri(root_uri, f"manifest.{ext}"), options)
    table = read_manifest(uri, options)
    assert table.column_names == ["id", "image_uri", "mask_uri"]
    assert all(field.type == pa.string() for field in table.schema)
    assert table.column("id").to_pylist() == ["007", "010", "a/b"]  # zeros kept, even in CSV
    assert table.column("mask_uri").to_pylist() == ["s3://b/m/007.png", None, None]


def test_import_voc(root):
    root_uri, options = root
    put_placeholders(root_uri, options, ["ImageSets/Segmentation/train.txt"])
    fs, base = get_fs(root_uri, options)
    fs.pipe_file(f"{base}/ImageSets/Segmentation/train.txt", b"2007_000032\n2007_000039\n\n")
    uri = import_voc(root_uri, "train", join_uri(root_uri, "train.parquet"), options)
    rows = read_manifest(uri, options).to_pylist()
    assert rows == [
        {"id": "2007_000032", "image_uri": join_uri(root_uri, "JPEGImages", "2007_000032.jpg"),
         "mask_uri": join_uri(root_uri, "SegmentationClass", "2007_000032.png")},
        {"id": "2007_000039", "image_uri": join_uri(root_uri, "JPEGImages", "2007_000039.jpg"),
         "mask_uri": join_uri(root_uri, "SegmentationClass", "2007_000039.png")},
    ]
    aug = import_voc(root_uri, "train", join_uri(root_uri, "aug.csv"), options,
                     mask_dir="SegmentationClassAug")
    assert read_manifest(aug, options).column("mask_uri")[0].as_py().endswith(
        "SegmentationClassAug/2007_000032.png")
    with pytest.raises(ManifestError, match="val.txt does not exist"):
        import_voc(root_uri, "val", join_uri(root_uri, "val.parquet"), options)


def test_import_cityscapes(root):
    root_uri, options = root
    put_placeholders(root_uri, options, [
        "leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png",
        "leftImg8bit/val/lindau/lindau_000001_000019_leftImg8bit.png",
        "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png",
        "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelTrainIds.png",
        "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png",
        "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_color.png",
    ])
    uri = import_cityscapes(root_uri, "val", join_uri(root_uri, "val.parquet"), options)
    rows = read_manifest(uri, options).to_pylist()
    assert [r["id"] for r in rows] == ["frankfurt/frankfurt_000000_000294", "lindau/lindau_000001_000019"]
    assert rows[0]["image_uri"] == join_uri(
        root_uri, "leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png")
    assert rows[0]["mask_uri"] == join_uri(
        root_uri, "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelTrainIds.png")
    assert rows[1]["mask_uri"] is None  # no label: an inference row, not a silent drop
    with pytest.raises(ManifestError, match="no \\*_leftImg8bit.png"):
        import_cityscapes(root_uri, "test", join_uri(root_uri, "test.parquet"), options)


def test_import_folders(root, caplog):
    root_uri, options = root
    put_placeholders(root_uri, options, [
        "images/1.jpg", "images/2.JPEG", "images/sub/3.png", "images/notes.txt",
        "masks/1.png", "masks/sub/3.png", "masks/orphan.png",
    ])
    out = join_uri(root_uri, "folders.jsonl")
    with caplog.at_level(logging.WARNING, logger="pipelines.data.manifest"):
        uri = import_folders(join_uri(root_uri, "images"), join_uri(root_uri, "masks"), out, options)
    rows = {r["id"]: r for r in read_manifest(uri, options).to_pylist()}
    assert sorted(rows) == ["1", "2", "sub/3"]
    assert rows["1"]["mask_uri"] == join_uri(root_uri, "masks", "1.png")
    assert rows["2"]["image_uri"] == join_uri(root_uri, "images", "2.JPEG")
    assert rows["2"]["mask_uri"] is None
    assert rows["sub/3"]["mask_uri"] == join_uri(root_uri, "masks", "sub", "3.png")
    assert "1 mask(s) without an image, e.g. ['orphan']" in caplog.text
    with pytest.raises(ManifestError, match="without an image"):
        import_folders(join_uri(root_uri, "images"), join_uri(root_uri, "masks"), out, options,
                       strict=True)
    inference = import_folders(join_uri(root_uri, "images"), None, out, options)
    assert read_manifest(inference, options).column("mask_uri").null_count == 3


