"""Promotion by alias: `@champion` moves only to a version that wins under mlflow.yaml's policy.

    phi3ops promote --version 3        # the same policy the retrain flow applies
    phi3ops promote --rollback         # @champion back to @previous-champion

Every decision and its reason is written to the version's tags (`promotion.decision`,
`promotion.reason`). NaN or missing metrics never promote. MLflow has no compare-and-set on
aliases, but creating a registered model that already exists fails atomically in every store,
so each read-decide-move of `@champion` holds `<model>.promotion-lock`, a registered model that
lives only while aliases move: two promotions at once run one after the other, and the second
decides against the champion the first left, so the better version wins, not the last writer.
When a retrain fails after its promotion, the flow's rollback puts the aliases back to a
snapshot taken before it registered (`undo_promotion`, `undo_challenger`).

The decision tags say where a version stands now; its history (tag `phi3ops.history`, one line
per event) says how it got there and is never rewritten: lines are only ever added, each with
the time, the event and who caused it (a run, or user@host for a command).
"""

from __future__ import annotations

import getpass
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from phi3ops.config import MlflowConfig, PromotionPolicy
from phi3ops.errors import RegistryError
from phi3ops.registry.client import Registry
from phi3ops.registry.runs import log_tags
from phi3ops.registry.store import HISTORY_TAG, LEGACY_HISTORY, history_entry, version_metrics

log = logging.getLogger(__name__)
PREVIOUS = "previous-champion"
LOCK_SUFFIX = ".promotion-lock"


@dataclass
class PromotionDecision:
    version: str
    promoted: bool
    reason: str
    previous_champion: str | None


def _beats(policy: PromotionPolicy, candidate: dict[str, float], other: str, stored: float,
           paired: bool = True) -> tuple[bool, str]:
    """Does the candidate beat `other` ("base" or "champion") under the policy? Uses the paired
    delta measured on the same split when `paired` and present, else the stored scores."""
    metric = policy.metric
    delta = candidate.get(f"delta_{other}_{metric}", math.nan) if paired else math.nan
    if not math.isfinite(delta):
        delta = candidate.get(f"tuned_{metric}", math.nan) - stored
    if not math.isfinite(delta):
        return False, f"no finite {metric} to compare with the {other}"
    need = policy.min_gain if other == "champion" else 0.0
    if delta <= need:
        return False, f"{metric} gain over the {other} {delta:+.4f} is not above {need}"
    low = candidate.get(f"delta_{other}_{metric}_lo", math.nan) if paired else math.nan
    if policy.require_interval_above_zero and not low > 0:
        return False, f"{metric} gain over the {other}: 95% interval lower bound {low:.4f} <= 0"
    return True, f"{metric} {delta:+.4f} over the {other}"


def decide(
    registry: Registry, candidate: ModelVersion, champion: ModelVersion | None,
) -> tuple[bool, str]:
    """Apply the promotion policy; any missing or NaN metric means no promotion."""
    policy = registry.config.promotion
    scores = version_metrics(registry, candidate)
    value = scores.get(f"tuned_{policy.metric}", math.nan)
    if not math.isfinite(value):
        return False, f"tuned {policy.metric} missing or not finite"
    reasons = []
    if policy.must_beat_base:
        ok, why = _beats(policy, scores, "base", scores.get(f"base_{policy.metric}", math.nan))
        if not ok:
            return False, why
        reasons.append(why)
    if champion is None:
        return True, "; ".join([f"first champion ({policy.metric} {value:.4f})", *reasons])
    # A delta measured against another version than today's champion does not count.
    paired = candidate.tags.get("phi3ops.evaluated_against") == champion.version
    stored = version_metrics(registry, champion).get(f"tuned_{policy.metric}", math.nan)
    ok, why = _beats(policy, scores, "champion", stored, paired)
    return ok, f"{why} (champion v{champion.version})" + "".join(f"; {r}" for r in reasons)


def model_description(mcfg: MlflowConfig, base_model: str) -> str:
    """The registered model's own description: what its versions are, and how @champion moves."""
    policy = mcfg.promotion
    rules = [f"its tuned {policy.metric} on the held-out split beats the champion's by more "
             f"than {policy.min_gain}"]
    if policy.must_beat_base:
        rules.insert(0, f"it beats the base model's {policy.metric}")
    if policy.require_interval_above_zero:
        rules.append("the bootstrap 95% interval of each gain lies above zero")
    return "\n".join([
        f"LoRA adapters of `{base_model}` fine-tuned by phi3ops on the team's chat data. Each "
        "version's description says which data (DVC md5), config and code made it, with its "
        "metrics; its model metrics are the held-out evaluation.", "",
        f"Aliases: `@{mcfg.challenger_alias}` is the newest version, `@{mcfg.champion_alias}` the "
        f"one serving, `@{PREVIOUS}` the champion before it. A new version becomes "
        f"`@{mcfg.champion_alias}` only if " + "; ".join(rules) + ". Missing or NaN metrics "
        "never promote; a failed run moves no alias. By hand: `phi3ops promote --version N` "
        "(same policy), `phi3ops promote --rollback`.",
    ])


