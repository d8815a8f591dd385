"""Model checkpoints on any fsspec storage, and loading a model from any URI the jobs accept.

A checkpoint directory holds `model.pt` = {"model": state_dict, "model_config": build_model
arguments, "meta": dict} and, for training checkpoints, `train_state.pt` (optimizer, scheduler,
iteration, RNG). Everything is plain tensors and containers, so it all loads with
`torch.load(weights_only=True)`: a checkpoint from storage can never run code on load.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deeplab_core.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from deeplab_core.models import build_model
from pipelines.common.errors import InputError
from pipelines.common.uris import MODEL_FILE, WEIGHTS_TAG
from pipelines.data.storage import get_fs

TRAIN_STATE_FILE = "train_state.pt"


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def model_payload(model: nn.Module, meta: dict | None = None) -> dict:
    bare = unwrap(model)
    if not hasattr(bare, "config"):
        raise TypeError("model has no .config; build it with deeplab_core.build_model")
    state = {k: v.detach().cpu() for k, v in bare.state_dict().items()}
    return {"model": state, "model_config": dict(bare.config), "meta": dict(meta or {})}


def save_checkpoint_dir(model: nn.Module, path: str | Path, meta: dict | None = None) -> Path:
    """Write `model.pt` into a local directory (created if needed); returns the directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.save(model_payload(model, meta), path / MODEL_FILE)
    return path


def build_from_payload(payload: dict, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    missing = {"model", "model_config"} - set(payload)
    if missing:
        raise ValueError(f"not a deeplab-ray checkpoint: missing {sorted(missing)}")
    config = dict(payload["model_config"])
    config.pop("pretrained", None)  # weights come from the checkpoint, never re-downloaded
    if int(config.get("num_classes", 0)) > IGNORE_INDEX:  # class ids would wrap in uint8 masks
        raise ValueError(f"the checkpoint predicts {config['num_classes']} classes; masks hold at most {IGNORE_INDEX}")
    model = build_model(**config)
    model.load_state_dict(payload["model"])
    return model.to(map_location).eval(), dict(payload.get("meta", {}))


class WeightsMismatch(InputError):
    """A model.pt whose bytes are not the ones its registered version recorded."""


def check_weights(data: bytes, expected: str | None, what: str) -> None:
    """Raises WeightsMismatch unless sha256(`data`) is `expected` (None: nothing to check)."""
    if expected is None:
        return
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected.lower():
        raise WeightsMismatch(f"weights of {what} do not match its {WEIGHTS_TAG} tag (sha256 {actual[:12]}... "
                              f"!= {expected[:12]}...): model.pt was replaced after registration; refusing it")


def model_from_checkpoint_file(uri: str, map_location: str | torch.device = "cpu",
                               storage_options: dict | None = None,
                               expected_sha256: str | None = None, what: str | None = None) -> tuple[nn.Module, dict]:
    """The model in a `model.pt`; with `expected_sha256`, the bytes read are checked against it
    before torch sees them (hashing the bytes loaded, not the file, leaves no window to swap it)."""
    fs, path = get_fs(uri, storage_options)
    with fs.open(path, "rb") as f:
        data = f.read()
    check_weights(data, expected_sha256, what or uri)
    payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return build_from_payload(payload, map_location)


def checkpoint_file_in(local_dir: str) -> str:
    for root, _, files in os.walk(local_dir):
        if MODEL_FILE in files:
            return os.path.join(root, MODEL_FILE)
    raise FileNotFoundError(f"no {MODEL_FILE} under {local_dir}")


def load_checkpoint(uri: str, map_location: str | torch.device = "cpu",
                    storage_options: dict | None = None) -> tuple[nn.Module, dict]:
    """Load a model in eval mode from a checkpoint directory or a `model.pt` file on any fsspec
    URI. (Registry and run URIs too: `pipelines.tracking.load_model`.)"""
    fs, path = get_fs(uri, storage_options)
    if fs.isdir(path):
        uri = uri.rstrip("/") + "/" + MODEL_FILE
    return model_from_checkpoint_file(uri, map_location, storage_options)


def num_classes_of(model) -> int:
    config = getattr(model, "config", None) or {}
    if "num_classes" in config:
        return int(config["num_classes"])
    with torch.inference_mode():  # a model without .config: ask it
        return int(model.eval()(torch.zeros(1, 3, 64, 64)).shape[1])


def normalisation_of(meta: Mapping[str, Any], model=None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input normalisation a model was trained with: the checkpoint's meta, else the model's
    own (`input_mean`/`input_std`, e.g. a converted Caffe model), else ImageNet's."""
    config = getattr(model, "config", None) or {}
    mean = meta.get("mean") or config.get("input_mean") or IMAGENET_MEAN
    std = meta.get("std") or config.get("input_std") or IMAGENET_STD
    return tuple(mean), tuple(std)
