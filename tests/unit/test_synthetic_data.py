"""The synthetic dataset as a VOC layout, on local disk and on moto S3."""

from __future__ import annotations

import pytest

import pipelines.data.synthetic as synthetic_data
from deeplab_core.synthetic import SyntheticSpec
from pipelines.data.manifest import read_manifest
from pipelines.data.storage import get_fs
from pipelines.data.synthetic import write_synthetic_voc

SPEC = SyntheticSpec(height=48, width=64)


def read_bytes(uri: str, options) -> bytes:
    fs, path = get_fs(uri, options)
    return fs.cat_file(path)


def test_second_call_with_the_same_parameters_writes_nothing(tmp_path, monkeypatch):
    root_uri = str(tmp_path / "synth")
    first = write_synthetic_voc(root_uri, 3, 1, spec=SPEC, seed=0)

    def fail(*args, **kwargs):
        raise AssertionError("scenes were rendered again")

    monkeypatch.setattr(synthetic_data, "render_scene", fail)
    assert write_synthetic_voc(root_uri, 3, 1, spec=SPEC, seed=0) == first
    with pytest.raises(AssertionError, match="rendered again"):  # other parameters: regenerated
        write_synthetic_voc(root_uri, 3, 1, spec=SPEC, seed=1)


def test_same_parameters_give_identical_files(tmp_path):
    a = write_synthetic_voc(str(tmp_path / "a"), 2, 1, spec=SPEC, seed=5)
    b = write_synthetic_voc(str(tmp_path / "b"), 2, 1, spec=SPEC, seed=5)
    for row_a, row_b in zip(read_manifest(a["train_manifest"]).to_pylist(),
                            read_manifest(b["train_manifest"]).to_pylist()):
        assert read_bytes(row_a["image_uri"], None) == read_bytes(row_b["image_uri"], None)
        assert read_bytes(row_a["mask_uri"], None) == read_bytes(row_b["mask_uri"], None)


def test_progress_lines(tmp_path, capsys):
    write_synthetic_voc(str(tmp_path / "p"), 10, 0, spec=SPEC, progress=True)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("synthetic data: 10/10 scenes written")
