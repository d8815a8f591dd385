"""Other programs' trained DeepLab weights as registered model versions.

    import_weights(ImportWeightsConfig(kind="vainf", source="s3://b/best_deeplabv3plus_mobilenet_voc_os16.pth",
                                       arch="deeplabv3plus", backbone="mobilenetv2", num_classes=21,
                                       registered_model="deeplab", eval_manifest="s3://b/voc/val.parquet"))

Why here, in promotion/: what this produces is what promotion consumes. An imported version is
registered like a trained one (our `model.pt` behind the same pyfunc model, `val_mIoU` +
`val_manifest` tags), so `promote.py` compares it with the champion on equal terms. The
conversions themselves are `deeplab_core.weights.from_*`; this module adds the job around them:
reading SOURCE once from any fsspec URI (its bytes give the sha256 provenance tag and the weights-
only `torch.load`), checking that it is the kind asked for, the checkpoint meta (input
normalisation, classes, provenance), the optional evaluation, and the registration
(`pipelines.tracking.register_imported_model`). Every problem with the arguments or the file is an
`InputError` naming the (redacted) source: the entry script prints it as one line, exit 2.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from deeplab_core.constants import IGNORE_INDEX
from deeplab_core.loading import describe, identify
from deeplab_core.weights import from_kazuto, from_torchvision, from_vainf
from pipelines.data.checkpoints import MODEL_FILE, save_checkpoint_dir
from pipelines.common.config import Section
from pipelines.common.errors import InputError
from pipelines.common.redaction import redact, scrub
from pipelines.common.uris import DEFAULT_TRACKING_URI, absolute_uri, join_uri, resolve_tracking_uri
from pipelines.data.storage import (
    check_access,
    get_fs,
    make_parent_dirs,
    resolve_storage_options,
    StorageError,
)

DEFAULT_EXPERIMENT = "deeplab-imports"
VAINF_DEFAULT_OUTPUT_STRIDE = 16  # VainF's main.py default; the weights do not say (docs/models.md)
# What evaluate_model reports that becomes a version tag, as training names it (val_<metric>).
EVAL_METRICS = ("mIoU", "pixel_acc", "mean_acc", "fw_iou")


class ImportWeightsConfig(Section):
    """What `pipelines/import_weights.py` runs."""

    kind: Literal["torchvision", "vainf", "kazuto"] = Field(description="program that wrote SOURCE")
    source: str = Field(description="checkpoint file: local path or any fsspec URI")
    arch: str | None = Field(None, description="architecture (VainF: deeplabv3 or deeplabv3plus)")
    backbone: str | None = Field(None, description="backbone (VainF: resnet50, resnet101 or mobilenetv2; "
                                                   "torchvision: read from the file when omitted)")
    num_classes: int = Field(ge=1, le=IGNORE_INDEX,  # masks are uint8 and 255 means ignore
                             description="classes the checkpoint predicts (checked against the file)")
    output_stride: Literal[8, 16] | None = Field(None, description="VainF: the one the model was trained at, "
                                                                   f"e.g. _os16 in its file name (default "
                                                                   f"{VAINF_DEFAULT_OUTPUT_STRIDE})")
    registered_model: str | None = Field(None, description="register a new version of this registered model")
    tracking_uri: str | None = Field(None, description="MLflow tracking/registry URI (default: "
                                                       f"$MLFLOW_TRACKING_URI or {DEFAULT_TRACKING_URI})")
    experiment: str = Field(DEFAULT_EXPERIMENT, description="MLflow experiment of the import run")
    pytorch_flavor: bool = Field(True, description="also log the registered model as a torch.export program "
                                                   "(mlflow.pytorch.load_model)")
    output: str | None = Field(None, description="also write the checkpoint directory (model.pt) here, any URI")
    eval_manifest: str | None = Field(None, description="manifest with masks: evaluate on it and tag the version's "
                                                        "val_mIoU and val_manifest (needs Ray)")
    storage_options: dict[str, Any] | None = None  # merged over the AWS_* env options


@dataclass(frozen=True)
class Importer:
    """One source kind: what it is, the converter call, the arguments its files fix (given ones
    must agree), those it needs, and the values the free ones may take."""

    what: str
    convert: Callable[[Mapping[str, Any], ImportWeightsConfig], nn.Module]
    fixed: Mapping[str, Any] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    choices: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)


IMPORTERS: dict[str, Importer] = {
    "torchvision": Importer(
        "torchvision deeplabv3_resnet50/101 state_dict (e.g. the COCO-with-VOC-labels weights)",
        lambda ckpt, cfg: from_torchvision(ckpt, backbone=cfg.backbone, num_classes=cfg.num_classes),
        fixed={"arch": "deeplabv3", "output_stride": 8},
        choices={"backbone": ("resnet50", "resnet101")},
    ),
    "vainf": Importer(
        "VainF/DeepLabV3Plus-Pytorch DeepLabV3 / V3+ checkpoint",
        lambda ckpt, cfg: from_vainf(ckpt, cfg.arch, cfg.backbone, cfg.num_classes,
                                     output_stride=cfg.output_stride or VAINF_DEFAULT_OUTPUT_STRIDE),
        required=("arch", "backbone"),
        choices={"arch": ("deeplabv3", "deeplabv3plus"), "backbone": ("resnet50", "resnet101", "mobilenetv2")},
    ),
    "kazuto": Importer(
        "kazuto1011/deeplab-pytorch DeepLabV2 ResNet-101 state_dict (the converted Caffe model)",
        lambda ckpt, cfg: from_kazuto(ckpt, cfg.num_classes),
        fixed={"arch": "deeplabv2", "backbone": "resnet101", "output_stride": 8},
    ),
}
# deeplab_core.loading.identify names the converter to use; which CLI kind that is.
_KIND_OF_CONVERTER = {"from_torchvision": "torchvision", "from_vainf": "vainf", "from_kazuto": "kazuto"}
# How the converters name a source passed as a mapping (we pass one: the file is read once, for the
# digest too); messages name the URI instead.
_MAPPING_ORIGIN = "the given mapping"


@dataclass(frozen=True)
class ImportResult:
    kind: str
    model_config: dict[str, Any]
    meta: dict[str, Any]
    metrics: dict[str, float]  # val_mIoU, ... (empty without an evaluation)
    output: str | None = None  # the checkpoint directory written with --output
    registered_model: str | None = None
    version: str | None = None
    run_id: str | None = None

    @property
    def model_uri(self) -> str | None:
        return None if self.version is None else f"models:/{self.registered_model}/{self.version}"

    def summary(self) -> dict[str, Any]:
        return {"model_uri": self.model_uri, "run_id": self.run_id, "output": self.output,
                "source": self.meta["source"], "arch": self.model_config["arch"],
                "backbone": self.model_config["backbone"], "num_classes": self.model_config["num_classes"],
                **self.metrics}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_arguments(cfg: ImportWeightsConfig) -> Importer:
    """The importer for `cfg.kind`, after refusing arguments that conflict with it or are missing."""
    importer = IMPORTERS[cfg.kind]
    for name, value in importer.fixed.items():
        given = getattr(cfg, name)
        if given is not None and given != value:
            fixed = ", ".join(f"{flag(k)} {v}" for k, v in importer.fixed.items())
            raise InputError(f"{flag(name)} {given} conflicts with a {cfg.kind} checkpoint: a {importer.what} is "
                             f"always {fixed}; omit {flag(name)}")
    for name in importer.required:
        if getattr(cfg, name) is None:
            raise InputError(f"a {cfg.kind} checkpoint needs {flag(name)} "
                             f"({' or '.join(map(str, importer.choices[name]))})")
    for name, allowed in importer.choices.items():
        given = getattr(cfg, name)
        if given is not None and given not in allowed:
            raise InputError(f"{flag(name)} {given} is not one a {cfg.kind} checkpoint can have; choose from "
                             f"{', '.join(map(str, allowed))}")
    if cfg.registered_model is None and cfg.output is None:
        raise InputError("nothing to do: give --register NAME (a new model version) and/or --output DIR")
    return importer


def shown_uri(uri: str) -> str:
    """`uri` fit for messages: no password (`scheme://user:pw@host`), no query string (presigned
    URLs carry their signature there)."""
    base, query, _ = uri.partition("?")
    return redact(base) + ("?***" if query else "")


def file_name(uri: str) -> str:
    """The last path segment only: what provenance records, never a host, key or signature."""
    return uri.partition("?")[0].rstrip("/").rsplit("/", 1)[-1]


def read_source(uri: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """The file's bytes (env + given storage options), or an InputError naming the redacted URI."""
    shown = shown_uri(uri)
    try:
        fs, path = get_fs(uri, storage_options)
        return fs.cat_file(path)
    except FileNotFoundError:
        raise InputError(f"cannot read {shown}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"cannot read {shown}: a directory; give the checkpoint file") from None
    except PermissionError:
        raise InputError(f"cannot read {shown}: access denied (check the credentials and endpoint in the "
                         f"AWS_* variables)") from None
    except Exception as err:  # noqa: BLE001 - any client error (no bucket, bad endpoint) as one line
        reason = scrub(f"{type(err).__name__}: {err}", resolve_storage_options(uri, storage_options))
        raise InputError(f"cannot read {shown}: {reason.replace(uri, shown)}") from None


def load_checkpoint(data: bytes, shown: str) -> Mapping[str, Any]:
    """`torch.load(weights_only=True)`: tensors and containers only, so a file can never run code."""
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):
            raise InputError(f"{shown} holds pickled Python objects (e.g. a whole nn.Module saved with "
                             f"torch.save(model)), which are never unpickled here; save model.state_dict() "
                             f"instead") from None
        raise InputError(f"{shown} is not a PyTorch checkpoint file (torch.load cannot read it)") from None
    except (RuntimeError, EOFError, ValueError) as err:  # not a zip / truncated
        raise InputError(f"{shown} is not a PyTorch checkpoint file ({str(err).splitlines()[0]})") from None
    if not isinstance(obj, Mapping):
        raise InputError(f"{shown} holds a {type(obj).__name__}, not a checkpoint mapping (a state_dict or a "
                         f"dict holding one)")
    return obj


