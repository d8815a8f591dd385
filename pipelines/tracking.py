"""Every MLflow call of the training and segmentation jobs: runs, params, metrics, artifacts,
model logging and registration, and model URIs. (Promotion's registry reads and writes live in
pipelines/promotion/registry.py.)

mlflow is imported inside the functions: importing this module stays cheap for Ray workers and
for `--help`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlparse

from pipelines.common.config import flatten
from pipelines.common.errors import InputError
from pipelines.common.console import is_verbose
from pipelines.data.storage import is_local, redact, redact_urls

MODEL_ARTIFACT = "model"
# Version tag: sha256 of the version's model.pt, set when it is registered. Every load compares
# it with the bytes it read, so weights replaced in the artifact store are refused.
MODEL_FILE = "model.pt"  # a checkpoint folder's weights, also the logged model's artifact
REFERENCE_MANIFEST_TAG = "val_manifest"  # on a version: what it was measured on; on the model: the reference
WEIGHTS_TAG = "weights.sha256"
REGISTRY_SCHEMES = ("models:/", "runs:/")
_PARAM_MAX_CHARS = 6000  # MLflow's limit for a param value
_REPO_ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger(__name__)


def is_registry_uri(uri: str) -> bool:
    return uri.startswith(REGISTRY_SCHEMES)


@contextmanager
def tracking_uri_set(uri: str | None) -> Iterator[None]:
    """MLflow's tracking URI set to `uri` for the block (registry URIs resolve against it), and
    the caller's restored afterwards. `None` leaves it alone."""
    if uri is None:
        yield
        return
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def fail_fast_http() -> None:
    """MLflow's HTTP client retries for minutes by default; the jobs would rather fail in seconds
    (the caller's own MLFLOW_HTTP_REQUEST_* settings win)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def check_reachable(tracking_uri: str, timeout_s: float = 10.0, must_exist: bool = False) -> None:
    """Raises one InputError unless the tracking store can be used: an HTTP server that answers
    its /health endpoint within `timeout_s`, or a sqlite file whose folder exists (and, with
    `must_exist`, the file: MLflow would silently create an empty database for a mistyped path).
    Checked before a job does any work, so an unreachable server cannot fail it at the very end."""
    fail_fast_http()
    shown = redact_urls(tracking_uri)
    parsed = urlparse(tracking_uri)
    if parsed.scheme in ("http", "https"):
        netloc = parsed.netloc.rsplit("@", 1)[-1]  # the health probe needs no credentials
        url = f"{parsed.scheme}://{netloc}{parsed.path.rstrip('/')}/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - the user's server
                if response.status == 200:
                    return
                reason = f"HTTP {response.status}"
        except (OSError, ValueError) as err:
            reason = str(getattr(err, "reason", err)) or type(err).__name__
        raise InputError(f"MLflow tracking server {shown} is unreachable ({reason}); start it, or point "
                         "the tracking URI elsewhere")
    if parsed.scheme == "sqlite":
        folder = Path(tracking_uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise InputError(f"MLflow database {shown}: folder {folder} does not exist")
        if must_exist and not Path(tracking_uri[len("sqlite:///"):]).is_file():
            raise InputError(f"no MLflow database at {shown} (set --tracking-uri or MLFLOW_TRACKING_URI)")


def _log_params_and_metrics(client, run_id: str, params: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
    """`params` (flattened, redacted) and step-0 `metrics` in as few requests as MLflow allows
    (100 params per batch)."""
    from mlflow.entities import Metric, Param

    items = [Param(k, v) for k, v in _param_strings(params).items()]
    now = int(time.time() * 1000)
    for start in range(0, max(len(items), 1), 100):
        batch_metrics = [Metric(k, float(v), now, 0) for k, v in metrics.items()] if start == 0 else []
        if items[start:start + 100] or batch_metrics:
            client.log_batch(run_id, metrics=batch_metrics, params=items[start:start + 100], synchronous=True)


def _experiment_id(client, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


def _param_strings(params: Mapping[str, Any]) -> dict[str, str]:
    return {key: str(value)[:_PARAM_MAX_CHARS] for key, value in flatten(redact(dict(params))).items()}


# --------------------------------------------------------------------------- training runs


def find_or_create_run(tracking_uri: str, experiment: str, run_name: str, identity: Mapping[str, str],
                       params: Mapping[str, Any]) -> tuple[str, bool]:
    """The run tagged with `identity` in `experiment` (newest first), else a new one with those
    tags and `params` (flattened, secrets redacted). Returns (run_id, resumed)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    experiment_id = _experiment_id(client, experiment)
    condition = " and ".join(f"tags.`{key}` = '{value}'" for key, value in identity.items())
    existing = client.search_runs([experiment_id], filter_string=condition, max_results=1,
                                  order_by=["attributes.start_time DESC"])
    if existing:
        return existing[0].info.run_id, True
    from mlflow.tracking.context.registry import resolve_tags

    # resolve_tags adds what mlflow.start_run records: source file, git commit, user.
    run = client.create_run(experiment_id, run_name=run_name, tags=resolve_tags(dict(identity)))
    _log_params_and_metrics(client, run.info.run_id, params, {})
    return run.info.run_id, False


