"""Reading checkpoints and loading tensors by name: the layer below both the model factory and the
converters in `deeplab_core.weights` (it imports neither, so there is no import circle).

Also recognises which program wrote a checkpoint (`identify`), so every refusal can say what
was found in the file and which importer reads it.
"""

import logging
import os
import pickle
from collections.abc import Mapping
from typing import Any, NamedTuple

import fsspec
import torch
import torchvision
from torch import Tensor, nn

# The name users configure and the docs cite; kept from when this code lived in weights.py.
log = logging.getLogger("deeplab_core.weights")

Source = str | os.PathLike[str]
Checkpoint = Mapping[str, Any] | Source


class LoadReport(NamedTuple):
    loaded: list[str]
    missing: list[str]  # in the module, not in the file
    unexpected: list[str]  # in the file, not in the module
    mismatched: list[str]  # in both, different shapes (left as they were)


def read_checkpoint(uri: Source) -> Any:
    """`torch.load(weights_only=True)` of a path or fsspec URI, with a clear error for a pickled
    whole `nn.Module` (which weights-only loading refuses by design)."""
    with fsspec.open(os.fspath(uri), "rb") as f:
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise ValueError(
                f"{uri}: not a checkpoint of tensors; it holds pickled Python objects (e.g. a whole nn.Module saved "
                f"with torch.save(model)), which are never unpickled here. Save model.state_dict() instead "
                f"({str(error).splitlines()[0]})"
            ) from error


def as_checkpoint(checkpoint: Checkpoint) -> Mapping[str, Any]:
    """An already-loaded checkpoint as is, or the mapping read from a path / URI."""
    obj = checkpoint if isinstance(checkpoint, Mapping) else read_checkpoint(checkpoint)
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a checkpoint mapping (a state_dict or a dict holding one), got {type(obj).__name__}")
    return obj


def tensors(obj: Mapping[str, Any]) -> dict[str, Tensor]:
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


# --------------------------------------------------------------------------- what is in a file

# The "importer" of a recognised kind that nothing here converts: this prefix, then why.
NOT_SUPPORTED = "not supported: "

# kazuto1011/deeplab-pytorch's networks on its ResNet (keys `layer1.conv1.conv.*`, under `base.`
# when wrapped in MSC), by head: (name, test on the keys without `base.`, importer). Only DeepLabV2
# has released weights; DeepLabV1 is what its convert.py writes from the COCO initialisation.
_KAZUTO_KINDS: list[tuple[str, Any, str]] = [
    ("DeepLabV2", lambda k: "aspp.c0.weight" in k, "deeplab_core.weights.from_kazuto(checkpoint, num_classes)"),
    ("DeepLabV3+", lambda k: "aspp.stages.c0.conv.weight" in k and "reduce.conv.weight" in k,
     NOT_SUPPORTED + "kazuto releases no weights for it and only its DeepLabV2 converts; MSC (keys base.*) exists "
     "only on our deeplabv2"),
    ("DeepLabV3", lambda k: "aspp.stages.c0.conv.weight" in k,
     NOT_SUPPORTED + "its head is ASPP -> 1x1 conv-BN-ReLU (fc1) -> 1x1 classes (fc2), ours has a 3x3 conv-BN-ReLU "
     "between; kazuto releases no weights for it"),
    ("DeepLabV1 / ResNet", lambda k: "fc.weight" in k,
     NOT_SUPPORTED + "one fc layer on layer5 and no ASPP (the COCO initialisation convert.py writes, or an ImageNet "
     "classifier), not a segmentation model; our deeplabv1 is VGG-16 LargeFOV"),
]


def _kazuto_kind(keys: set[str]) -> tuple[str, str] | None:
    bare = {k.removeprefix("base.") for k in keys}
    if "layer1.conv1.conv.weight" not in bare:
        return None
    msc = " with MSC" if "base.layer1.conv1.conv.weight" in keys else ""
    return next(
        ((f"kazuto1011/deeplab-pytorch {name}{msc}", importer) for name, test, importer in _KAZUTO_KINDS if test(bare)),
        None,
    )