def check_kind(checkpoint: Mapping[str, Any], kind: str, shown: str) -> None:
    """Refuse a file that is not `kind`'s, saying what it is and which importer reads it."""
    found = identify(checkpoint)
    if found is None:
        raise InputError(f"{shown} is not recognised as a checkpoint of torchvision, VainF or kazuto1011 "
                         f"(import_weights.py torchvision|vainf|kazuto) nor as a deeplab-ray model.pt. "
                         f"Found {describe(checkpoint)}")
    what, converter = found
    if what.startswith("deeplab-ray"):
        raise InputError(f"{shown} is already a deeplab-ray model checkpoint: no conversion needed (segment.py "
                         f"--model and load_model take it as is)")
    found_kind = next((k for name, k in _KIND_OF_CONVERTER.items() if name in converter), None)
    if found_kind is None:
        raise InputError(f"{shown} looks like a {what}, which no importer here reads ({converter})")
    if found_kind != kind:
        raise InputError(f"{shown} looks like a {what}, not a {IMPORTERS[kind].what}: import it with "
                         f"`import_weights.py {found_kind} ...`")


def convert(importer: Importer, checkpoint: Mapping[str, Any], cfg: ImportWeightsConfig, shown: str) -> nn.Module:
    try:
        model = importer.convert(checkpoint, cfg)
    except ValueError as err:  # unsupported variant, other classes / arch / backbone than asked
        message = str(err)
        named = message.removeprefix(_MAPPING_ORIGIN)
        raise InputError(f"{shown}{named}" if named != message else f"{shown}: {message}") from None
    return model.eval()


