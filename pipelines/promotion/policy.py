"""The promotion decision, pure: no MLflow calls, no I/O. Given two metric values and a policy, which
version holds the alias, and why (the record written on the candidate as `promotion.*` tags)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Protocol

from pipelines.common.errors import EXIT_OK, EXIT_REJECTED
from pipelines.tracking.promotion import TAG_PREFIX  # light: mlflow is imported only by its calls

DEFAULT_ALIAS = "champion"
DEFAULT_METRIC = "val_mIoU"

DEFAULT_MAX_ERROR_SHARE = 0.01


class Versioned(Protocol):
    """Anything with a registry version number (MLflow's ModelVersion)."""

    version: str | int


@dataclass(frozen=True)
class PromotionPolicy:
    metric: str = DEFAULT_METRIC
    higher_is_better: bool = True
    min_improvement: float = 0.0
    alias: str = DEFAULT_ALIAS
    # An evaluation where more than this share of the manifest's rows failed decides nothing.
    max_error_share: float = DEFAULT_MAX_ERROR_SHARE

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
    time: str = field(default_factory=lambda: utc_now())

    @property
    def promoted(self) -> bool:
        return self.outcome in ("promoted", "unchanged")

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.promoted else EXIT_REJECTED

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


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def decide(name: str, candidate: Versioned, champion: Versioned | None,
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
