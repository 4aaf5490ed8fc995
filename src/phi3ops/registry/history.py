"""The registry as a user reads it: every version with its aliases, decision, key metric and
data; two versions side by side (metrics, config, data); one version's whole lineage.

    phi3ops models                 # one line per version, newest first
    phi3ops models diff 1 3        # what changed from v1 to v3
    phi3ops lineage --version 3    # which data, code, config and environment made v3
"""

from __future__ import annotations

import difflib
from datetime import UTC, datetime
from pathlib import Path

import yaml
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from phi3ops.config import DataConfig
from phi3ops.errors import ConfigError
from phi3ops.registry.client import Registry
from phi3ops.registry.promotion import history
from phi3ops.registry.store import version_metrics


def key_metric(registry: Registry, version: ModelVersion, metric: str) -> str:
    """The tuned model's score and its gain over the base with the 95% interval."""
    scores = version_metrics(registry, version)
    tuned, gain = scores.get(f"tuned_{metric}"), scores.get(f"delta_base_{metric}")
    if tuned is None:
        return "-"
    text = f"{tuned:.4f}"
    lo, hi = (scores.get(f"delta_base_{metric}_{end}") for end in ("lo", "hi"))
    if gain is not None and lo is not None and hi is not None:
        text += f" ({gain:+.4f} vs base, 95% CI {lo:+.4f}..{hi:+.4f})"
    return text


def list_versions(registry: Registry) -> list[dict]:
    """Each registered version, newest first, with what a user compares versions by."""
    client, mcfg = registry.client, registry.config
    found = client.search_model_versions(f"name='{mcfg.registered_model}'",
                                         order_by=["version_number DESC"])
    if not found:  # also: no registered model of that name yet
        return []
    aliases: dict[str, list[str]] = {}
    for alias, number in client.get_registered_model(mcfg.registered_model).aliases.items():
        aliases.setdefault(str(number), []).append(f"@{alias}")
    return [{
        "version": int(v.version), "aliases": sorted(aliases.get(str(v.version), [])),
        "decision": v.tags.get("promotion.decision", "undecided"),
        mcfg.promotion.metric: key_metric(registry, v, mcfg.promotion.metric),
        "data_md5": v.tags.get("phi3ops.dataset_md5", "?")[:12],
        "created": _when(v.creation_timestamp),
    } for v in found]


def table(rows: list[dict]) -> str:
    """Rows as aligned columns, the way `git log --oneline` users scan them."""
    if not rows:
        return "no registered versions yet: `phi3ops run` trains and registers one"
    cells = [[str(k) for k in rows[0]]] + [
        [" ".join(v) if isinstance(v, list) else str(v) for v in row.values()] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in cells)


def _version(registry: Registry, number: str) -> ModelVersion:
    try:
        return registry.client.get_model_version(registry.model, str(number))
    except MlflowException:
        raise ConfigError(f"{registry.model} has no version {number}: `phi3ops models` "
                          "lists the versions") from None


def _config_yaml(registry: Registry, version: ModelVersion) -> list[str]:
    """The resolved pipeline config its run logged (config.yaml), as lines."""
    run_id = version.tags.get("phi3ops.run_id") or version.run_id
    text = registry.read_text(f"runs:/{run_id}/config.yaml")
    return yaml.safe_dump(yaml.safe_load(text), sort_keys=True).splitlines()


def diff(registry: Registry, a: str, b: str, root: Path, data_cfg: DataConfig) -> str:
    """Metrics (with intervals), the config diff and the data diff of two versions."""
    from phi3ops.data.drift import diff_dirs
    from phi3ops.data.versions import checkout_version

    va, vb = _version(registry, a), _version(registry, b)
    metric = registry.config.promotion.metric
    out = [f"# {registry.model} v{va.version} -> v{vb.version}", "",
           f"{metric}: v{va.version} {key_metric(registry, va, metric)}",
           f"{' ' * len(metric)}  v{vb.version} {key_metric(registry, vb, metric)}",
           f"decision: v{va.version} {va.tags.get('promotion.decision', 'undecided')}, "
           f"v{vb.version} {vb.tags.get('promotion.decision', 'undecided')}", "", "## config"]
    config = list(difflib.unified_diff(_config_yaml(registry, va), _config_yaml(registry, vb),
                                       f"v{va.version}",
                                       f"v{vb.version}", lineterm="", n=1))
    out += config or ["the same resolved config"]
    out += ["", "## data"]
    md5s = [v.tags.get("phi3ops.dataset_md5") for v in (va, vb)]
    if md5s[0] == md5s[1]:
        out.append(f"the same dataset ({md5s[0]})")
    else:
        revs = [v.tags["phi3ops.data_git_rev"] for v in (va, vb)]
        a_dir, b_dir = (Path(checkout_version(root, data_cfg, rev).path) for rev in revs)
        out.append(diff_dirs(a_dir, b_dir, f"v{va.version}", f"v{vb.version}").markdown())
    return "\n".join(out)


