"""Manifests on local disk: read/write in three formats, validation messages, the CLI.
"""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipelines.data.importers import import_folders, import_voc
from pipelines.data.manifest import ManifestError, read_manifest, write_manifest
from tests.helpers import put_placeholders


def test_write_accepts_tables_and_column_dicts(tmp_path):
    columns = {"id": ["1", "2"], "image_uri": ["/x/1.jpg", "/x/2.jpg"]}
    uri = write_manifest(columns, str(tmp_path / "m.parquet"))
    assert read_manifest(uri).column("mask_uri").null_count == 2
    uri = write_manifest(pa.table(columns), str(tmp_path / "m2.csv"))
    assert read_manifest(uri).num_rows == 2


def test_missing_columns_are_named(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("name,path\n1,/x/1.jpg\n")
    with pytest.raises(ManifestError, match=r"missing column\(s\) \['id', 'image_uri'\]"):
        read_manifest(str(path))


def test_duplicate_ids_are_refused(tmp_path):
    path = tmp_path / "dup.jsonl"
    path.write_text(
        '{"id": "x", "image_uri": "/a.jpg"}\n{"id": "x", "image_uri": "/b.jpg"}\n'
        '{"id": "y", "image_uri": "/c.jpg"}\n'
    )
    with pytest.raises(ManifestError, match=r"1 duplicate id\(s\), e.g. \['x'\]"):
        read_manifest(str(path))


def test_empty_ids_and_image_uris_are_refused(tmp_path):
    with pytest.raises(ManifestError, match="empty id"):
        write_manifest([{"id": "", "image_uri": "/a.jpg"}], str(tmp_path / "m.parquet"))
    with pytest.raises(ManifestError, match=r"1 row\(s\) with an empty image_uri \(first at row 1\)"):
        write_manifest([{"id": "a", "image_uri": "/a.jpg"}, {"id": "b", "image_uri": None}],
                       str(tmp_path / "m.parquet"))


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(str(tmp_path / "nope.parquet"))


def test_import_voc_makes_local_roots_absolute(tmp_path, monkeypatch):
    (tmp_path / "voc/ImageSets/Segmentation").mkdir(parents=True)
    (tmp_path / "voc/ImageSets/Segmentation/val.txt").write_text("a\n")
    monkeypatch.chdir(tmp_path)
    uri = import_voc("voc", "val", "val.parquet")
    assert read_manifest(uri).column("image_uri")[0].as_py() == str(tmp_path / "voc/JPEGImages/a.jpg")


def test_import_folders_refuses_ambiguous_stems(tmp_path):
    put_placeholders(str(tmp_path), None, ["images/1.jpg", "images/1.png"])
    with pytest.raises(ManifestError, match="duplicate id"):
        import_folders(str(tmp_path / "images"), None, str(tmp_path / "m.parquet"))


def test_import_cli(tmp_path, capsys):
    from pipelines.import_dataset import run as main

    put_placeholders(str(tmp_path), None, ["images/1.jpg", "images/2.jpg", "masks/1.png"])
    out = str(tmp_path / "m.csv")
    result = main(["folders", str(tmp_path / "images"), "--masks", str(tmp_path / "masks"),
                   "--out", out])
    assert result == {"manifest": out, "rows": 2, "rows_without_mask": 1}
    assert '"rows": 2' in capsys.readouterr().out
    (tmp_path / "voc/ImageSets/Segmentation").mkdir(parents=True)
    (tmp_path / "voc/ImageSets/Segmentation/train.txt").write_text("a\nb\n")
    result = main(["voc", str(tmp_path / "voc"), "--split", "train", "--out",
                   str(tmp_path / "voc.parquet"), "--mask-dir", "SegmentationClassAug"])
    assert result["rows"] == 2 and result["rows_without_mask"] == 0
    with pytest.raises(Exception, match="does not exist"):
        main(["cityscapes", str(tmp_path / "nowhere"), "--split", "val", "--out", out])
