"""pipelines/import_weights.py: argument handling, clear refusals, and peers' checkpoints converted
into our model file (and, with sqlite MLflow, into a registered version) with the same logits.

The fake peer checkpoints are test_peer_weights' re-implementations of the peer networks under
the peers' parameter names (VainF MobileNetV2 at 65x65) or torchvision's own models.
"""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
import torchvision
from torch import nn

from deeplab_core.constants import IMAGENET_MEAN, IMAGENET_STD
from deeplab_core.models import build_model
from deeplab_core.weights import KAZUTO_INPUT
from pipelines import import_weights
from pipelines.data.checkpoints import save_checkpoint_dir
from pipelines.tracking import load_model
from pipelines.common.errors import EXIT_USAGE, InputError
from pipelines.promotion.weights_import import (
    IMPORTERS,
    ImportWeightsConfig,
    check_arguments,
    checkpoint_meta,
    file_name,
    read_source,
    shown_uri,
)
from pipelines.tracking import tracking_uri_set
from tests.unit.test_peer_weights import (
    SIZE,
    VainFModel,
    perturb_batchnorm,
    relative_difference,
    vainf_checkpoint,
)

VAINF_ARGS = ["--arch", "deeplabv3plus", "--backbone", "mobilenetv2", "--num-classes", "5", "--output-stride", "16"]


@pytest.fixture(scope="module")
def vainf_reference() -> nn.Module:
    torch.manual_seed(0)
    reference = VainFModel("deeplabv3plus", "mobilenetv2", 5, 16)
    perturb_batchnorm(reference)
    return reference.eval()


@pytest.fixture
def vainf_file(tmp_path, vainf_reference):
    path = tmp_path / "best_deeplabv3plus_mobilenet_voc_os16.pth"
    torch.save(vainf_checkpoint(vainf_reference), path)
    return path


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = import_weights.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    """The one line the CLI prints for a refusal (progress lines start with [import])."""
    lines = [line for line in err.splitlines() if line.startswith("import_weights.py: error: ")]
    assert len(lines) == 1, err
    return lines[0]


# --------------------------------------------------------------------------- conversion


def test_vainf_checkpoint_becomes_our_model_file_with_the_same_logits(vainf_file, vainf_reference, tmp_path, capsys):
    # The file has VainF's real MobileNetV2 keys: sliced Sequentials keep blocks 0-3 / 4-17.
    model_state = torch.load(vainf_file, weights_only=True)["model_state"]
    assert {"backbone.low_level_features.0.0.weight", "backbone.high_level_features.4.conv.0.0.weight",
            "backbone.high_level_features.17.conv.3.weight"} <= model_state.keys()
    out_dir = tmp_path / "imported"
    code, out, _ = run(["vainf", vainf_file, *VAINF_ARGS, "--output", out_dir], capsys)
    assert code == 0
    payload = torch.load(out_dir / "model.pt", weights_only=True)
    assert set(payload) == {"model", "model_config", "meta"}
    meta = payload["meta"]
    assert meta["mean"] == list(IMAGENET_MEAN) and meta["std"] == list(IMAGENET_STD) and meta["num_classes"] == 5
    assert meta["source"] == {"kind": "vainf", "file": vainf_file.name,
                              "sha256": hashlib.sha256(vainf_file.read_bytes()).hexdigest()}
    config = payload["model_config"]
    assert (config["arch"], config["backbone"], config["output_stride"], config["block_padding"]) == (
        "deeplabv3plus", "mobilenetv2", 16, "input")
    summary = json.loads(out)
    assert summary["model_uri"] is None and summary["output"] == str(out_dir) and summary["source"] == meta["source"]

    model, loaded_meta = load_model(str(out_dir))
    assert loaded_meta == meta
    torch.manual_seed(1)
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        assert relative_difference(model(x), vainf_reference(x)) < 1e-5


def test_torchvision_backbone_is_read_from_the_file(tmp_path, capsys):
    torch.manual_seed(0)
    reference = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None,
                                                                    num_classes=3, aux_loss=False)
    perturb_batchnorm(reference)
    path = tmp_path / "deeplabv3_resnet50_coco.pth"
    torch.save(reference.state_dict(), path)
    code, _, _ = run(["torchvision", path, "--num-classes", 3, "--output", tmp_path / "tv"], capsys)
    assert code == 0
    model, meta = load_model(str(tmp_path / "tv"))
    assert (model.config["backbone"], model.config["output_stride"], meta["source"]["kind"]) == (
        "resnet50", 8, "torchvision")
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        assert relative_difference(model(x), reference.eval()(x)["out"]) < 1e-5