def _use(importer: str) -> str:
    """How an error tells the user to read a recognised file: the importer, or why none does."""
    return f"no importer reads it ({importer.removeprefix(NOT_SUPPORTED)})" if importer.startswith(
        NOT_SUPPORTED) else f"use {importer}"


# (kind, test on a state_dict's keys, importer to use). The first match wins.
_STATE_DICT_KINDS: list[tuple[str, Any, str]] = [
    ("VainF/DeepLabV3Plus-Pytorch DeepLabV3+ (state_dict)", lambda k: "classifier.project.0.weight" in k,
     "deeplab_core.weights.from_vainf(checkpoint, 'deeplabv3plus', backbone, num_classes, output_stride)"),
    ("VainF/DeepLabV3Plus-Pytorch DeepLabV3 (state_dict)", lambda k: "classifier.classifier.0.convs.0.0.weight" in k,
     "deeplab_core.weights.from_vainf(checkpoint, 'deeplabv3', backbone, num_classes, output_stride)"),
    ("torchvision segmentation model (deeplabv3/fcn/lraspp)",
     lambda k: any(x.startswith("backbone.") for x in k) and any(x.startswith("classifier.0") for x in k),
     "deeplab_core.weights.from_torchvision(checkpoint) (deeplabv3_resnet50/101 only)"),
]


def identify(obj: Mapping[str, Any]) -> tuple[str, str] | None:
    """(what wrote this checkpoint, the importer that reads it), or None if not recognised."""
    if {"model", "model_config"} <= obj.keys():
        return "deeplab-ray model checkpoint", "pipelines' load_model / build_model(**ckpt['model_config'])"
    if "model_state" in obj and isinstance(obj["model_state"], Mapping):
        found = identify(obj["model_state"])
        kind = "VainF/DeepLabV3Plus-Pytorch training checkpoint"
        return (kind + (f" ({found[0]})" if found else "")), (found[1] if found else "deeplab_core.weights.from_vainf")
    keys = set(tensors(obj))
    if kazuto := _kazuto_kind(keys):
        return kazuto
    for kind, test, importer in _STATE_DICT_KINDS:
        if test(keys):
            return kind, importer
    return None


