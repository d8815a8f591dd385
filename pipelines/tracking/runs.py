"""MLflow runs: the tracking URI, reachability, training runs (find or create, log, finish),
one-shot runs (segmentation, CRF tuning).

mlflow is imported inside the functions: importing this module stays cheap for Ray workers and
for `--help`.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipelines.common.config import flatten
from pipelines.common.errors import InputError
from pipelines.common.redaction import redact, redact_urls
from pipelines.common.uris import is_local

_PARAM_MAX_CHARS = 6000  # MLflow's limit for a param value


log = logging.getLogger(__name__)


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


def log_tuning_run(experiment: str, run_name: str, params: Mapping[str, Any], metrics: Mapping[str, float],
                   trials: list[dict[str, Any]], table: str) -> str:
    """A finished tuning run: params, the best/default scores as metrics, every trial as
    `trials.json` and a Markdown `trials.md` table. Returns its id."""
    return log_finished_run(experiment, run_name, params, metrics, texts={"trials.md": table},
                            dicts={"trials.json": {"trials": trials}})
