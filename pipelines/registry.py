"""Registry promotion: move the `champion` alias to a candidate model version if it is as good.

A registered model version carries its validation metric as a tag (`val_mIoU` by default) next to
the manifest it was measured on (`val_manifest`). Promotion compares the candidate with the
version the `champion` alias points to *on the same validation manifest*: where a version has no
metric for that manifest, it is evaluated (pipelines.evaluate) and the result is recorded as a tag,
so each version is evaluated at most once per manifest.

Rule: the candidate is promoted iff it is at least as good as the champion plus `min_improvement`
(`candidate >= champion + min_improvement`, or `<= champion - min_improvement` for metrics where
lower is better); the first version becomes champion when no champion exists. The decision is
recorded on the candidate as `promotion.*` tags. Aliases only, never the deprecated stages API.

Race safety: MLflow has no compare-and-set for aliases, so the read-compare-set step runs under a
lock that the registry itself makes atomic: creating a registered model whose name already exists
fails on the server's unique constraint. The lock is the (empty) registered model
`<name>.promotion-lock`, deleted on release, and broken when older than `stale_after_s` (a killed
promoter). Evaluation happens outside the lock; if the champion moved meanwhile, the comparison is
redone against the new champion.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # mlflow is imported lazily: `--help` and usage errors stay fast
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

DEFAULT_MODEL = "deeplab"
DEFAULT_ALIAS = "champion"
DEFAULT_METRIC = "val_mIoU"
MANIFEST_TAG = "val_manifest"
TAG_PREFIX = "promotion."
LOCK_SUFFIX = ".promotion-lock"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # the embedded default of the training job

EXIT_PROMOTED = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_REJECTED = 3

# (model_uri, manifest_uri) -> metrics dict, e.g. {"mIoU": 0.71, ...}
Evaluator = Callable[[str, str], Mapping[str, float]]


class PromotionError(Exception):
    """A failure the CLI reports in one line; `exit_code` says which kind."""

    exit_code = EXIT_ERROR


class UsageError(PromotionError):
    """Unknown model or version, bad arguments, nothing to compare on."""

    exit_code = EXIT_USAGE


class RegistryUnreachable(PromotionError):
    exit_code = EXIT_ERROR


@dataclass(frozen=True)
class PromotionPolicy:
    metric: str = DEFAULT_METRIC
    higher_is_better: bool = True
    min_improvement: float = 0.0
    alias: str = DEFAULT_ALIAS

    def threshold(self, champion_value: float) -> float:
        """The value the candidate must reach (or beat) to replace the champion."""
        if self.higher_is_better:
            return champion_value + self.min_improvement
        return champion_value - self.min_improvement

    def accepts(self, candidate_value: float, champion_value: float) -> bool:
        limit = self.threshold(champion_value)
        return candidate_value >= limit if self.higher_is_better else candidate_value <= limit


@dataclass(frozen=True)
class Decision:
    """What promotion decided for one candidate; `outcome` is promoted, rejected or unchanged
    (the candidate already is the champion)."""

    model: str
    candidate: str
    outcome: str
    reason: str
    policy: PromotionPolicy
    candidate_value: float
    champion: str | None
    champion_value: float | None
    val_manifest: str | None
    dry_run: bool = False
    time: str = field(default_factory=lambda: _utc_now())

    @property
    def promoted(self) -> bool:
        return self.outcome in ("promoted", "unchanged")

    @property
    def exit_code(self) -> int:
        return EXIT_PROMOTED if self.promoted else EXIT_REJECTED

    def tags(self) -> dict[str, str]:
        """The decision record written on the candidate version."""
        return {
            f"{TAG_PREFIX}decision": self.outcome,
            f"{TAG_PREFIX}reason": self.reason,
            f"{TAG_PREFIX}compared_to": self.champion or "none",
            f"{TAG_PREFIX}metric": self.policy.metric,
            f"{TAG_PREFIX}candidate_value": repr(self.candidate_value),
            f"{TAG_PREFIX}champion_value": "none" if self.champion_value is None else repr(self.champion_value),
            f"{TAG_PREFIX}val_manifest": self.val_manifest or "none",
            f"{TAG_PREFIX}time": self.time,
        }

    def summary(self) -> str:
        """One line for logs and cron mail."""
        alias = self.policy.alias
        if self.outcome == "promoted":
            moved = f"{alias} {'would move' if self.dry_run else 'moved'} to v{self.candidate}"
        else:
            moved = f"{alias} {'would stay' if self.dry_run else 'stays'} v{self.champion}"
        prefix = "DRY-RUN " if self.dry_run else ""
        where = f" on {self.val_manifest}" if self.val_manifest else ""
        return f"{prefix}{self.outcome.upper()} {self.model} v{self.candidate}: {self.reason}{where}; {moved}"


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Registry reads


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


def _champion_version(client: "MlflowClient", name: str, alias: str) -> "ModelVersion | None":
    version = alias_target(client, name, alias)
    return None if version is None else client.get_model_version(name, version)


def resolve_candidate(client: "MlflowClient", name: str, candidate: str) -> "ModelVersion":
    """`candidate` is a version number or `latest` (the highest version number)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if _mlflow_error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
            raise UsageError(f"registered model {name!r} does not exist") from exc
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
            raise UsageError(f"registered model {name!r} has no version {candidate}") from exc
        raise