def checkpoint_meta(model: nn.Module, source: Mapping[str, str]) -> dict[str, Any]:
    """What the batch job and the pyfunc model read: the model's input normalisation (Caffe's for
    a kazuto model, ImageNet's otherwise), classes, and where the weights came from."""
    return {"mean": list(model.config["input_mean"]), "std": list(model.config["input_std"]),
            "num_classes": model.config["num_classes"], "source": dict(source)}


def write_output(model_file: Path, output: str, storage_options: Mapping[str, Any] | None) -> str:
    """Copy `model.pt` into the directory `output` (any URI); returns the directory URI."""
    target = join_uri(output, MODEL_FILE)
    fs, path = get_fs(target, storage_options)
    make_parent_dirs(fs, path, target)
    fs.put_file(str(model_file), path)
    return output


def evaluate(model_file: Path, manifest: str, storage_options: Mapping[str, Any] | None) -> dict[str, float]:
    """Plain single-scale inference on the manifest's masked rows, as training's validation and
    promotion measure it; `val_<metric>` keys."""
    # Ray, only when asked for.
    from pipelines.segmentation.evaluation import evaluate_model

    try:
        metrics = evaluate_model(str(model_file), manifest, storage_options=storage_options)
    except ValueError as err:  # a malformed manifest, no row with a mask
        raise InputError(f"--eval {shown_uri(manifest)}: {err}") from None
    return {f"val_{name}": float(metrics[name]) for name in EVAL_METRICS}


