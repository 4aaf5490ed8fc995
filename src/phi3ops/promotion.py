"""Promotion by alias: `@champion` moves only to a version that wins under mlflow.yaml's policy.

    phi3ops promote --version 3        # the same policy the retrain flow applies
    phi3ops promote --rollback         # @champion back to @previous-champion

Every decision and its reason is written to the version's tags (`promotion.decision`,
`promotion.reason`). NaN or missing metrics never promote. MLflow has no compare-and-set on
aliases, so concurrent promotions settle: each promoter, after writing, re-reads the versions
that competed against the same champion and keeps `@champion` on the best of them, so the
better version wins, not the last writer. When a retrain fails after its promotion, the flow's
rollback puts the aliases back to a snapshot taken before it registered (`undo_promotion`,
`undo_challenger`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from phi3ops.config import MlflowConfig, PromotionPolicy
from phi3ops.errors import RegistryError
from phi3ops.registry import alias_version, connect, log_tags, with_retries

log = logging.getLogger(__name__)
PREVIOUS = "previous-champion"
NO_CHAMPION = "none"


@dataclass
class PromotionDecision:
    version: str
    promoted: bool
    reason: str
    previous_champion: str | None


def tag_float(mv: ModelVersion, name: str) -> float:
    try:
        return float(mv.tags[f"metric.{name}"])
    except (KeyError, ValueError):
        return math.nan


def _beats(policy: PromotionPolicy, candidate: ModelVersion, other: str, stored: float,
           paired: bool = True) -> tuple[bool, str]:
    """Does the candidate beat `other` ("base" or "champion") under the policy? Uses the paired
    delta measured on the same split when `paired` and present, else the stored scores."""
    metric = policy.metric
    delta = tag_float(candidate, f"delta_{other}_{metric}") if paired else math.nan
    if not math.isfinite(delta):
        delta = tag_float(candidate, f"tuned_{metric}") - stored
    if not math.isfinite(delta):
        return False, f"no finite {metric} to compare with the {other}"
    need = policy.min_gain if other == "champion" else 0.0
    if delta <= need:
        return False, f"{metric} gain over the {other} {delta:+.4f} is not above {need}"
    low = tag_float(candidate, f"delta_{other}_{metric}_lo") if paired else math.nan
    if policy.require_interval_above_zero and not low > 0:
        return False, f"{metric} gain over the {other}: 95% interval lower bound {low:.4f} <= 0"
    return True, f"{metric} {delta:+.4f} over the {other}"


def decide(
    cfg: MlflowConfig, candidate: ModelVersion, champion: ModelVersion | None,
) -> tuple[bool, str]:
    """Apply the promotion policy; any missing or NaN metric means no promotion."""
    policy = cfg.promotion
    value = tag_float(candidate, f"tuned_{policy.metric}")
    if not math.isfinite(value):
        return False, f"tuned {policy.metric} missing or not finite"
    reasons = []
    if policy.must_beat_base:
        ok, why = _beats(policy, candidate, "base", tag_float(candidate, f"base_{policy.metric}"))
        if not ok:
            return False, why
        reasons.append(why)
    if champion is None:
        return True, "; ".join([f"first champion ({policy.metric} {value:.4f})", *reasons])
    # A delta measured against another version than today's champion does not count.
    paired = candidate.tags.get("phi3ops.evaluated_against") == champion.version
    ok, why = _beats(policy, candidate, "champion",
                     tag_float(champion, f"tuned_{policy.metric}"), paired)
    return ok, f"{why} (champion v{champion.version})" + "".join(f"; {r}" for r in reasons)


def _tag(client: MlflowClient, cfg: MlflowConfig, version: str, **tags: str) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(cfg.registered_model, version, f"promotion.{key}", value)


def _contenders(client: MlflowClient, cfg: MlflowConfig, baseline: str) -> list[ModelVersion]:
    """Versions that passed the policy against the same champion and were not superseded."""
    versions = client.search_model_versions(f"name='{cfg.registered_model}'")
    return [v for v in versions if v.tags.get("promotion.baseline") == baseline
            and v.tags.get("promotion.decision") == "promoted"]


def _settle(client: MlflowClient, cfg: MlflowConfig, baseline: str) -> str:
    """Point `@champion` at the best contender until a re-read agrees; returns the champion."""
    metric = f"tuned_{cfg.promotion.metric}"
    for _ in range(50):
        best = max(_contenders(client, cfg, baseline),
                   key=lambda v: (tag_float(v, metric), -int(v.version)))
        current = alias_version(cfg, cfg.champion_alias)
        if current is not None and current.version == best.version:
            return best.version
        try:
            client.set_registered_model_alias(cfg.registered_model, cfg.champion_alias,
                                              best.version)
            if baseline != NO_CHAMPION:
                client.set_registered_model_alias(cfg.registered_model, PREVIOUS, baseline)
        except MlflowException as e:
            # Two first-time writes of one alias collide in the store (its insert is not an
            # upsert); the other writer got there, so re-read and decide again.
            log.info("alias write raced another promoter (%s); re-reading", e.error_code)
        time.sleep(0.05)
    raise RegistryError(f"@{cfg.champion_alias} did not settle after 50 tries")


def promote(cfg: MlflowConfig, version: str) -> PromotionDecision:
    """Move `@champion` to `version` if the policy allows; record the decision on its tags."""
    connect(cfg)
    client = MlflowClient()
    candidate = client.get_model_version(cfg.registered_model, version)
    champion = alias_version(cfg, cfg.champion_alias)
    baseline = champion.version if champion is not None else NO_CHAMPION
    if champion is not None and champion.version == candidate.version:
        return PromotionDecision(version, False, "already champion", champion.version)
    promoted, reason = decide(cfg, candidate, champion)
    _tag(client, cfg, version, baseline=baseline, reason=reason,
         decision="promoted" if promoted else "rejected")
    if promoted:
        winner = _settle(client, cfg, baseline)
        if winner != version:
            promoted, reason = False, f"{reason}; superseded by v{winner}, promoted concurrently"
            _tag(client, cfg, version, decision="superseded", reason=reason)
    return PromotionDecision(version, promoted, reason,
                             champion.version if champion is not None else None)


def _point(client: MlflowClient, cfg: MlflowConfig, alias: str, version: str | None) -> None:
    """Set `alias` to `version`, or remove it when `version` is None."""
    if version is not None:
        client.set_registered_model_alias(cfg.registered_model, alias, version)
    elif alias_version(cfg, alias) is not None:
        client.delete_registered_model_alias(cfg.registered_model, alias)


def rollback(cfg: MlflowConfig) -> PromotionDecision:
    """`@champion` back to `@previous-champion`; the demoted version is tagged rolled-back."""
    connect(cfg)
    client = MlflowClient()
    champion, previous = alias_version(cfg, cfg.champion_alias), alias_version(cfg, PREVIOUS)
    if champion is None or previous is None:
        raise RegistryError(f"nothing to roll back to: @{cfg.champion_alias} or @{PREVIOUS} "
                            f"is not set on {cfg.registered_model}")
    _point(client, cfg, cfg.champion_alias, previous.version)
    _point(client, cfg, PREVIOUS, None)
    reason = f"rolled back to v{previous.version} by hand"
    _tag(client, cfg, champion.version, decision="rolled-back", reason=reason)
    return PromotionDecision(previous.version, True, reason, champion.version)


def record(cfg: MlflowConfig, run_id: str, decision: PromotionDecision) -> None:
    """Check the registry agrees with the decision (a promoted version is `@champion` now), then
    write the version and decision on the run, where the runs table shows them."""
    connect(cfg)
    champion = alias_version(cfg, cfg.champion_alias)
    if decision.promoted and (champion is None or str(champion.version) != str(decision.version)):
        raise RegistryError(
            f"v{decision.version} was promoted but @{cfg.champion_alias} names "
            + (f"v{champion.version}" if champion is not None else "no version"))
    tags = {"phi3ops.version": str(decision.version),
            "phi3ops.promotion": "promoted" if decision.promoted else "not promoted",
            "phi3ops.promotion_reason": decision.reason}
    with_retries("tag the run with the decision", lambda: log_tags(run_id, tags))


def alias_snapshot(cfg: MlflowConfig) -> dict[str, str | None]:
    """Where `@champion`, `@previous-champion` and `@challenger` point now, to undo a run.
    Versions as strings: a SQL store gives ints, a tracking server strings."""
    connect(cfg)
    return {alias: str(mv.version) if (mv := alias_version(cfg, alias)) is not None else None
            for alias in (cfg.champion_alias, PREVIOUS, cfg.challenger_alias)}


def undo_promotion(cfg: MlflowConfig, before: dict[str, str | None], version: str,
                   reason: str) -> bool:
    """Put `@champion` and `@previous-champion` back where `before` had them, if `@champion`
    still names `version` (a move by anyone else since is left alone); tag `version`
    rolled-back. True when something was undone."""
    connect(cfg)
    version = str(version)
    if before[cfg.champion_alias] == version:
        return False  # it was champion already: this run moved nothing
    current = alias_version(cfg, cfg.champion_alias)
    if current is None or str(current.version) != version:
        return False
    client = MlflowClient()
    _point(client, cfg, cfg.champion_alias, before[cfg.champion_alias])
    _point(client, cfg, PREVIOUS, before[PREVIOUS])
    _tag(client, cfg, version, decision="rolled-back", reason=reason)
    log.warning("@%s back to %s from v%s: %s", cfg.champion_alias,
                f"v{before[cfg.champion_alias]}" if before[cfg.champion_alias] else "no version",
                version, reason)
    return True


def undo_challenger(cfg: MlflowConfig, before: dict[str, str | None], version: str) -> bool:
    """Put `@challenger` back where `before` had it, if it still names `version`."""
    connect(cfg)
    version, current = str(version), alias_version(cfg, cfg.challenger_alias)
    if before[cfg.challenger_alias] == version or current is None or str(
            current.version) != version:
        return False
    _point(MlflowClient(), cfg, cfg.challenger_alias, before[cfg.challenger_alias])
    return True
