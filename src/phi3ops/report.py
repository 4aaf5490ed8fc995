"""What a retrain run tells its user: the summary, the nothing-changed note, the failure report.

Markdown for the flow's Prefect artifacts and the dict the flow returns; no Prefect here.
"""

from __future__ import annotations

from mlflow.entities.model_registry import ModelVersion

from phi3ops.config import MlflowConfig
from phi3ops.errors import safe_uri
from phi3ops.registry import promotion
from phi3ops.steps import Run


def nothing_changed(run: Run, same: ModelVersion, dataset_md5: str) -> tuple[dict, str]:
    """What a run says when its data, config and code made a version already (training would
    repeat it): the flow's result and the markdown of its summary."""
    reason = (f"nothing changed since v{same.version} (data, config and code are the same; it "
              f"was {same.tags['promotion.decision']}: {same.tags.get('promotion.reason', '')})")
    markdown = (f"# retrain {run.cfg.name}: nothing changed\n\n{reason}; no training. Change the "
                "data (`phi3ops data add`), the config or the code, or run with `--force`.\n")
    return {"run_id": run.run_id, "skipped": True, "version": int(same.version), "promoted": False,
            "reason": reason, "dataset_md5": dataset_md5}, markdown


def standing_decision(version: ModelVersion, champion: str | None) -> promotion.PromotionDecision:
    """A rerun found its version registered and decided: that decision stands."""
    return promotion.PromotionDecision(
        version.version, False, f"v{version.version} holds this data, config and code already "
        f"and was {version.tags['promotion.decision']}; left as it is", champion)


def aliases_note(before: dict[str, str | None] | None,
                 now: dict[str, str | None] | Exception | None) -> str:
    """For the failure report: are the aliases where they were before the run? `now` is what
    reading them back gave (an exception when that failed too)."""
    if before is None:
        return " No alias moved."
    if isinstance(now, Exception):  # the report must not hide the failure it reports
        return f" Could not read the aliases back ({type(now).__name__}); check them."
    if now == before:
        return " Registration and promotion were rolled back: the aliases are where they were."
    return (f" The aliases moved during the run: now {now}, before {before}; check them "
            "(`phi3ops promote --rollback`).")


def failure(run: Run, stage: str, error: BaseException,
            aliases_before: dict[str, str | None] | None,
            aliases_now: dict[str, str | None] | Exception | None) -> str:
    return (f"# retrain {run.cfg.name} failed in `{stage}`\n\n```\n{type(error).__name__}: "
            f"{error}\n```\n\nMLflow run `{run.run_id}` is marked FAILED."
            + aliases_note(aliases_before, aliases_now) + "\n")


def summary(run: Run, version: ModelVersion, decision: promotion.PromotionDecision, prepared,
            trained, metrics: dict[str, float]) -> tuple[dict, str]:
    """The flow's result and the markdown of `retrain-summary`."""
    name, mcfg, run_id = run.cfg.name, run.registry.config, run.run_id
    metric, prep = mcfg.promotion.metric, prepared.prep
    scored = " | ".join(f"{m} {metrics[f'{m}_{metric}']:.4f}"
                        for m in ("base", "tuned", "champion") if f"{m}_{metric}" in metrics)
    gains = "".join(
        f"\n- tuned - {other}: {metrics[key]:+.4f} "
        f"(95% CI {metrics[key + '_lo']:+.4f} .. {metrics[key + '_hi']:+.4f})"
        for other in ("base", "champion") if (key := f"delta_{other}_{metric}") in metrics)
    result = {
        "run_id": run_id, "version": int(version.version), "promoted": decision.promoted,
        "reason": decision.reason, "dataset_md5": prepared.dataset.md5, "metrics": metrics,
        "train_loss": trained.train_loss, "resumed_from": trained.resumed_from,
        "rows_accepted": prep.n_accepted, "rows_quarantined": prep.n_rejected,
    }
    markdown = (
        f"# retrain {name}\n\n"
        f"- data: `{prepared.dataset.md5}` ({prep.n_accepted} rows accepted, "
        f"{prep.n_rejected} quarantined)\n"
        f"- MLflow run `{run_id}`, model `{mcfg.registered_model}` v{version.version}\n"
        f"- {metric}: {scored}{gains}\n"
        f"- promotion: {'promoted' if decision.promoted else 'not promoted'}: "
        f"{decision.reason}\n")
    return result, markdown


def brief(result: dict, mcfg: MlflowConfig, experiment_id: str) -> str:
    """What `phi3ops run` prints at the end: the decision, the key metric with its interval,
    and where to look; `--json` prints the whole result instead."""
    # The URI may carry user:password (a team's server behind basic auth): never on screen.
    ui = (safe_uri(mcfg.tracking_uri) if mcfg.tracking_uri.startswith("http")
          else "http://127.0.0.1:5000")
    where = f"{ui}/#/experiments/{experiment_id}/runs/{result['run_id']}"
    if not mcfg.tracking_uri.startswith("http"):
        where += " (after `make ui`)"
    name = mcfg.registered_model
    if result.get("skipped"):
        return f"{name}: {result['reason']}\n  MLflow run: {where}"
    metric, m = mcfg.promotion.metric, result["metrics"]
    gains = "".join(f", {m[k]:+.4f} vs {other} (95% CI {m[k + '_lo']:+.4f}..{m[k + '_hi']:+.4f})"
                    for other in ("base", "champion") if (k := f"delta_{other}_{metric}") in m)
    return "\n".join([
        f"{name} v{result['version']}: {'promoted' if result['promoted'] else 'not promoted'}"
        f" ({result['reason']})",
        f"  {metric}: {m[f'tuned_{metric}']:.4f}{gains}",
        f"  data: {result['dataset_md5']} ({result['rows_accepted']} rows, "
        f"{result['rows_quarantined']} quarantined)",
        f"  MLflow run: {where}",
    ])