def test_meta_carries_the_models_own_normalisation():
    caffe = build_model("deeplabv2", "resnet18", num_classes=3, **KAZUTO_INPUT)  # what from_kazuto builds
    meta = checkpoint_meta(caffe, {"kind": "kazuto", "file": "x.pth", "sha256": "0" * 64})
    assert meta["mean"] == pytest.approx([0.48108, 0.45752, 0.40788], abs=1e-5)
    assert meta["std"] == pytest.approx([1 / 255] * 3) and meta["num_classes"] == 3


def test_registered_version_loads_with_the_same_logits(vainf_file, vainf_reference, sqlite_tracking_uri, tmp_path,
                                                       monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # sqlite MLflow keeps artifacts under ./mlruns
    code, out, _ = run(["vainf", vainf_file, *VAINF_ARGS, "--register", "imported",
                        "--tracking-uri", sqlite_tracking_uri], capsys)
    assert code == 0 and json.loads(out)["model_uri"] == "models:/imported/1"
    import mlflow

    version = mlflow.MlflowClient(sqlite_tracking_uri).get_model_version("imported", "1")
    assert version.tags["source.kind"] == "vainf" and version.tags["source.file"] == vainf_file.name
    assert version.tags["source.sha256"] == hashlib.sha256(vainf_file.read_bytes()).hexdigest()
    assert "val_mIoU" not in version.tags and "val_manifest" not in version.tags  # no --eval
    with tracking_uri_set(sqlite_tracking_uri):
        model, _ = load_model("models:/imported/1")
        # The same version also carries a PyTorch flavour: a torch.export program (no pickle) with
        # dynamic batch and image size, bit-identical to the checkpoint's model.
        exported = mlflow.pytorch.load_model("models:/imported/1")
        labels = mlflow.pyfunc.load_model("models:/imported/1").predict(
            torch.randint(0, 256, (2, 37, 45, 3), dtype=torch.uint8).numpy())
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        assert relative_difference(model(x), vainf_reference(x)) < 1e-5
        for shape in [(1, 3, *SIZE), (3, 3, 41, 57)]:
            x = torch.randn(*shape)
            assert torch.equal(exported(x), model(x))
    assert labels.shape == (2, 37, 45) and labels.dtype == "uint8" and labels.max() < 5


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(("argv", "message"), [
    (["kazuto", "k.pth", "--num-classes", 21, "--arch", "deeplabv3plus", "--output", "o"],
     ("--arch deeplabv3plus conflicts with a kazuto checkpoint: .* always --arch deeplabv2, --backbone resnet101, "
      "--output-stride 8; omit --arch")),
    (["torchvision", "t.pth", "--num-classes", 21, "--output-stride", 16, "--output", "o"],
     "--output-stride 16 conflicts with a torchvision checkpoint"),
    (["vainf", "v.pth", "--num-classes", 21, "--arch", "deeplabv3plus", "--output", "o"],
     r"a vainf checkpoint needs --backbone \(resnet50 or resnet101 or mobilenetv2\)"),
    (["vainf", "v.pth", "--num-classes", 21, "--arch", "deeplabv3plus", "--backbone", "xception", "--output", "o"],
     "--backbone xception is not one a vainf checkpoint can have; choose from resnet50, resnet101, mobilenetv2"),
    (["torchvision", "t.pth", "--num-classes", 21],
     "nothing to do: give --register NAME .* and/or --output DIR"),
    (["vainf", "v.pth", *VAINF_ARGS[:-1], 12, "--output", "o"], "--output-stride: Input should be 8 or 16"),
    (["kazuto", "k.pth", "--num-classes", 0, "--output", "o"], "--num-classes: Input should be greater than"),
])
def test_bad_arguments_are_one_line_and_exit_2(argv, message, capsys):
    code, _, err = run(argv, capsys)
    assert code == EXIT_USAGE
    assert re.search(message, error_line(err))
    assert "[import] reading" not in err  # refused before touching SOURCE


def test_arguments_a_kind_fixes_may_be_given_when_they_agree():
    cfg = ImportWeightsConfig(kind="kazuto", source="k.pth", num_classes=21, arch="deeplabv2",
                              backbone="resnet101", output_stride=8, output="o")
    assert check_arguments(cfg) is IMPORTERS["kazuto"]


def test_unknown_kind_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        import_weights.main(["caffe", "x.pth", "--num-classes", "21", "--output", "o"])
    assert exit_.value.code == 2 and "invalid choice: 'caffe'" in capsys.readouterr().err


# --------------------------------------------------------------------------- files that are refused


def _save(tmp_path, obj, name="ckpt.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_unrecognised_checkpoint_says_what_it_found(tmp_path, capsys):
    path = _save(tmp_path, {"epoch": 3, "net": {"encoder.conv.weight": torch.zeros(1)}})
    code, _, err = run(["vainf", path, *VAINF_ARGS, "--output", tmp_path / "o"], capsys)
    line = error_line(err)
    assert code == EXIT_USAGE and f"{path} is not recognised as a checkpoint of torchvision, VainF or kazuto1011" in line
    assert "top-level keys: epoch (int), net (dict)" in line and "encoder.conv.weight" in line


def test_a_peer_network_nothing_converts_is_refused_saying_why(tmp_path, capsys):
    kazuto_v3 = {k: torch.zeros(1) for k in ("base.layer1.conv1.conv.weight", "base.aspp.stages.c0.conv.weight",
                                             "base.fc1.conv.weight", "base.fc2.weight")}
    code, _, err = run(["kazuto", _save(tmp_path, kazuto_v3), "--num-classes", 21, "--output", tmp_path / "o"], capsys)
    line = error_line(err)
    assert code == EXIT_USAGE and "looks like a kazuto1011/deeplab-pytorch DeepLabV3 with MSC, which no importer" in line
    assert "not supported: its head is ASPP -> 1x1 conv-BN-ReLU (fc1) -> 1x1 classes (fc2)" in line
    assert not (tmp_path / "o").exists()


def test_another_programs_checkpoint_names_the_importer_to_use(tmp_path, capsys):
    kazuto_like = {"base.layer1.conv1.conv.weight": torch.zeros(1), "base.aspp.c0.weight": torch.zeros(1)}
    code, _, err = run(["vainf", _save(tmp_path, kazuto_like), *VAINF_ARGS, "--output", tmp_path / "o"], capsys)
    assert code == EXIT_USAGE
    assert "looks like a kazuto1011/deeplab-pytorch DeepLabV2 with MSC, not a VainF" in error_line(err)
    assert "import it with `import_weights.py kazuto ...`" in error_line(err)


def test_our_own_checkpoint_needs_no_import(tmp_path, capsys):
    ours = save_checkpoint_dir(build_model("deeplabv3", "resnet18", num_classes=3), tmp_path / "ours") / "model.pt"
    code, _, err = run(["torchvision", ours, "--num-classes", 3, "--output", tmp_path / "o"], capsys)
    assert code == EXIT_USAGE and "is already a deeplab-ray model checkpoint: no conversion needed" in error_line(err)


def test_unsupported_torchvision_variant(tmp_path, capsys):
    with torch.device("meta"):
        reference = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None)
    state = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in reference.state_dict().items()}
    code, _, err = run(["torchvision", _save(tmp_path, state), "--num-classes", 21, "--output", tmp_path / "o"], capsys)
    line = error_line(err)
    assert code == EXIT_USAGE and "torchvision's deeplabv3_mobilenet_v3_large is not supported" in line
    assert "deeplabv3_resnet50 and deeplabv3_resnet101" in line and len(line) < 1000


