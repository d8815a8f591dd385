"""`--runtime onnx` (pipelines/segmentation/runtime.py, deeplab_core/onnx_model.py): the export is
checked against eager at two other sizes, a graph with a size baked in is refused, the graph plugs
into tta.predict and the model stage with the torch runtime's labels; the missing extra, bf16 and
GPUs are refused in one line, exit 2."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from deeplab_core import build_model
from deeplab_core.constants import TTASettings
from deeplab_core.models import DeepLabV2
from deeplab_core.models.aspp import ASPPV2
from deeplab_core.onnx_model import ATOL, CHECK_SHAPES, ExportMismatch, OnnxModel, check_export, export_onnx
from deeplab_core.tta import predict
from pipelines import segment
from pipelines.common.errors import InputError
from pipelines.segmentation import precision, runtime
from pipelines.segmentation.config import SegmentConfig
from pipelines.segmentation.segmenter import Segmenter
from pipelines.segmentation.stages import IMAGE, LABEL, LABEL_PLAIN, ModelStage
from tests.unit.test_segment_stages import decoded_batch, plan_for


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("deeplabv3plus", backbone="mobilenetv2", num_classes=6, width_mult=0.25).eval()


@pytest.fixture(scope="module")
def graph(model):
    return export_onnx(model)  # ~10-20 s of torch.export: once for the module


class TinyBody(nn.Module):
    """A one-conv backbone (output stride 4): DeepLabV2's own MSC code around it exports in seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4, padding=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.conv(x)}


def tiny_msc(resize: str) -> nn.Module:
    """DeepLabv2 MSC at scales (1, 0.5); `msc_resize="size"` computes the pyramid's sizes as Python
    ints (`int(H * s)`), which torch.export bakes in at the traced size."""
    torch.manual_seed(0)
    head = ASPPV2([nn.Conv2d(8, 4, 3, padding=rate, dilation=rate) for rate in (1, 2)])
    return DeepLabV2(TinyBody(), head, None, msc_scales=(1, 0.5), msc_resize=resize).eval()


def test_export_matches_eager_at_two_other_sizes_and_batches(model, graph):
    checked = check_export(graph, model)
    assert checked.shapes == CHECK_SHAPES and checked.max_abs_diff < ATOL and checked.labels_equal == 1.0
    assert graph.config["output_stride"] == 16  # predict's small-scale warning reads it
    x = torch.randn(2, 3, 41, 53)  # and a third size, odd
    with torch.inference_mode():
        torch.testing.assert_close(OnnxModel(graph)(x), model(x), atol=ATOL, rtol=1e-3)


def test_a_graph_with_a_baked_size_is_refused_in_one_line(capsys):
    baked = tiny_msc("size")
    with pytest.raises(ExportMismatch, match="size is baked into the graph"):
        check_export(export_onnx(baked), baked)
    with pytest.raises(InputError, match="cannot be used") as refused:
        runtime.prepare(baked, runtime.ONNX)
    assert "\n" not in str(refused.value) and "--runtime torch" in str(refused.value)
    assert capsys.readouterr().out == ""  # nothing said about an export that is not used
    by_factor = tiny_msc("scale_factor")  # resized by a factor the graph keeps: it generalises
    assert check_export(export_onnx(by_factor), by_factor).labels_equal == 1.0


def test_the_graph_runs_predicts_tta_and_the_model_stage_with_torchs_labels(model, graph):
    x = torch.randn(2, 3, 48, 64)
    tta = TTASettings(scales=(0.75, 1.0, 1.25), flip=True)
    expected = predict(model, x, tta)
    got = predict(OnnxModel(graph), x, tta)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)

    plan = plan_for("pydensecrf")
    onnx_plan = dataclasses.replace(plan, runtime=runtime.ONNX)
    batch = decoded_batch()
    torch_out = ModelStage(copy.deepcopy(model), plan, "cpu", 1)(batch)
    stage = ModelStage(graph, onnx_plan, "cpu", 1)
    assert isinstance(stage.model, OnnxModel) and not stage.channels_last
    onnx_out = stage(batch)
    for i in range(len(batch[IMAGE])):
        np.testing.assert_array_equal(onnx_out[LABEL][i], torch_out[LABEL][i])
        np.testing.assert_array_equal(onnx_out[LABEL_PLAIN][i], torch_out[LABEL_PLAIN][i])


def test_the_segmenter_takes_the_runtime_too(model, graph, monkeypatch):
    monkeypatch.setattr(runtime, "prepare", lambda m, name: graph if name == runtime.ONNX else m)  # one export
    settings = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), scales=(0.75, 1.0), crf=False)
    image = decoded_batch(1)[IMAGE][0]
    onnx = Segmenter(copy.deepcopy(model), runtime=runtime.ONNX, device="cpu", **settings)
    assert isinstance(onnx.model, OnnxModel)
    np.testing.assert_array_equal(onnx(image), Segmenter(copy.deepcopy(model), device="cpu", **settings)(image))


def _hide_onnxruntime(monkeypatch):
    real = runtime.importlib.util.find_spec
    monkeypatch.setattr(runtime.importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real(name, *a))


def test_without_the_extra_the_onnx_runtime_is_refused_in_one_line(monkeypatch, tmp_path, capsys):
    _hide_onnxruntime(monkeypatch)
    runtime.check_available(runtime.TORCH)  # the default never needs it
    with pytest.raises(InputError, match=r"needs onnxruntime \(not installed\): pip install 'deeplab-ray\[onnx\]'"):
        runtime.check_available(runtime.ONNX)
    flags = ["--model", str(tmp_path / "ckpt"), "--input", str(tmp_path), "--output", str(tmp_path / "out"),
             "--runtime", "onnx"]
    for local in ([], ["--local"]):  # the Ray job and the in-process Segmenter
        code = segment.main([*flags, *local])
        err = capsys.readouterr().err
        # one line, before the (missing) model is looked for or the output touched
        assert code == 2 and err.count("\n") == 1 and "pip install 'deeplab-ray[onnx]'" in err, err
        assert not (tmp_path / "out").exists()


def test_onnx_is_cpu_and_float32_only(tmp_path, capsys):
    with pytest.raises(InputError, match="CPU only"):
        runtime.check_device(runtime.ONNX, gpu=True)
    runtime.check_device(runtime.ONNX, gpu=False)
    runtime.check_device(runtime.TORCH, gpu=True)
    base = {"model": "m", "input": "i", "output": "o", "runtime": "onnx"}
    for bad, words in (({"device": "cuda"}, "CPU only"), ({"precision": "bf16"}, "float32 only")):
        with pytest.raises(ValueError, match=words):
            SegmentConfig(**base, **bad)
    code = segment.main(["--model", "m", "--input", str(tmp_path), "--output", str(tmp_path / "out"),
                         "--runtime", "onnx", "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2 and "CPU only" in err and err.count("\n") == 1, err
    assert SegmentConfig(**base).precision == "auto"
    assert precision.autocast_for("auto", gpu=False, runtime="onnx") is False  # auto means fp32 here
