"""`segment.py --runtime onnx` on the session Ray cluster: the driver exports and checks the graph
once, the model actor runs it with ONNX Runtime, and the masks equal the torch runtime's."""

from __future__ import annotations

from deeplab_core.synthetic import SyntheticSpec
from pipelines import segment
from tests.helpers import untrained_checkpoint
from tests.integration.test_segmenter import _inputs, _masks, _quiet


def test_onnx_runtime_masks_equal_the_torch_runtimes(ray_cluster, tmp_path):
    ckpt = untrained_checkpoint(tmp_path / "ckpt", SyntheticSpec().num_classes)
    folder = _inputs(tmp_path / "in")  # three images, two sizes
    flags = ["--model", ckpt, "--input", str(folder), "--scales", "0.75,1", "--no-crf", "--batch-size", "2"]
    code, _ = _quiet(segment.main, [*flags, "--output", str(tmp_path / "torch")])
    assert code == 0
    code, printed = _quiet(segment.main, [*flags, "--output", str(tmp_path / "onnx"), "--runtime", "onnx"])
    assert code == 0
    assert "model exported to ONNX" in printed and "labels 100.00 %" in printed and "(ONNX Runtime)" in printed
    torch_masks, onnx_masks = _masks(tmp_path / "torch"), _masks(tmp_path / "onnx")
    assert sorted(onnx_masks) == ["a", "b", "c"]
    for name, mask in torch_masks.items():
        assert (onnx_masks[name] == mask).all(), name