def _tag(registry: Registry, version: str, **tags: str) -> None:
    for key, value in tags.items():
        registry.client.set_model_version_tag(registry.model, version, f"promotion.{key}", value)


def actor() -> str:
    """Who runs a command, for the history: user@host."""
    return f"{getpass.getuser()}@{socket.gethostname()}"


def _append_history(registry: Registry, version: str, event: str, by: str) -> None:
    """Add a line to the version's history tag (a version registered before: its next
    `history.NNN` tag). Called under the promotion lock: no two writers race."""
    client, name = registry.client, registry.model
    tags = client.get_model_version(name, version).tags
    entry = history_entry(event, by)
    legacy = sum(key.startswith(LEGACY_HISTORY) for key in tags)
    if legacy and HISTORY_TAG not in tags:
        client.set_model_version_tag(name, version, f"{LEGACY_HISTORY}{legacy + 1:03d}", entry)
        return
    lines = [*filter(None, tags.get(HISTORY_TAG, "").split("\n")), entry]
    client.set_model_version_tag(name, version, HISTORY_TAG, "\n".join(lines))


def history(mv: ModelVersion) -> list[str]:
    """A version's history, oldest first."""
    legacy = [mv.tags[k] for k in sorted(k for k in mv.tags if k.startswith(LEGACY_HISTORY))]
    return legacy + [line for line in mv.tags.get(HISTORY_TAG, "").split("\n") if line]


def _error_code(e: MlflowException) -> str:
    return str(getattr(e, "error_code", ""))


@contextmanager
def promotion_lock(registry: Registry, wait_s: float = 120.0,
                   stale_s: float = 600.0) -> Iterator[None]:
    """Hold `<model>.promotion-lock` while aliases move. A lock older than `stale_s` was left
    by a promoter that died holding it, and is broken; waiting longer than `wait_s` is an error
    that names the holder."""
    client, name = registry.client, registry.model + LOCK_SUFFIX
    token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.create_registered_model(name, tags={"phi3ops.holder": token}, description=(
                f"Held by phi3ops while it moves the aliases of {registry.model}."))
            break
        except MlflowException as e:
            if _error_code(e) == "RESOURCE_DOES_NOT_EXIST":
                continue  # the server met the lock, then read it back after its release
            if _error_code(e) != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            held = client.get_registered_model(name)
        except MlflowException:
            continue  # released between our create and this read
        holder = held.tags.get("phi3ops.holder", "unknown")
        if holder == token:
            break  # our create went through, its reply was lost and the client retried
        age = time.time() - held.creation_timestamp / 1000
        if age > stale_s:
            log.warning("breaking %s, held by %s for %.0f s", name, holder, age)
            _release(client, name)
        elif time.monotonic() > deadline:
            raise RegistryError(
                f"{name} is held by {holder} (for {age:.0f} s); waited {wait_s:.0f} s. If that "
                f"process is gone, delete the registered model {name}.")
        else:
            time.sleep(0.1)
    try:
        yield
    finally:
        _release(client, name)


def _release(client, name: str) -> None:
    try:
        client.delete_registered_model(name)
    except MlflowException as e:
        if _error_code(e) != "RESOURCE_DOES_NOT_EXIST":
            raise


def promote(registry: Registry, version: str, by: str | None = None) -> PromotionDecision:
    """Move `@champion` to `version` if the policy allows; record the decision on its tags and
    in the history of each version it concerns."""
    mcfg = registry.config
    by = by or actor()
    with promotion_lock(registry):
        candidate = registry.client.get_model_version(registry.model, version)
        champion = registry.alias(mcfg.champion_alias)
        if champion is not None and champion.version == candidate.version:
            return PromotionDecision(version, False, "already champion", champion.version)
        promoted, reason = decide(registry, candidate, champion)
        _tag(registry, version, reason=reason, decision="promoted" if promoted else "rejected")
        if promoted:
            _point(registry, mcfg.champion_alias, version)
            _append_history(registry, version, f"@{mcfg.champion_alias}: {reason}", by)
            if champion is not None:
                _point(registry, PREVIOUS, champion.version)
                _append_history(registry, champion.version,
                                f"@{PREVIOUS}: v{version} took @{mcfg.champion_alias}", by)
        else:
            _append_history(registry, version, f"rejected: {reason}", by)
    return PromotionDecision(version, promoted, reason,
                             champion.version if champion is not None else None)