# ---------------------------------------------------------------------------------------------
# Metrics on a common validation manifest


def _manifest_key(manifest: str) -> str:
    return hashlib.sha1(manifest.encode()).hexdigest()[:10]


def evaluation_tags(metric: str, manifest: str) -> tuple[str, str]:
    """Tag keys of a metric measured by promotion on `manifest` (MLflow tag keys cannot hold a
    URI, so the manifest is named by a digest and stored beside the value)."""
    prefix = f"{TAG_PREFIX}eval.{_manifest_key(manifest)}"
    return f"{prefix}.{metric}", f"{prefix}.manifest"


def _as_metric(value: str, what: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise PromotionError(f"{what} is not a number: {value!r}") from None
    if not math.isfinite(number):
        raise PromotionError(f"{what} is not finite: {value!r}")
    return number


def recorded_metric(version: "ModelVersion", metric: str, manifest: str | None) -> float | None:
    """The version's metric on `manifest` if a tag already holds it, else None.

    The training-time tag counts when its `val_manifest` is the same manifest (or both are
    unknown); a value promotion measured earlier on `manifest` counts too.
    """
    tags = version.tags or {}
    what = f"version {version.version} tag {metric}"
    if metric in tags and tags.get(MANIFEST_TAG) == manifest:
        return _as_metric(tags[metric], what)
    if manifest is not None:
        value_key, _ = evaluation_tags(metric, manifest)
        if value_key in tags:
            return _as_metric(tags[value_key], f"version {version.version} tag {value_key}")
    return None


def mlflow_evaluator(client: "MlflowClient") -> Evaluator:
    """pipelines.evaluate.evaluate_model (plain single-scale inference, as in training's
    validation) on a registered version, downloaded through `client`.

    The client's server is used explicitly rather than through mlflow.set_tracking_uri, which
    would change the process' environment (MLflow 3 exports it) for everything that runs after.
    """

    def evaluate(model_uri: str, manifest_uri: str) -> Mapping[str, float]:
        import mlflow

        from pipelines.evaluate import evaluate_model

        name, version = model_uri.removeprefix("models:/").rsplit("/", 1)
        location = client.get_model_version_download_uri(name, version)
        print(f"promote: evaluating {model_uri} on {manifest_uri}", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="promote-") as tmp:
            local = mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=tmp,
                                                        tracking_uri=client.tracking_uri)
            return evaluate_model(_checkpoint_file(local), manifest_uri)

    return evaluate


