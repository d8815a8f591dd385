"""The synthetic dataset as a VOC layout, on local disk and on moto S3."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from deeplab_core.palette import voc_palette
from deeplab_core.synthetic import SyntheticSpec, render_scene
from pipelines.data.decode import decode_image, decode_mask
from pipelines.data.manifest import read_manifest
from pipelines.common.uris import join_uri
from pipelines.data.storage import get_fs
from pipelines.data.synthetic import scene_seed, write_synthetic_voc

SPEC = SyntheticSpec(height=48, width=64)


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "synth"), None
    return f"{request.getfixturevalue('s3_bucket')}/synth", request.getfixturevalue("s3_options")


def read_bytes(uri: str, options) -> bytes:
    fs, path = get_fs(uri, options)
    return fs.cat_file(path)


def test_writes_a_voc_layout_with_manifests(root):
    root_uri, options = root
    result = write_synthetic_voc(root_uri, num_train=4, num_val=2, spec=SPEC, seed=3,
                                 storage_options=options)
    assert result["root"] == root_uri
    train = read_manifest(result["train_manifest"], options)
    val = read_manifest(result["val_manifest"], options)
    assert train.column("id").to_pylist() == [f"synth_{i:06d}" for i in range(4)]
    assert val.column("id").to_pylist() == ["synth_000004", "synth_000005"]
    split = read_bytes(join_uri(root_uri, "ImageSets", "Segmentation", "val.txt"), options)
    assert split.decode().split() == ["synth_000004", "synth_000005"]

    row = val.to_pylist()[0]
    expected_image, expected_mask = render_scene(SPEC, scene_seed(3, 4))
    mask_bytes = read_bytes(row["mask_uri"], options)
    with Image.open(io.BytesIO(mask_bytes)) as png:
        assert png.mode == "P" and png.getpalette()[:768] == voc_palette()
    image = decode_image(read_bytes(row["image_uri"], options))
    mask = decode_mask(mask_bytes, SPEC.num_classes, image.shape)
    np.testing.assert_array_equal(mask, expected_mask)  # masks are lossless
    error = np.abs(image.astype(int) - expected_image.astype(int)).mean()  # JPEG q85 of noise
    swapped = np.abs(image[..., ::-1].astype(int) - expected_image.astype(int)).mean()
    assert error < 10 and swapped > 2 * error  # close, and in RGB (not BGR) order
    assert 255 in np.unique(mask)  # the ignore band survived

    params = json.loads(read_bytes(join_uri(root_uri, "synthetic.json"), options))
    assert params["num_train"] == 4 and params["seed"] == 3 and params["spec"]["height"] == 48


