"""MLflow models: logging a checkpoint as an MLflow model (pyfunc + PyTorch flavours),
registering it as a version, and loading a model from any URI (registry or checkpoint).
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

from pipelines.common.uris import WEIGHTS_TAG, is_registry_uri
from pipelines.common.console import is_verbose
from pipelines.tracking.registry import REFERENCE_MANIFEST_TAG, downloaded_model, registered_weights_sha256
from pipelines.tracking.runs import _experiment_id, _log_params_and_metrics

MODEL_ARTIFACT = "model"


_REPO_ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- models


def _image_signature():
    """uint8 N x H x W x 3 RGB images in, uint8 N x H x W class indices out (any size)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3), "images")]),
                          outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1), "labels")]))


def registered_version_of_run(tracking_uri: str, name: str, run_id: str, iteration: str) -> str | None:
    """The version of `name` already registered from `run_id` at `iteration` (re-runs are idempotent)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    for version in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        if version.tags.get("iteration") == iteration:
            return str(version.version)
    return None


# The pytorch flavour's files inside the model directory (beside the pyfunc's code/ and artifacts/).


TORCH_EXPORT_DIR = "torch_export"
# torch.export traces one example batch; height and width stay dynamic (Dim.AUTO), and a batch
# of 2 keeps the batch dimension dynamic too (MLflow exports size-1 dimensions as static).
_EXPORT_EXAMPLE_SHAPE = (2, 3, 64, 80)


def _tensor_signature(num_classes: int):
    """Normalised float N x 3 x H x W in, N x C x H x W logits out: what the exported module takes."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1), "images")]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes, -1, -1), "out")]))


def _save_pyfunc_and_pytorch(path: str, mlflow_model, *, torch_model=None, **pyfunc_kwargs) -> None:
    """`save_model` of the flavour `log_checkpoint_model` logs: the pyfunc model from code and, in
    the same MLmodel, a `pytorch` flavour holding a torch.export program (pt2: graph and weights,
    no pickled Python objects), so `mlflow.pytorch.load_model(uri)` works on the same URI."""
    import shutil

    import mlflow
    import numpy as np
    from mlflow.models import Model

    mlflow.pyfunc.save_model(path, mlflow_model=mlflow_model, **pyfunc_kwargs)
    if torch_model is None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        exported = Path(tmp) / "pytorch"
        example = np.random.default_rng(0).standard_normal(_EXPORT_EXAMPLE_SHAPE).astype(np.float32)
        try:
            mlflow.pytorch.save_model(torch_model.eval(), str(exported), serialization_format="pt2",
                                      signature=_tensor_signature(torch_model.config["num_classes"]),
                                      input_example=example, pip_requirements=["torch"])
            _check_export_generalises(mlflow.pytorch.load_model(str(exported)), torch_model)
        except Exception as err:  # noqa: BLE001 - the pyfunc model is complete without it
            log.warning("model logged without its PyTorch flavour: torch.export of %s/%s failed or does not "
                        "take other input sizes (%s: %s)", torch_model.config["arch"], torch_model.config["backbone"],
                        type(err).__name__, str(err).splitlines()[0][:200])
            return
        flavor = Model.load(str(exported)).flavors["pytorch"]
        shutil.copytree(exported / flavor["model_data"], Path(path) / TORCH_EXPORT_DIR)
    mlflow_model.add_flavor("pytorch", **{**flavor, "model_data": TORCH_EXPORT_DIR})
    mlflow_model.save(str(Path(path) / "MLmodel"))


def _check_export_generalises(exported, model) -> None:
    """Raises unless the exported program matches the model at a batch and image size other than
    the traced example's: a program specialised to one size (e.g. DeepLabv2's multi-scale inputs,
    sized with Python ints) must not be shipped as if it took any size."""
    import torch

    x = torch.randn(3, 3, _EXPORT_EXAMPLE_SHAPE[2] - 7, _EXPORT_EXAMPLE_SHAPE[3] - 9)
    with torch.no_grad():
        if not torch.allclose(exported(x), model(x), atol=1e-4, rtol=1e-4):
            raise ValueError("exported program disagrees with the model at another input size")


_PYFUNC_AND_PYTORCH = SimpleNamespace(__name__="pyfunc+pytorch", save_model=_save_pyfunc_and_pytorch)