def _checkpoint_file(local_dir: str) -> str:
    """The model.pt inside a downloaded model version (plain checkpoint dir or pyfunc layout)."""
    for root, _, files in sorted(os.walk(local_dir)):
        if "model.pt" in files:
            return os.path.join(root, "model.pt")
    raise PromotionError(f"the model version has no model.pt checkpoint (looked in {local_dir})")


def _evaluated_value(metrics: Mapping[str, float], metric: str) -> float:
    """`val_mIoU` is reported by the evaluator as `mIoU`."""
    for key in (metric, metric.removeprefix("val_")):
        if key in metrics:
            return _as_metric(str(metrics[key]), f"evaluated {key}")
    raise PromotionError(f"the evaluation returned no {metric!r} (keys: {sorted(metrics)})")


def metric_on_manifest(client: "MlflowClient", version: "ModelVersion", metric: str,
                       manifest: str | None, evaluate: Evaluator, record: bool) -> float:
    """The version's metric on `manifest`: from its tags, else evaluated (and recorded as tags
    unless `record` is False)."""
    value = recorded_metric(version, metric, manifest)
    if value is not None:
        return value
    if manifest is None:
        raise UsageError(f"version {version.version} has no {metric!r} tag and no validation "
                         "manifest is known: pass --val-manifest to evaluate it")
    value = _evaluated_value(evaluate(f"models:/{version.name}/{version.version}", manifest), metric)
    if record:
        tags = version.tags or {}
        if metric not in tags and tags.get(MANIFEST_TAG) in (None, manifest):
            # A version registered without its metric gets the training-time pair filled in.
            new_tags = {metric: repr(value), MANIFEST_TAG: manifest}
        else:
            value_key, manifest_key = evaluation_tags(metric, manifest)
            new_tags = {value_key: repr(value), manifest_key: manifest}
        for key, text in new_tags.items():
            client.set_model_version_tag(version.name, version.version, key, text)
    return value


def reference_manifest(explicit: str | None, candidate: "ModelVersion",
                       champion: "ModelVersion | None") -> str | None:
    """The manifest both versions are compared on: --val-manifest, else the candidate's, else
    the champion's `val_manifest` tag."""
    if explicit:
        return explicit
    for version in (candidate, champion):
        if version is not None and (version.tags or {}).get(MANIFEST_TAG):
            return version.tags[MANIFEST_TAG]
    return None


# ---------------------------------------------------------------------------------------------
# The lock


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
            if _mlflow_error_code(exc) != "RESOURCE_ALREADY_EXISTS":
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
        print(f"promote: breaking stale lock {lock_name!r} held by {lock.tags.get('owner')} "
              f"for {age_s:.0f}s", file=sys.stderr)
        _release(client, lock_name, owner=None)


def _release(client: "MlflowClient", lock_name: str, owner: str | None) -> None:
    """Delete the lock (only ours, unless `owner` is None: breaking a stale one)."""
    from mlflow.exceptions import MlflowException

    try:
        if owner is not None and client.get_registered_model(lock_name).tags.get("owner") != owner:
            return
        client.delete_registered_model(lock_name)
    except MlflowException as exc:
        if _mlflow_error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
            raise


# ---------------------------------------------------------------------------------------------
# Promotion


