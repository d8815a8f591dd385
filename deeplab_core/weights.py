"""Pretrained weights: loading into a backbone by name, and torchvision's deeplabv3 checkpoints.

Sources are a local path, any fsspec URI (s3://, gs://, memory://, ...), or "imagenet" for
torchvision's ImageNet weights (downloaded by torchvision into its hub cache; offline, only an
already-cached file works). Files are read with `torch.load(weights_only=True)`.
"""

import logging
import os
from collections.abc import Mapping
from typing import NamedTuple

import fsspec
import torch
import torchvision
from torch import Tensor, nn

log = logging.getLogger(__name__)

# Our deeplabv3 in torchvision's configuration: the module names already match torchvision's,
# so converting a checkpoint is choosing these options and loading by name.
TORCHVISION_DEEPLABV3 = {"output_stride": 8, "multi_grid": None, "aspp_rates": (12, 24, 36), "aspp_dropout": 0.5}


class LoadReport(NamedTuple):
    loaded: list[str]
    missing: list[str]  # in the module, not in the file
    unexpected: list[str]  # in the file, not in the module
    mismatched: list[str]  # in both, different shapes (left as they were)


def read_state_dict(uri: str | os.PathLike[str]) -> dict[str, Tensor]:
    """A state_dict from a path or fsspec URI.

    Also accepts a training checkpoint holding it under "model" or "state_dict".
    """
    with fsspec.open(os.fspath(uri), "rb") as f:
        obj = torch.load(f, map_location="cpu", weights_only=True)
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


def load_matching(module: nn.Module, state_dict: Mapping[str, Tensor], origin: str = "state_dict") -> LoadReport:
    """Load the tensors whose name and shape match; log the rest at WARNING; raise if none match."""
    own = module.state_dict()
    # A checkpoint of a whole segmentation model: take its backbone.
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
            f"(file: {_preview(list(state_dict))}; model: {_preview(list(own))}; shape mismatches: {_preview(report.mismatched)})"
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


def _preview(names: list[str], n: int = 5) -> str:
    if not names:
        return "none"
    more = f", ... ({len(names)} in all)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def load_backbone_weights(
    backbone: nn.Module, source: str | os.PathLike[str], imagenet_weights: str | None = None
) -> LoadReport:
    """Load `source` (path, fsspec URI, or "imagenet") into `backbone` by name.

    `imagenet_weights` names the torchvision weights that "imagenet" means for this backbone.
    """
    if source == "imagenet":
        if imagenet_weights is None:
            raise ValueError("torchvision has no ImageNet weights for this backbone; pass a local path or fsspec URI")
        return load_matching(backbone, imagenet_state_dict(imagenet_weights), f"torchvision {imagenet_weights}")
    return load_matching(backbone, read_state_dict(source), os.fspath(source))


def from_torchvision(
    state_dict: Mapping[str, Tensor] | str | os.PathLike[str], backbone: str = "resnet101", num_classes: int = 21
) -> nn.Module:
    """Our deeplabv3 (output stride 8, rates 12/24/36, no multi-grid) from a torchvision
    `deeplabv3_resnet50/101` state_dict (or its path / URI); the aux head is kept if present.

    Every tensor must match by name and shape: anything else is not such a checkpoint.
    """
    from .models import build_model  # deferred: the model factory imports this module

    if not isinstance(state_dict, Mapping):
        state_dict = read_state_dict(state_dict)
    aux = any(key.startswith("aux_classifier.") for key in state_dict)
    model = build_model("deeplabv3", backbone, num_classes, aux=aux, **TORCHVISION_DEEPLABV3)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"not a torchvision deeplabv3_{backbone} state_dict with {num_classes} classes: {error}"
        ) from error
    return model