def log_checkpoint_model(tracking_uri: str, run_id: str, model_file: Path, registered_model: str | None,
                         tags: Mapping[str, Any], best_metrics: Mapping[str, float],
                         pytorch_flavor: bool = True) -> str | None:
    """Into run `run_id`: the checkpoint file as `best_checkpoint/`, `best_*` metrics, and the model
    as an MLflow pyfunc "model from code" (no pickle; weights load with weights_only=True), with
    `pytorch_flavor` also as a torch.export program that `mlflow.pytorch.load_model` returns as an
    `nn.Module` (normalised N x 3 x H x W float input, any size; output the N x C x H x W logits).
    With `registered_model`, registers it as a new version tagged with `tags`; returns the version."""
    import mlflow
    from mlflow.models import Model

    from pipelines.data.checkpoints import model_from_checkpoint_file, normalisation_of

    mlflow.set_tracking_uri(tracking_uri)
    weights_sha256 = file_sha256(model_file)
    model, meta = model_from_checkpoint_file(str(model_file))
    torch_model = model if pytorch_flavor else None
    mean, std = normalisation_of(meta, model)
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        # The signature is given; an input example would make MLflow load and run the model here.
        warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
        mlflow.log_artifact(str(model_file), "best_checkpoint")
        mlflow.log_metrics({f"best_{k}": v for k, v in best_metrics.items()})
        info = Model.log(
            artifact_path=None,  # deprecated in favour of name, but positional
            name=MODEL_ARTIFACT,
            flavor=_PYFUNC_AND_PYTORCH,
            torch_model=torch_model,
            signature=_image_signature(),
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            artifacts={"checkpoint": str(model_file)},
            model_config={WEIGHTS_TAG: weights_sha256},  # the pyfunc checks its checkpoint on load
            # The PyTorch flavour takes normalised input: what to normalise with is in the MLmodel.
            metadata={"input_mean": list(mean), "input_std": list(std),
                      "pytorch_input": "float32 N x 3 x H x W RGB, (pixel / 255 - input_mean) / input_std",
                      "pytorch_output": "float32 N x C x H x W logits",
                      "num_classes": int(model.config["num_classes"])},
            code_paths=[str(_REPO_ROOT / "deeplab_core"), str(_REPO_ROOT / "pipelines")],
            pip_requirements=["torch", "torchvision", "numpy", "pillow", "opencv-python-headless"],
        )
    if registered_model is None:
        return None
    client = mlflow.MlflowClient(tracking_uri)
    all_tags = {**{key: str(value) for key, value in tags.items()}, WEIGHTS_TAG: weights_sha256}
    version = _register(client, info, registered_model, run_id, all_tags)
    return str(version.version)


def file_sha256(path: str | Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _register(client, info, name: str, run_id: str, tags: Mapping[str, str]):
    """A new version of `name` from the logged model `info`. What `mlflow.register_model` does
    for a `models:/<model_id>` URI, without its unconditional stderr lines ("Successfully
    registered model", "Created version"): the job prints its own. `--verbose` keeps MLflow's."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        # The first version names the registered model's reference set, which promote.py compares
        # on unless given --val-manifest; later versions never change it (a candidate must not
        # choose what it is judged on).
        reference = {REFERENCE_MANIFEST_TAG: tags[REFERENCE_MANIFEST_TAG]} if tags.get(REFERENCE_MANIFEST_TAG) else {}
        client.create_registered_model(name, tags=reference)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    if is_verbose():
        return mlflow.register_model(info.model_uri, name, tags=dict(tags))
    # Tags at creation: a version never exists without its weights' digest.
    version = client.create_model_version(name, source=info.model_uri, run_id=run_id, model_id=info.model_id,
                                          tags=dict(tags))
    # The logged model's page lists its versions from this tag (else "Not registered"), as
    # mlflow.register_model sets it.
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    if info.model_id:
        existing = json.loads(client.get_logged_model(info.model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
        client.set_logged_model_tags(info.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(
            [*existing, {"name": version.name, "version": version.version}])})
    return version


# --------------------------------------------------------------------------- imported weights


def register_imported_model(tracking_uri: str, experiment: str, run_name: str, model_file: Path,
                            registered_model: str, params: Mapping[str, Any], tags: Mapping[str, Any],
                            metrics: Mapping[str, float], pytorch_flavor: bool = True) -> tuple[str, str]:
    """A finished run in `experiment` for a checkpoint converted from another program: `params`
    (flattened, redacted), `metrics`, and the model logged as in training (`log_checkpoint_model`),
    registered as a new version of `registered_model` tagged with `tags`. Returns (run_id, version)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    run_id = client.create_run(_experiment_id(client, experiment), run_name=run_name).info.run_id
    try:
        _log_params_and_metrics(client, run_id, params, metrics)
        version = log_checkpoint_model(tracking_uri, run_id, model_file, registered_model, tags, {}, pytorch_flavor)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id, version


def load_model(uri: str, map_location: str | torch.device = "cpu",
               storage_options: dict | None = None) -> tuple[nn.Module, dict]:
    """Load a model in eval mode from any of:

    `models:/name@alias`, `models:/name/version`, `runs:/<run_id>/model` (MLflow, using the
    current tracking URI), a checkpoint directory or a `model.pt` file on any fsspec URI.
    A registered version's weights must match its `weights.sha256` tag (WeightsMismatch).
    """
    from pipelines.data.checkpoints import checkpoint_file_in, load_checkpoint, model_from_checkpoint_file

    if is_registry_uri(uri):
        expected = registered_weights_sha256(uri)
        with downloaded_model(uri) as local:
            return model_from_checkpoint_file(checkpoint_file_in(local), map_location, expected_sha256=expected,
                                              what=uri)
    return load_checkpoint(uri, map_location, storage_options)
