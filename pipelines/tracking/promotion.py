"""Registry access for promotion (pipelines/promotion holds the rule, this module its MLflow calls): versions, aliases and tags through an MlflowClient, metrics on
a common validation manifest, the promotion lock, and MLflow errors as one-line PromotionErrors.

Race safety: MLflow has no compare-and-set for aliases, so the read-compare-set step runs under a
lock that the registry itself makes atomic: creating a registered model whose name already exists
fails on the server's unique constraint. The lock is the (empty) registered model
`<name>.promotion-lock`, deleted on release, and broken when older than `stale_after_s` (a killed
promoter).
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

from pipelines.common.redaction import redact_urls
from pipelines.tracking.registry import REFERENCE_MANIFEST_TAG, registry_hint
from pipelines.common.errors import EXIT_FAILED, EXIT_UNRELIABLE, EXIT_USAGE, JobExit

if TYPE_CHECKING:  # mlflow is imported lazily: `--help` and usage errors stay fast
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

TAG_PREFIX = "promotion."  # every tag promotion writes on a version
MANIFEST_TAG = REFERENCE_MANIFEST_TAG  # the registered model's tag set by its first version (models.py)
LOCK_SUFFIX = ".promotion-lock"

# (model_uri, manifest_uri) -> metrics dict, e.g. {"mIoU": 0.71, ...}
Evaluator = Callable[[str, str], Mapping[str, float]]


class PromotionError(JobExit):
    """A failure the CLI reports in one line; `exit_code` says which kind."""

    exit_code = EXIT_FAILED


class UsageError(PromotionError):
    """Unknown model or version, bad arguments, nothing to compare on."""

    exit_code = EXIT_USAGE


class RegistryUnreachable(PromotionError):
    exit_code = EXIT_FAILED


class UnreliableEvaluation(PromotionError):
    """Too many rows of the validation manifest failed: the metric says little; nothing moves."""

    exit_code = EXIT_UNRELIABLE


def _mlflow_error_code(exc: BaseException) -> str | None:
    return getattr(exc, "error_code", None)


def _is_connection_failure(exc: BaseException) -> bool:
    """MLflow wraps requests' connection errors in a generic MlflowException; look underneath."""
    import requests

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextmanager
def registry_errors(tracking_uri: str) -> Iterator[None]:
    """Turn MLflow's exceptions into PromotionError subclasses with one readable line."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        if _is_connection_failure(exc):
            raise RegistryUnreachable(f"cannot reach the MLflow registry at {tracking_uri}") from exc
        if _mlflow_error_code(exc) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise UsageError(exc.message) from exc
        raise PromotionError(f"MLflow error: {exc.message}") from exc


def alias_target(client: "MlflowClient", name: str, alias: str) -> str | None:
    """The version number `alias` points to, or None."""
    version = (client.get_registered_model(name).aliases or {}).get(alias)
    return None if version is None else str(version)


def champion_version(client: "MlflowClient", name: str, alias: str) -> "ModelVersion | None":
    version = alias_target(client, name, alias)
    return None if version is None else client.get_model_version(name, version)


def resolve_candidate(client: "MlflowClient", name: str, candidate: str) -> "ModelVersion":
    """`candidate` is a version number or `latest` (the highest version number)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if _mlflow_error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
            raise UsageError(f"registered model {name!r} does not exist"
                             f"{registry_hint(f'models:/{name}', client)}") from exc
        raise
    if candidate == "latest":
        found = client.search_model_versions(f"name = '{name}'", max_results=1,
                                             order_by=["version_number DESC"])
        if not found:
            raise UsageError(f"registered model {name!r} has no versions")
        return client.get_model_version(name, found[0].version)
    if not candidate.isdigit() or int(candidate) < 1:
        raise UsageError(f"candidate must be a version number or 'latest', got {candidate!r}")
    try:
        return client.get_model_version(name, candidate)
    except MlflowException as exc:
        if _mlflow_error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
            raise UsageError(f"registered model {name!r} has no version {candidate}"
                             f"{registry_hint(f'models:/{name}', client)}") from exc
        raise


def _manifest_key(manifest: str) -> str:
    return hashlib.sha1(manifest.encode()).hexdigest()[:10]


def evaluation_tags(metric: str, manifest: str) -> tuple[str, str]:
    """Tag keys of a metric measured by promotion on `manifest` (MLflow tag keys cannot hold a
    URI, so the manifest is named by a digest and stored beside the value)."""
    prefix = f"{TAG_PREFIX}eval.{_manifest_key(manifest)}"
    return f"{prefix}.{metric}", f"{prefix}.manifest"