def log_dataset_inputs(tracking_uri: str, run_id: str, manifests: Mapping[str, str]) -> None:
    """The run's manifests as MLflow dataset inputs (`{context: uri}`, e.g. training/validation),
    so the run page lists what it trained and validated on. Recorded by reference: the source URI
    (password redacted) and a digest of it, never the rows."""
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    inputs = []
    for context, uri in manifests.items():
        dataset = MetaDataset(_dataset_source(redact_urls(uri)), name=f"{context} manifest")
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)]))
    mlflow.MlflowClient(tracking_uri).log_inputs(run_id, datasets=inputs)


def _dataset_source(uri: str):
    """The MLflow dataset source of a manifest URI. A local path is named as MLflow's "local"
    source outright: resolving it warns that it "can be interpreted in multiple ways" (MLflow
    registers one identical local source class for each of the schemes "" and "file")."""
    import json

    from mlflow.data.dataset_source_registry import get_dataset_source_from_json, resolve_dataset_source

    if is_local(uri):
        return get_dataset_source_from_json(json.dumps({"uri": uri}), source_type="local")
    return resolve_dataset_source(uri)


def finish_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    import mlflow

    mlflow.MlflowClient(tracking_uri).set_terminated(run_id, status)


class RunLogger:
    """Metrics and artifacts into an existing run (the training workers' rank 0); a no-op when
    disabled, so callers need no `if rank == 0` around every call."""

    def __init__(self, enabled: bool, tracking_uri: str | None, run_id: str | None) -> None:
        self.enabled = enabled and run_id is not None
        if self.enabled:
            import mlflow

            self._client = mlflow.MlflowClient(tracking_uri)
            self._run_id = run_id
        self._logged_through: dict[str, int] | None = None  # after resume(): key -> last step in the run

    def resume(self) -> None:
        """After a restart from a checkpoint: steps a metric's history already has are not logged
        again (the iterations redone since the checkpoint logged them the first time), so every
        history keeps one value per step."""
        self._logged_through = {}

    def _new_step(self, key: str, step: int) -> bool:
        if self._logged_through is None:
            return True
        if key not in self._logged_through:
            history = self._client.get_metric_history(self._run_id, key)
            self._logged_through[key] = max((m.step for m in history), default=-1)
        return step > self._logged_through[key]

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        if self.enabled:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [Metric(k, float(v), now, step) for k, v in values.items() if self._new_step(k, step)]
            if not batch:
                return
            self._client.log_batch(self._run_id, metrics=batch, synchronous=True)

    def artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self._client.log_artifact(self._run_id, str(path), artifact_path)


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

    from pipelines.common.checkpoints import model_from_checkpoint_file

    mlflow.set_tracking_uri(tracking_uri)
    from pipelines.segmentation.stages import normalisation_of

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
            python_model=str(_REPO_ROOT / "pipelines" / "common" / "pyfunc_model.py"),
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


def registered_weights_sha256(model_uri: str, client=None) -> str | None:
    """The `weights.sha256` tag of the registered version a `models:/name/<version>` or
    `models:/name@alias` URI names (current tracking URI, or `client`'s); None for other URIs
    (`runs:/`, paths: not registered). Raises InputError for a version without the tag."""
    match = re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@([^/]+))", model_uri)
    if match is None:
        return None
    import mlflow

    client = client or mlflow.MlflowClient()
    name, number, alias = match.groups()
    version = (client.get_model_version(name, number) if number
               else client.get_model_version_by_alias(name, alias))
    expected = (version.tags or {}).get(WEIGHTS_TAG)
    if not expected:
        raise InputError(f"version {version.version} of {name!r} has no {WEIGHTS_TAG} tag (registered before "
                         "weight checks): check its model.pt and tag it (docs/operations.md, weight integrity)")
    return expected


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