def _check_locations(cfg: ImportWeightsConfig) -> None:
    """Fail before the conversion (and a download) on an output or manifest that cannot be used."""
    try:
        if cfg.output is not None:
            check_access(cfg.output, cfg.storage_options)
        if cfg.eval_manifest is not None:
            check_access(cfg.eval_manifest, cfg.storage_options, must_exist=True)
    except StorageError as err:
        raise InputError(str(err)) from None


def _log(message: str) -> None:
    print(f"[import] {message}", file=sys.stderr, flush=True)


def import_weights(cfg: ImportWeightsConfig) -> ImportResult:
    """Convert `cfg.source` into our model file; with `cfg.output` write it there, with
    `cfg.eval_manifest` evaluate it, with `cfg.registered_model` register it as a new version (tags
    `source.kind`, `source.file`, `source.sha256`, `arch`, `backbone`, and `val_*` + `val_manifest`
    after an evaluation). Raises InputError for unusable arguments or files."""
    importer = check_arguments(cfg)
    _check_locations(cfg)
    shown = shown_uri(cfg.source)
    _log(f"reading {shown}")
    data = read_source(cfg.source, cfg.storage_options)
    checkpoint = load_checkpoint(data, shown)
    check_kind(checkpoint, cfg.kind, shown)
    model = convert(importer, checkpoint, cfg, shown)
    source = {"kind": cfg.kind, "file": file_name(cfg.source), "sha256": hashlib.sha256(data).hexdigest()}
    meta = checkpoint_meta(model, source)
    config = model.config
    _log(f"converted {source['file']} into {config['arch']} {config['backbone']}, {config['num_classes']} classes, "
         f"output stride {config['output_stride']}")
    metrics: dict[str, float] = {}
    output = version = run_id = None
    manifest = absolute_uri(cfg.eval_manifest) if cfg.eval_manifest else None
    with tempfile.TemporaryDirectory(prefix="import-weights-") as tmp:
        model_file = save_checkpoint_dir(model, tmp, meta) / MODEL_FILE
        if manifest is not None:  # first: a manifest it cannot be scored on leaves nothing written
            _log(f"evaluating on {shown_uri(manifest)}")
            metrics = evaluate(model_file, manifest, cfg.storage_options)
            _log(f"val mIoU {metrics['val_mIoU']:.4f}")
        if cfg.output is not None:
            output = write_output(model_file, cfg.output, cfg.storage_options)
            _log(f"wrote {shown_uri(join_uri(output, MODEL_FILE))}")
        if cfg.registered_model is not None:
            run_id, version = _register(cfg, model_file, model.config, source, metrics, manifest)
            _log(f"registered {cfg.registered_model} version {version} (run {run_id})")
    return ImportResult(cfg.kind, dict(model.config), meta, metrics, output, cfg.registered_model, version, run_id)


def _register(cfg: ImportWeightsConfig, model_file: Path, config: Mapping[str, Any], source: Mapping[str, str],
              metrics: Mapping[str, float], manifest: str | None) -> tuple[str, str]:
    from pipelines import tracking

    tags = {f"source.{k}": v for k, v in source.items()}
    tags.update(arch=config["arch"], backbone=str(config["backbone"]))
    if manifest is not None:  # informative: promotion measures on the operator's manifest itself
        tags.update({k: f"{v:.6f}" for k, v in metrics.items()}, val_manifest=manifest)
    tracking_uri = resolve_tracking_uri(cfg.tracking_uri)
    return tracking.register_imported_model(
        tracking_uri, cfg.experiment, f"import-{source['file']}", model_file, cfg.registered_model,
        params={"source": source, "model": dict(config)}, tags=tags, metrics=metrics,
        pytorch_flavor=cfg.pytorch_flavor,
    )