def lineage(registry: Registry, number: str) -> dict:
    """What made one version and what happened to it since: data, code, config, run,
    environment, metrics with intervals, and its alias history."""
    client = registry.client
    version = _version(registry, number)
    tags = version.tags
    run_id = tags.get("phi3ops.run_id") or version.run_id
    run = client.get_run(run_id)
    aliases = [f"@{a}" for a, v in client.get_registered_model(
        registry.model).aliases.items() if str(v) == str(version.version)]
    root = client.get_model_version_download_uri(version.name, version.version)
    scores = version_metrics(registry, version)
    return {
        "version": int(version.version), "aliases": sorted(aliases),
        "decision": tags.get("promotion.decision", "undecided"),
        "reason": tags.get("promotion.reason", ""),
        "data": {"md5": tags.get("phi3ops.dataset_md5"),
                 "git_rev": tags.get("phi3ops.data_git_rev"),
                 "asked_rev": run.data.tags.get("phi3ops.data_rev"),
                 "rows": {k.removeprefix("data_n_"): int(v) for k, v in run.data.metrics.items()
                          if k.startswith("data_n_")}},
        "code": {"git_rev": tags.get("phi3ops.code_git_rev"),
                 "hash": tags.get("phi3ops.code_hash")},
        "config": {"hash": tags.get("phi3ops.config_hash"),
                   "resolved": "\n".join(_config_yaml(registry, version))},
        "run": {"id": run_id, "name": run.info.run_name, "status": run.info.status,
                "parent": run.data.tags.get("mlflow.parentRunId"),
                "started": _when(run.info.start_time)},
        "environment": {"lock": run.data.tags.get("phi3ops.env_lock"), "requirements":
                        registry.read_text(f"{root}/requirements.txt").split()},
        "metrics": {m: scores[m] for m in sorted(scores)},
        "history": history(version),
    }


def _when(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")


def render_lineage(found: dict, metric: str) -> str:
    """The lineage as text: one fact per line, metrics with their 95% intervals."""
    data, code, run, env = found["data"], found["code"], found["run"], found["environment"]
    scores = found["metrics"]
    lines = [f"v{found['version']} {' '.join(found['aliases'])}".rstrip(),
             f"  decision: {found['decision']}: {found['reason']}",
             f"  data:     DVC md5 {data['md5']} at git {data['git_rev']} "
             f"(asked: {data['asked_rev']})",
             "            " + ", ".join(f"{n} {k}" for k, n in data["rows"].items()),
             f"  code:     git {code['git_rev']}, hash {(code['hash'] or '?')[:16]}",
             f"  config:   hash {found['config']['hash']} (resolved YAML below)",
             f"  run:      {run['id']} ({run['name']}, {run['status']}, {run['started']}"
             + (f", parent {run['parent']})" if run["parent"] else ")"),
             f"  env:      requirements.lock {(env['lock'] or '?')[:16]}; the model needs "
             + " ".join(env["requirements"]), "  metrics:"]
    for name in sorted(k for k in scores if k.startswith("tuned_")):
        base = name.removeprefix("tuned_")
        row = f"    {base:12s} tuned {scores[name]:.4f}"
        for other in ("base", "champion"):
            key = f"delta_{other}_{base}"
            if key in scores:
                row += (f", {scores[key]:+.4f} vs {other} (95% CI {scores[key + '_lo']:+.4f}.."
                        f"{scores[key + '_hi']:+.4f})")
        lines.append(row + ("  <- the policy's metric" if base == metric else ""))
    lines += ["  history:"] + [f"    {entry}" for entry in found["history"]]
    lines += ["  config (resolved):"] + [f"    {line}" for line in
                                          found["config"]["resolved"].splitlines()]
    return "\n".join(lines)