def test_wrong_classes_name_the_source_file(vainf_file, tmp_path, capsys):
    code, _, err = run(["vainf", vainf_file, *VAINF_ARGS[:5], 21, "--output", tmp_path / "o"], capsys)
    assert code == EXIT_USAGE
    assert error_line(err).endswith(f"error: {vainf_file} holds VainF's deeplabv3plus with mobilenetv2 and 5 "
                                    f"classes, not deeplabv3plus with mobilenetv2 and 21 classes")


def test_pickled_module_is_refused(tmp_path, capsys):
    path = _save(tmp_path, nn.Conv2d(3, 4, 1), "module.pt")
    code, _, err = run(["vainf", path, *VAINF_ARGS, "--output", tmp_path / "o"], capsys)
    assert code == EXIT_USAGE and "holds pickled Python objects" in error_line(err) and "state_dict()" in error_line(err)
    assert not (tmp_path / "o").exists()


def test_missing_and_unreadable_sources(tmp_path, capsys):
    code, _, err = run(["vainf", tmp_path / "nope.pth", *VAINF_ARGS, "--output", tmp_path / "o"], capsys)
    assert code == EXIT_USAGE and error_line(err).endswith(f"cannot read {tmp_path / 'nope.pth'}: no such file")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    code, _, err = run(["vainf", tmp_path / "junk.pth", *VAINF_ARGS, "--output", tmp_path / "o"], capsys)
    assert code == EXIT_USAGE and "junk.pth is not a PyTorch checkpoint file" in error_line(err)


def test_credentials_never_reach_messages_or_provenance():
    uri = "https://user:hunter22@127.0.0.1:9/models/best.pth?X-Amz-Signature=s3cr3tsig"
    assert "hunter22" not in shown_uri(uri) and "s3cr3tsig" not in shown_uri(uri)
    assert file_name(uri) == "best.pth" and file_name("s3://bucket/a/b/x.pth") == "x.pth"
    with pytest.raises(InputError) as error:  # nothing listens on port 9: a connection error
        read_source(uri)
    message = str(error.value)
    assert message.startswith("cannot read https://user:***@127.0.0.1:9/models/best.pth?***: ")
    assert "hunter22" not in message and "s3cr3tsig" not in message