def error_share_tag(manifest: str) -> str:
    """Tag key of the share of rows that failed in promotion's evaluation on `manifest`."""
    return f"{TAG_PREFIX}eval.{_manifest_key(manifest)}.error_share"


def _as_metric(value: str, what: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise PromotionError(f"{what} is not a number: {value!r}") from None
    if not math.isfinite(number):
        raise PromotionError(f"{what} is not finite: {value!r}")
    return number


def recorded_metric(version: "ModelVersion", metric: str, manifest: str) -> tuple[float, float] | None:
    """(value, error share) of the version's metric on `manifest` if promotion measured it there
    before, else None. The training job's own `val_mIoU` tag is not used: it was measured on a
    manifest the training run chose, and says nothing of how many rows failed."""
    tags = version.tags or {}
    value_key, manifest_key = evaluation_tags(metric, manifest)
    if value_key not in tags or tags.get(manifest_key) != redact_urls(manifest) or error_share_tag(manifest) not in tags:
        return None
    return (_as_metric(tags[value_key], f"version {version.version} tag {value_key}"),
            _as_metric(tags[error_share_tag(manifest)], f"version {version.version} tag {error_share_tag(manifest)}"))


def _evaluated_value(metrics: Mapping[str, float], metric: str) -> float:
    """`val_mIoU` is reported by the evaluator as `mIoU`."""
    for key in (metric, metric.removeprefix("val_")):
        if key in metrics:
            return _as_metric(str(metrics[key]), f"evaluated {key}")
    raise PromotionError(f"the evaluation returned no {metric!r} (keys: {sorted(metrics)})")


def _error_share(metrics: Mapping[str, float]) -> float:
    """Failed rows / all rows of an evaluation (`num_errors`, `num_images`; 0 if not reported)."""
    errors, scored = float(metrics.get("num_errors", 0)), float(metrics.get("num_images", 0))
    return errors / (errors + scored) if errors + scored else 0.0


def _check_error_share(version: "ModelVersion", manifest: str, share: float, limit: float) -> None:
    if share > limit:
        raise UnreliableEvaluation(f"evaluation of version {version.version} on {manifest}: {share:.1%} of the "
                                   f"rows failed (limit {limit:.1%}); not promoting on it (see the errors, "
                                   "or raise --max-error-share)")


def metric_on_manifest(client: "MlflowClient", version: "ModelVersion", metric: str,
                       manifest: str, evaluate: Evaluator, record: bool, max_error_share: float) -> float:
    """The version's metric on `manifest`: from promotion's earlier evaluation there (tags), else
    evaluated now (and recorded as tags unless `record` is False). Raises UnreliableEvaluation
    when more than `max_error_share` of the rows failed."""
    recorded = recorded_metric(version, metric, manifest)
    if recorded is not None:
        value, share = recorded
    else:
        metrics = evaluate(f"models:/{version.name}/{version.version}", manifest)
        value, share = _evaluated_value(metrics, metric), _error_share(metrics)
        if record:
            value_key, manifest_key = evaluation_tags(metric, manifest)
            for key, text in {value_key: repr(value), manifest_key: redact_urls(manifest),
                              error_share_tag(manifest): repr(share)}.items():
                client.set_model_version_tag(version.name, version.version, key, text)
    _check_error_share(version, manifest, share, max_error_share)
    return value


def reference_manifest(client: "MlflowClient", name: str, explicit: str | None) -> str:
    """The manifest both versions are compared on, chosen by the operator: --val-manifest, else
    the registered model's own `val_manifest` tag. Never a version's tag: the candidate must not
    choose what it is judged on."""
    if explicit:
        return explicit
    manifest = (client.get_registered_model(name).tags or {}).get(MANIFEST_TAG)
    if not manifest:
        raise UsageError(f"no validation manifest to compare on: pass --val-manifest, or set the tag "
                         f"{MANIFEST_TAG!r} on the registered model {name!r} (not on a version)")
    return manifest


def _lock_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@contextmanager
def promotion_lock(client: "MlflowClient", name: str, timeout_s: float = 120.0,
                   stale_after_s: float = 600.0, poll_s: float = 0.2) -> Iterator[str]:
    """Hold `<name>.promotion-lock` (an empty registered model) for the read-compare-set step."""
    from mlflow.exceptions import MlflowException

    lock_name = name + LOCK_SUFFIX
    owner = _lock_owner()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.create_registered_model(
                lock_name, tags={"owner": owner},
                description=f"Held while promoting {name!r}; delete it only if stuck.")
            break
        except MlflowException as exc:
            # RESOURCE_DOES_NOT_EXIST: the server found the name taken, then could not read the lock
            # back for its error message because its holder had just renamed it aside (released).
            if _mlflow_error_code(exc) not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        _break_if_stale(client, lock_name, stale_after_s)
        if time.monotonic() > deadline:
            raise PromotionError(f"timed out after {timeout_s:.0f}s waiting for the lock "
                                 f"{lock_name!r} (another promotion is running)")
        time.sleep(poll_s * (0.5 + (uuid.uuid4().int % 100) / 100))  # jitter: no lock-step retries
    try:
        yield lock_name
    finally:
        _release(client, lock_name, owner)


def _break_if_stale(client: "MlflowClient", lock_name: str, stale_after_s: float) -> None:
    from mlflow.exceptions import MlflowException

    try:
        lock = client.get_registered_model(lock_name)
    except MlflowException as exc:
        if _mlflow_error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
            return  # released meanwhile
        raise
    age_s = time.time() - lock.creation_timestamp / 1000
    if age_s > stale_after_s:
        owner = (lock.tags or {}).get("owner")
        print(f"promote: breaking stale lock {lock_name!r} held by {owner} for {age_s:.0f}s", file=sys.stderr)
        _release(client, lock_name, owner)


def _exists(client: "MlflowClient", name: str) -> bool:
    return bool(client.search_registered_models(f"name = '{name}'"))


def _release(client: "MlflowClient", lock_name: str, owner: str | None) -> None:
    """Compare-and-delete: delete the lock only if it still is the one `owner` holds. MLflow has no
    conditional delete, so the lock is first renamed aside (atomic: one renamer wins), its owner
    checked there, and a lock that turns out to be someone else's fresh one is put back. A plain
    read-then-delete could delete a lock created between the two calls."""
    from mlflow.exceptions import MlflowException

    aside = f"{lock_name}.releasing-{uuid.uuid4().hex[:8]}"
    try:
        client.rename_registered_model(lock_name, aside)
    except MlflowException:
        # Under load a rename may go through and its retried request then find no lock: go by
        # what the registry holds now, not by the error.
        if not _exists(client, aside):
            if not _exists(client, lock_name):
                return  # released or broken by someone else already
            raise
    if (client.get_registered_model(aside).tags or {}).get("owner") == owner:
        client.delete_registered_model(aside)
        return
    try:  # not the lock we meant: give it back to its holder
        client.rename_registered_model(aside, lock_name)
    except MlflowException:
        client.delete_registered_model(aside)  # a newer lock took the name: its holder proceeds
        raise


def open_client(tracking_uri: str, registry_uri: str | None = None) -> "MlflowClient":
    """An MlflowClient on `tracking_uri` (MLflow's own INFO chatter kept quiet)."""
    import logging

    from mlflow import MlflowClient

    for noisy in ("mlflow", "alembic"):  # after the import, which sets mlflow's to INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)


def default_client() -> "MlflowClient":
    """An MlflowClient on the current tracking URI."""
    from mlflow import MlflowClient

    return MlflowClient()


def reread_version(client: "MlflowClient", version: "ModelVersion") -> "ModelVersion":
    """The version as the registry holds it now (tags recorded since it was read)."""
    return client.get_model_version(version.name, version.version)


def move_alias(client: "MlflowClient", name: str, alias: str, version: str | int) -> None:
    client.set_registered_model_alias(name, alias, version)


def tag_version(client: "MlflowClient", name: str, version: str | int, tags: Mapping[str, str]) -> None:
    """Tags on a version; a password in a value (e.g. a manifest URI) stays out."""
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, redact_urls(value))


def checked_checkpoint(client: "MlflowClient", model_uri: str, folder: str) -> str:
    """The `model.pt` of the registered version `models:/name/<version>`, downloaded through
    `client` (its server explicitly: mlflow.set_tracking_uri would change the process' environment,
    MLflow 3 exports it, for everything that runs after) into `folder`, its bytes checked against
    the version's weights tag (the weights judged must be the weights registered)."""
    import mlflow

    from pipelines.common.errors import InputError
    from pipelines.data.checkpoints import check_weights, checkpoint_file_in
    from pipelines.tracking.registry import registered_weights_sha256

    name, version = model_uri.removeprefix("models:/").rsplit("/", 1)
    location = client.get_model_version_download_uri(name, version)
    local = mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=folder,
                                                tracking_uri=client.tracking_uri)
    try:
        checkpoint = checkpoint_file_in(local)
    except FileNotFoundError as err:
        raise PromotionError(f"the model version has no checkpoint: {err}") from None
    try:
        with open(checkpoint, "rb") as f:
            check_weights(f.read(), registered_weights_sha256(model_uri, client), model_uri)
    except InputError as err:
        raise UsageError(str(err)) from None
    return checkpoint