def describe(obj: Mapping[str, Any], n: int = 5) -> str:
    """Top-level keys (with the type of non-tensors) and a sample of tensor names, for errors."""
    own = tensors(obj)
    others = [f"{k} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, Tensor)]
    nested = next((v for v in obj.values() if isinstance(v, Mapping) and tensors(v)), None)
    sample = own or (tensors(nested) if nested is not None else {})
    parts = []
    if others:
        parts.append(f"top-level keys: {preview(others, n)}")
    if sample:
        where = "" if own else " (inside)"
        parts.append(f"{len(sample)} tensors{where}, e.g. {preview(list(sample), n)}")
    return "; ".join(parts) or "an empty mapping"


def preview(names: list[str], n: int = 5) -> str:
    if not names:
        return "none"
    more = f", ... ({len(names)} in all)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def key_differences(expected: Mapping[str, Tensor], found: Mapping[str, Tensor], n: int = 5) -> str:
    """A short summary of how two state_dicts differ (never the whole key lists)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [
        f"{k} {tuple(found[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected if k in found and found[k].shape != expected[k].shape
    ]
    parts = [
        f"{what} ({len(names)}): {preview(names, n)}"
        for what, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatch (file vs model)", mismatched))
        if names
    ]
    return "; ".join(parts) or "none"


def unknown_checkpoint_error(obj: Mapping[str, Any], origin: str, expected: str) -> ValueError:
    """The error for a file that is not what an importer reads: what it is (if known), what is in it."""
    found = identify(obj)
    hint = f"it looks like a {found[0]}: {_use(found[1])}" if found else (
        "not recognised as any known checkpoint. Importers: deeplab_core.weights.from_torchvision (torchvision "
        "deeplabv3_resnet50/101), from_vainf (VainF/DeepLabV3Plus-Pytorch), from_kazuto (kazuto1011/deeplab-pytorch "
        "DeepLabV2); build_model(pretrained=...) for backbone weights by name"
    )
    return ValueError(f"{origin} is not {expected}; {hint}. Found {describe(obj)}")


# --------------------------------------------------------------------------- backbone loading


def read_state_dict(uri: Source) -> dict[str, Tensor]:
    """A state_dict from a path or fsspec URI.

    Also accepts a training checkpoint holding it under "model" or "state_dict".
    """
    return _unwrap(read_checkpoint(uri), uri)


def _unwrap(obj: Any, uri: Source) -> dict[str, Tensor]:
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{uri}: expected a state_dict (a mapping of names to tensors), got {type(obj).__name__}")
    return dict(obj)


def imagenet_state_dict(weights_name: str) -> dict[str, Tensor]:
    """torchvision's ImageNet weights, e.g. "ResNet101_Weights.IMAGENET1K_V1" (needs the network
    unless the file is already in torchvision's hub cache)."""
    weights = torchvision.models.get_weight(weights_name)
    try:
        return weights.get_state_dict(progress=False, map_location="cpu", weights_only=True)
    except OSError as error:  # URLError, timeouts, DNS failures
        raise RuntimeError(
            f"cannot download torchvision's {weights_name} from {weights.url} ({error}); without network access, "
            f"fetch that file elsewhere and pass pretrained=<its local path or fsspec URI>"
        ) from error


def _refuse_peer_models(state_dict: Mapping[str, Any], origin: str) -> None:
    """`pretrained=` takes backbone weights; a whole peer model has its own importer."""
    found = identify(state_dict)
    if found is not None and not found[0].startswith(("deeplab-ray", "torchvision")):
        raise ValueError(
            f"{origin} is a whole {found[0]}, not backbone weights; pretrained= loads a backbone by name. "
            f"To get that model (backbone, head and all): {_use(found[1])}. Found {describe(state_dict)}"
        )


def load_matching(module: nn.Module, state_dict: Mapping[str, Tensor], origin: str = "state_dict") -> LoadReport:
    """Load the tensors whose name and shape match; log the rest at WARNING; raise if none match."""
    _refuse_peer_models(state_dict, origin)
    own = module.state_dict()
    # A checkpoint of a whole segmentation model (ours, torchvision's): take its backbone.
    if not own.keys() & state_dict.keys() and any(k.startswith("backbone.") for k in state_dict):
        state_dict = {k.removeprefix("backbone."): v for k, v in state_dict.items() if k.startswith("backbone.")}
    shared = [k for k in state_dict if k in own]
    loaded = [k for k in shared if getattr(state_dict[k], "shape", None) == own[k].shape]
    report = LoadReport(
        loaded=loaded,
        missing=[k for k in own if k not in state_dict],
        unexpected=[k for k in state_dict if k not in own],
        mismatched=[k for k in shared if k not in set(loaded)],
    )
    if not loaded:
        raise ValueError(
            f"no tensor from {origin} matches the model by name and shape "
            f"(file: {describe(state_dict)}; model: {preview(list(own))}; shape mismatches: {preview(report.mismatched)})"
        )
    module.load_state_dict({k: state_dict[k] for k in loaded}, strict=False)
    log.info("loaded %d tensors from %s", len(loaded), origin)
    if report.missing or report.unexpected or report.mismatched:
        log.warning(
            "pretrained weights from %s: %d loaded; missing (%d): %s; unexpected (%d): %s; shape mismatch (%d): %s",
            origin, len(loaded), len(report.missing), report.missing, len(report.unexpected), report.unexpected,
            len(report.mismatched), report.mismatched,
        )
    return report


def load_backbone_weights(backbone: nn.Module, source: Source, imagenet_weights: str | None = None) -> LoadReport:
    """Load `source` (path, fsspec URI, or "imagenet") into `backbone` by name.

    `imagenet_weights` names the torchvision weights that "imagenet" means for this backbone.
    """
    if source == "imagenet":
        if imagenet_weights is None:
            raise ValueError("torchvision has no ImageNet weights for this backbone; pass a local path or fsspec URI")
        return load_matching(backbone, imagenet_state_dict(imagenet_weights), f"torchvision {imagenet_weights}")
    obj = read_checkpoint(source)
    if isinstance(obj, Mapping):
        _refuse_peer_models(obj, os.fspath(source))  # before unwrapping: the VainF wrapper is recognised whole
    return load_matching(backbone, _unwrap(obj, source), os.fspath(source))
