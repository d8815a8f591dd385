"""Registry promotion: move the `champion` alias to a candidate model version if it is as good.

A registered model version carries its validation metric as a tag (`val_mIoU` by default) next to
the manifest it was measured on (`val_manifest`). Promotion compares the candidate with the
version the `champion` alias points to *on the same validation manifest*: where a version has no
metric for that manifest, it is evaluated (pipelines.segmentation.evaluation) and the result is
recorded as a tag, so each version is evaluated at most once per manifest.

Rule (policy.py): the candidate is promoted iff it is at least as good as the champion plus
`min_improvement`; the first version becomes champion when no champion exists. Evaluation happens
outside the lock (registry.py); if the champion moved meanwhile, the comparison is redone against
the new champion. Aliases only, never the deprecated stages API.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

from pydantic import Field, field_validator

from pipelines.common.config import Section
from pipelines.common.uris import DEFAULT_TRACKING_URI, resolve_tracking_uri
from pipelines.tracking import fail_fast_http
from pipelines.promotion.policy import (
    DEFAULT_ALIAS,
    DEFAULT_MAX_ERROR_SHARE,
    DEFAULT_METRIC,
    Decision,
    PromotionPolicy,
    decide,
    utc_now,
)
from pipelines.tracking.promotion import (
    Evaluator,
    PromotionError,
    UsageError,
    alias_target,
    champion_version,
    checked_checkpoint,
    default_client,
    metric_on_manifest,
    move_alias,
    open_client,
    promotion_lock,
    reference_manifest,
    registry_errors,
    reread_version,
    resolve_candidate,
    tag_version,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

DEFAULT_MODEL = "deeplab"


class PromoteConfig(Section):
    """What `pipelines/promote.py` runs."""

    model: str = Field(DEFAULT_MODEL, description="registered model name")
    candidate: str = Field("latest", description="version number, or 'latest' for the newest version")
    metric: str = Field(DEFAULT_METRIC, description="version tag to compare")
    lower_is_better: bool = Field(False, description="for losses and error rates")
    min_improvement: float = Field(0.0, ge=0, description="margin the candidate must beat the champion by")
    val_manifest: str | None = Field(None, description="validation manifest to compare on; versions not yet "
                                                       "evaluated on it by promotion are evaluated (default: "
                                                       "the registered model's val_manifest tag)")
    max_error_share: float = Field(DEFAULT_MAX_ERROR_SHARE, ge=0, le=1,
                                   description="largest share of failed rows an evaluation may have")
    alias: str = Field(DEFAULT_ALIAS, description="alias to move")
    tracking_uri: str | None = Field(None, description="MLflow tracking/registry URI (default: "
                                                       f"$MLFLOW_TRACKING_URI or {DEFAULT_TRACKING_URI})")
    registry_uri: str | None = Field(None, description="registry URI (default: $MLFLOW_REGISTRY_URI, "
                                                       "else the tracking URI)")
    dry_run: bool = Field(False, description="decide and print; change nothing")
    lock_timeout: float = Field(120.0, gt=0, description="seconds to wait for a concurrent promotion")

    @field_validator("min_improvement")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number >= 0")
        return value

    @property
    def policy(self) -> PromotionPolicy:
        return PromotionPolicy(metric=self.metric, higher_is_better=not self.lower_is_better,
                               min_improvement=self.min_improvement, alias=self.alias,
                               max_error_share=self.max_error_share)

    def resolved_tracking_uri(self) -> str:
        return resolve_tracking_uri(self.tracking_uri)


def mlflow_evaluator(client: "MlflowClient") -> Evaluator:
    """pipelines.segmentation.evaluation.evaluate_model (plain single-scale inference, as in
    training's validation) on a registered version, downloaded through `client`."""

    def evaluate(model_uri: str, manifest_uri: str) -> Mapping[str, float]:
        from pipelines.segmentation.evaluation import evaluate_model

        print(f"promote: evaluating {model_uri} on {manifest_uri}", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="promote-") as tmp:
            # The private temporary folder is ours alone: the file checked is the file evaluated.
            return evaluate_model(checked_checkpoint(client, model_uri, tmp), manifest_uri)

    return evaluate


def promote(name: str, candidate: str = "latest", *, client: "MlflowClient | None" = None,
            policy: PromotionPolicy = PromotionPolicy(), val_manifest: str | None = None,
            dry_run: bool = False, evaluate: Evaluator | None = None,
            lock_timeout_s: float = 120.0, stale_lock_s: float = 600.0,
            max_rounds: int = 5) -> Decision:
    """Compare `candidate` (version number or `latest`) of registered model `name` with the
    version the `policy.alias` alias points to, move the alias if the candidate is at least as
    good, and record the decision as `promotion.*` tags on the candidate.

    `evaluate` defaults to pipelines.segmentation.evaluation on versions downloaded through `client`. With
    `dry_run`, decide (evaluating if needed) but change nothing in the registry. Raises UsageError
    (unknown model/version, no manifest to evaluate on) or PromotionError.
    """
    client = client or default_client()
    evaluate = evaluate or mlflow_evaluator(client)
    with registry_errors(client.tracking_uri):
        cand = resolve_candidate(client, name, candidate)
        if cand.status != "READY":
            raise UsageError(f"version {cand.version} of {name!r} is {cand.status}, not READY")
        for round_ in range(max_rounds):
            if round_:
                cand = reread_version(client, cand)  # tags recorded last round
            champ = champion_version(client, name, policy.alias)
            decision = _compare(client, name, cand, champ, policy, val_manifest, evaluate, dry_run)
            if dry_run:
                return decision
            with promotion_lock(client, name, lock_timeout_s, stale_lock_s):
                if alias_target(client, name, policy.alias) != _version_of(champ):
                    continue  # the champion moved while we evaluated: compare with the new one
                decision = replace(decision, time=utc_now())  # when it took effect
                if decision.outcome != "unchanged":
                    if decision.promoted:
                        move_alias(client, name, policy.alias, cand.version)
                    tag_version(client, name, cand.version, decision.tags())
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
    manifest = reference_manifest(client, name, val_manifest)
    limit = policy.max_error_share
    cand_value = metric_on_manifest(client, cand, policy.metric, manifest, evaluate, not dry_run, limit)
    champ_value = None
    if champ is not None:
        champ_value = (cand_value if champ is cand else
                       metric_on_manifest(client, champ, policy.metric, manifest, evaluate, not dry_run, limit))
    return decide(name, cand, champ, cand_value, champ_value, policy, manifest, dry_run)


def _check_local_database(tracking_uri: str) -> None:
    """MLflow would silently create an empty database for a mistyped sqlite path."""
    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix) and not os.path.exists(tracking_uri[len(prefix):]):
        raise UsageError(f"no MLflow database at {tracking_uri[len(prefix):]} "
                         "(set --tracking-uri or MLFLOW_TRACKING_URI)")


def run_promotion(cfg: PromoteConfig) -> Decision:
    """Promotion with the command line's network defaults: an unreachable server fails fast."""
    fail_fast_http()
    tracking_uri = cfg.resolved_tracking_uri()
    _check_local_database(tracking_uri)
    client = open_client(tracking_uri, cfg.registry_uri)
    return promote(cfg.model, cfg.candidate, client=client, policy=cfg.policy,
                   val_manifest=cfg.val_manifest, dry_run=cfg.dry_run, lock_timeout_s=cfg.lock_timeout)