def decide(name: str, candidate: "ModelVersion", champion: "ModelVersion | None",
           candidate_value: float, champion_value: float | None, policy: PromotionPolicy,
           manifest: str | None, dry_run: bool = False) -> Decision:
    common = dict(model=name, candidate=str(candidate.version), policy=policy,
                  candidate_value=candidate_value, val_manifest=manifest, dry_run=dry_run)
    if champion is None:
        return Decision(outcome="promoted", reason=f"no {policy.alias} yet",
                        champion=None, champion_value=None, **common)
    if str(champion.version) == str(candidate.version):
        return Decision(outcome="unchanged", reason=f"already the {policy.alias}",
                        champion=str(champion.version), champion_value=champion_value, **common)
    assert champion_value is not None
    relation = ">=" if policy.higher_is_better else "<="
    accepted = policy.accepts(candidate_value, champion_value)
    shown = relation if accepted else {">=": "<", "<=": ">"}[relation]
    margin = f" {'+' if policy.higher_is_better else '-'} {policy.min_improvement:g}" if policy.min_improvement else ""
    reason = (f"{policy.metric} {candidate_value:.6g} {shown} {policy.alias} v{champion.version} "
              f"{champion_value:.6g}{margin}")
    return Decision(outcome="promoted" if accepted else "rejected", reason=reason,
                    champion=str(champion.version), champion_value=champion_value, **common)


def promote(name: str, candidate: str = "latest", *, client: "MlflowClient | None" = None,
            policy: PromotionPolicy = PromotionPolicy(), val_manifest: str | None = None,
            dry_run: bool = False, evaluate: Evaluator | None = None,
            lock_timeout_s: float = 120.0, stale_lock_s: float = 600.0,
            max_rounds: int = 5) -> Decision:
    """Compare `candidate` (version number or `latest`) of registered model `name` with the
    version the `policy.alias` alias points to, move the alias if the candidate is at least as
    good, and record the decision as `promotion.*` tags on the candidate.

    `evaluate` defaults to pipelines.evaluate on versions downloaded through `client`. With
    `dry_run`, decide (evaluating if needed) but change nothing in the registry. Raises UsageError
    (unknown model/version, no manifest to evaluate on) or PromotionError.
    """
    from mlflow import MlflowClient

    client = client or MlflowClient()
    evaluate = evaluate or mlflow_evaluator(client)
    with registry_errors(client.tracking_uri):
        cand = resolve_candidate(client, name, candidate)
        if cand.status != "READY":
            raise UsageError(f"version {cand.version} of {name!r} is {cand.status}, not READY")
        for round_ in range(max_rounds):
            if round_:
                cand = client.get_model_version(name, cand.version)  # tags recorded last round
            champ = _champion_version(client, name, policy.alias)
            decision = _compare(client, name, cand, champ, policy, val_manifest, evaluate, dry_run)
            if dry_run:
                return decision
            with promotion_lock(client, name, lock_timeout_s, stale_lock_s):
                if alias_target(client, name, policy.alias) != _version_of(champ):
                    continue  # the champion moved while we evaluated: compare with the new one
                decision = replace(decision, time=_utc_now())  # when it took effect
                if decision.outcome != "unchanged":
                    if decision.promoted:
                        client.set_registered_model_alias(name, policy.alias, cand.version)
                    for key, value in decision.tags().items():
                        client.set_model_version_tag(name, cand.version, key, value)
                after = alias_target(client, name, policy.alias)
                expected = str(cand.version) if decision.promoted else _version_of(champ)
                if after != expected:
                    raise PromotionError(f"alias {policy.alias!r} is v{after}, expected v{expected}: "
                                         "it was moved outside promotion while the lock was held")
                return decision
        raise PromotionError(f"the {policy.alias} of {name!r} kept moving; gave up after "
                             f"{max_rounds} rounds")


def _version_of(version: "ModelVersion | None") -> str | None:
    return None if version is None else str(version.version)


def _compare(client: "MlflowClient", name: str, cand: "ModelVersion", champ: "ModelVersion | None",
             policy: PromotionPolicy, val_manifest: str | None, evaluate: Evaluator,
             dry_run: bool) -> Decision:
    if champ is not None and str(champ.version) == str(cand.version):
        champ = cand
    manifest = reference_manifest(val_manifest, cand, champ)
    cand_value = metric_on_manifest(client, cand, policy.metric, manifest, evaluate, not dry_run)
    champ_value = None
    if champ is not None:
        champ_value = (cand_value if champ is cand else
                       metric_on_manifest(client, champ, policy.metric, manifest, evaluate, not dry_run))
    return decide(name, cand, champ, cand_value, champ_value, policy, manifest, dry_run)