@contextmanager
def downloaded_model(uri: str) -> Iterator[str]:
    """A local directory holding the artifacts of a `models:/` or `runs:/` URI (current tracking
    URI), removed after the block."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        yield mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)


def resolve_model_uri(uri: str) -> str:
    """`models:/name@alias` -> `models:/name/<version>`, so every worker loads the same version
    even if the alias moves during a run. Other URIs are returned unchanged."""
    match = re.fullmatch(r"models:/([^/@]+)@([^/]+)", uri)
    if match is None:
        return uri
    import mlflow

    version = mlflow.MlflowClient().get_model_version_by_alias(match.group(1), match.group(2))
    return f"models:/{match.group(1)}/{version.version}"


# --------------------------------------------------------------------------- one-shot runs


def log_finished_run(experiment: str, run_name: str, params: Mapping[str, Any],
                     metrics: Mapping[str, float], texts: Mapping[str, str] | None = None,
                     dicts: Mapping[str, Any] | None = None, started_at: float | None = None) -> str:
    """A complete run in `experiment` (current tracking URI): params (redacted), metrics and small
    text/JSON artifacts; `started_at` (epoch seconds) is its start, so it spans the job it
    records. Returns its id."""
    import mlflow

    client = mlflow.MlflowClient()
    start_ms = int(started_at * 1000) if started_at is not None else None
    created = client.create_run(_experiment_id(client, experiment), start_time=start_ms, run_name=run_name)
    with mlflow.start_run(run_id=created.info.run_id) as run:
        mlflow.log_params(_param_strings(params))
        mlflow.log_metrics(dict(metrics))
        for name, text in (texts or {}).items():
            mlflow.log_text(text, name)
        for name, value in (dicts or {}).items():
            mlflow.log_dict(value, name)
        return run.info.run_id


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


# --------------------------------------------------------------------------- CRF tuning


def _version_of(model_uri: str) -> tuple[str, str]:
    """`models:/name/<version>` -> (name, version); aliases must be resolved first."""
    match = re.fullmatch(r"models:/([^/@]+)/(\d+)", model_uri)
    if match is None:
        raise ValueError(f"expected models:/<name>/<version>, got {model_uri!r}")
    return match.group(1), match.group(2)


def logged_model_id(version) -> str | None:
    """The logged model a registered version was made from: its `model_id`, or (stores that do
    not keep it, e.g. sqlite) the id in its `models:/m-...` source."""
    source = version.source or ""
    return version.model_id or (source.removeprefix("models:/") if source.startswith("models:/m-") else None)


def log_model_input(run_id: str, model_uri: str) -> None:
    """The registered version `models:/name/<version>` a run used, as the run's model input (the
    run page links the model). Versions registered without a logged model are left out."""
    import mlflow
    from mlflow.entities import LoggedModelInput

    name, version = _version_of(model_uri)
    client = mlflow.MlflowClient()
    model_id = logged_model_id(client.get_model_version(name, version))
    if model_id:
        client.log_inputs(run_id, models=[LoggedModelInput(model_id)])


def model_version_tags(model_uri: str) -> dict[str, str]:
    """The tags of the registered version `models:/name/<version>` (current tracking URI)."""
    import mlflow

    name, version = _version_of(model_uri)
    return dict(mlflow.MlflowClient().get_model_version(name, version).tags or {})


def set_model_version_tags(model_uri: str, tags: Mapping[str, str]) -> None:
    """Tags on the registered version `models:/name/<version>` (current tracking URI)."""
    import mlflow

    name, version = _version_of(model_uri)
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


def log_tuning_run(experiment: str, run_name: str, params: Mapping[str, Any], metrics: Mapping[str, float],
                   trials: list[dict[str, Any]], table: str) -> str:
    """A finished tuning run: params, the best/default scores as metrics, every trial as
    `trials.json` and a Markdown `trials.md` table. Returns its id."""
    return log_finished_run(experiment, run_name, params, metrics, texts={"trials.md": table},
                            dicts={"trials.json": {"trials": trials}})