def _point(registry: Registry, alias: str, version: str | None) -> None:
    """Set `alias` to `version`, or remove it when `version` is None."""
    if version is not None:
        registry.client.set_registered_model_alias(registry.model, alias, version)
    elif registry.alias(alias) is not None:
        registry.client.delete_registered_model_alias(registry.model, alias)


def rollback(registry: Registry, by: str | None = None) -> PromotionDecision:
    """`@champion` back to `@previous-champion`; the demoted version is tagged rolled-back and
    loses `@challenger` if it held it (the next run's challenger takes it)."""
    mcfg = registry.config
    by = by or actor()
    with promotion_lock(registry):
        champion, previous = registry.alias(mcfg.champion_alias), registry.alias(PREVIOUS)
        if champion is None or previous is None:
            raise RegistryError(f"nothing to roll back to: @{mcfg.champion_alias} or @{PREVIOUS} "
                                f"is not set on {mcfg.registered_model}")
        _point(registry, mcfg.champion_alias, previous.version)
        _point(registry, PREVIOUS, None)
        reason = (f"v{champion.version} rolled back by hand; @{mcfg.champion_alias} is "
                  f"v{previous.version} again")
        challenger = registry.alias(mcfg.challenger_alias)
        if challenger is not None and challenger.version == champion.version:
            _point(registry, mcfg.challenger_alias, None)  # not a candidate any more
            reason += f"; @{mcfg.challenger_alias} cleared"
        _tag(registry, champion.version, decision="rolled-back", reason=reason)
        _append_history(registry, champion.version, f"rolled back: {reason}", by)
        _append_history(registry, previous.version,
                        f"@{mcfg.champion_alias} again: v{champion.version} rolled back", by)
    return PromotionDecision(previous.version, True, reason, champion.version)


def record(registry: Registry, run_id: str, decision: PromotionDecision) -> None:
    """Check the registry agrees with the decision (a promoted version is `@champion` now), then
    write the version and decision on the run, where the runs table shows them."""
    mcfg = registry.config
    champion = registry.alias(mcfg.champion_alias)
    if decision.promoted and (champion is None or str(champion.version) != str(decision.version)):
        raise RegistryError(
            f"v{decision.version} was promoted but @{mcfg.champion_alias} names "
            + (f"v{champion.version}" if champion is not None else "no version"))
    tags = {"phi3ops.version": str(decision.version),
            "phi3ops.promotion": "promoted" if decision.promoted else "not promoted",
            "phi3ops.promotion_reason": decision.reason}
    registry.retried("tag the run with the decision", lambda: log_tags(registry, run_id, tags))


def alias_snapshot(registry: Registry) -> dict[str, str | None]:
    """Where `@champion`, `@previous-champion` and `@challenger` point now, to undo a run.
    Versions as strings: a SQL store gives ints, a tracking server strings."""
    mcfg = registry.config
    return {alias: str(mv.version) if (mv := registry.alias(alias)) is not None else None
            for alias in (mcfg.champion_alias, PREVIOUS, mcfg.challenger_alias)}


def undo_promotion(registry: Registry, before: dict[str, str | None], version: str,
                   reason: str, by: str | None = None) -> bool:
    """Put `@champion` and `@previous-champion` back where `before` had them, if `@champion`
    still names `version` (a move by anyone else since is left alone); tag `version`
    rolled-back. True when something was undone."""
    mcfg = registry.config
    version = str(version)
    if before[mcfg.champion_alias] == version:
        return False  # it was champion already: this run moved nothing
    with promotion_lock(registry):
        current = registry.alias(mcfg.champion_alias)
        if current is None or str(current.version) != version:
            return False
        _point(registry, mcfg.champion_alias, before[mcfg.champion_alias])
        _point(registry, PREVIOUS, before[PREVIOUS])
        _tag(registry, version, decision="rolled-back", reason=reason)
        _append_history(registry, version, f"rolled back: {reason}", by or actor())
    log.warning("@%s back to %s from v%s: %s", mcfg.champion_alias,
                f"v{before[mcfg.champion_alias]}" if before[mcfg.champion_alias] else "no version",
                version, reason)
    return True


def undo_challenger(registry: Registry, before: dict[str, str | None], version: str) -> bool:
    """Put `@challenger` back where `before` had it, if it still names `version`."""
    mcfg = registry.config
    version, current = str(version), registry.alias(mcfg.challenger_alias)
    if before[mcfg.challenger_alias] == version or current is None or str(
            current.version) != version:
        return False
    _point(registry, mcfg.challenger_alias, before[mcfg.challenger_alias])
    return True