# ---------------------------------------------------------------------------------------------
# Command line

EPILOG = """\
exit codes:
  0  promoted (or the candidate already is the champion)
  3  rejected: the champion stays (not an error; cron can tell it apart)
  2  usage error: bad arguments, unknown model or version, no manifest to evaluate on
  1  registry unreachable or any other error

The decision is printed as one line and recorded on the candidate version as tags
promotion.decision, promotion.reason, promotion.compared_to, promotion.metric,
promotion.candidate_value, promotion.champion_value, promotion.time (and a few more).
Network behaviour follows MLflow's MLFLOW_HTTP_REQUEST_MAX_RETRIES / MLFLOW_HTTP_REQUEST_TIMEOUT;
this command defaults them to 2 retries and 30 s so that an unreachable server fails fast.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="promote.py",
        description="Move the champion alias of a registered model to a candidate version if its "
                    "validation metric is at least as good (plus --min-improvement).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="registered model name (default: %(default)s)")
    parser.add_argument("--candidate", default="latest",
                        help="version number, or 'latest' for the newest version (default: %(default)s)")
    parser.add_argument("--metric", default=DEFAULT_METRIC, help="version tag to compare (default: %(default)s)")
    parser.add_argument("--lower-is-better", action="store_true", help="for losses and error rates")
    parser.add_argument("--min-improvement", type=float, default=0.0,
                        help="margin the candidate must beat the champion by (default: %(default)s)")
    parser.add_argument("--val-manifest", default=None,
                        help="validation manifest to compare on; versions without the metric for it "
                             "are evaluated (default: the candidate's val_manifest tag)")
    parser.add_argument("--alias", default=DEFAULT_ALIAS, help="alias to move (default: %(default)s)")
    parser.add_argument("--tracking-uri", default=None,
                        help=f"MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI or {DEFAULT_TRACKING_URI})")
    parser.add_argument("--registry-uri", default=None,
                        help="registry URI (default: $MLFLOW_REGISTRY_URI, else the tracking URI)")
    parser.add_argument("--dry-run", action="store_true", help="decide and print; change nothing")
    parser.add_argument("--lock-timeout", type=float, default=120.0,
                        help="seconds to wait for a concurrent promotion (default: %(default)s)")
    return parser


def _check_local_database(tracking_uri: str) -> None:
    """MLflow would silently create an empty database for a mistyped sqlite path."""
    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix) and not os.path.exists(tracking_uri[len(prefix):]):
        raise UsageError(f"no MLflow database at {tracking_uri[len(prefix):]} "
                         "(set --tracking-uri or MLFLOW_TRACKING_URI)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not math.isfinite(args.min_improvement) or args.min_improvement < 0:
        print("promote: error: --min-improvement must be a finite number >= 0", file=sys.stderr)
        return EXIT_USAGE
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    policy = PromotionPolicy(metric=args.metric, higher_is_better=not args.lower_is_better,
                             min_improvement=args.min_improvement, alias=args.alias)
    try:
        _check_local_database(tracking_uri)
        from mlflow import MlflowClient

        for noisy in ("mlflow", "alembic"):  # after the import, which sets mlflow's to INFO
            logging.getLogger(noisy).setLevel(logging.WARNING)

        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=args.registry_uri)
        decision = promote(args.model, args.candidate, client=client, policy=policy,
                           val_manifest=args.val_manifest, dry_run=args.dry_run,
                           lock_timeout_s=args.lock_timeout)
    except PromotionError as exc:
        print(f"promote: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - e.g. the evaluation failed: one line, exit 1
        print(f"promote: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(decision.summary(), flush=True)
    return decision.exit_code
