"""Aggregate runs (params + metrics) into the papers' kind of table: mean ± std over seeds per group."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

METRICS = ("auc_roc", "auc_pr", "seen_auc_roc", "unseen_auc_roc")
# A row = one combination of these params (and the model); seeds are what is averaged. The AHL switches are
# part of the group so that the ablation's variants never mix with the full method.
GROUP_BY = (
    "classname", "protocol.n_anomalies", "protocol.known_class", "backbone.name", "backbone.image_size",
    "base.model", "ahl.hadg.random_clusters", "ahl.weighting", "ahl.cdl",
)


def lookup(tree: dict, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def runs_from_exp_show(data: Any) -> list[tuple[str, dict, dict]]:
    """(name, params, metrics) of every commit and experiment in ``dvc exp show --json`` output."""
    runs: dict[str, tuple[str, dict, dict]] = {}

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for n in node:
                walk(n)
            return
        if not isinstance(node, dict):
            return
        d = node.get("data") or {}
        params = lookup(d, "params") or {}
        metrics = lookup(d, "metrics") or {}
        p = (params.get("params.yaml") or {}).get("data")
        m = (metrics.get("results/metrics.json") or {}).get("data")
        if p and m and d.get("rev") not in runs and node.get("name") != "workspace":
            runs[d.get("rev")] = (node.get("name") or str(d.get("rev"))[:7], p, m)
        for child in (node.get("experiments") or []) + (node.get("revs") or []):
            walk(child)

    walk(data)
    return list(runs.values())


def aggregate(
    runs: Iterable[tuple[str, dict, dict]], group_by: Sequence[str] = GROUP_BY, metrics: Sequence[str] = METRICS
) -> list[dict]:
    """One row per (group, model) with mean, std and the seeds of every metric; duplicate seeds count once."""
    groups: dict[tuple, dict[int, dict]] = {}
    for _, params, result in runs:
        for key in ("base", "ahl"):
            if key not in result:
                continue
            group = tuple(lookup(params, g) for g in group_by) + (result[key].get("model", key),)
            groups.setdefault(group, {})[params.get("seed")] = result[key]
    rows = []
    for group, by_seed in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        row: dict[str, Any] = dict(zip([*group_by, "model"], group))
        row["seeds"] = sorted(by_seed)
        for m in metrics:
            values = [r[m] for r in by_seed.values() if r.get(m) is not None]
            row[m] = (float(np.mean(values)), float(np.std(values)), len(values)) if values else None
        rows.append(row)
    return rows


def format_table(rows: list[dict], metrics: Sequence[str] = METRICS) -> str:
    """A Markdown table; each metric as mean±std (population std over the seeds, as the papers report)."""
    if not rows:
        return "(no runs with metrics)"
    keys = [k for k in rows[0] if k not in metrics]
    lines = ["| " + " | ".join(keys + list(metrics)) + " |", "|" + "---|" * (len(keys) + len(metrics))]
    for row in rows:
        cells = [str(row[k]) for k in keys]
        cells += ["-" if row[m] is None else f"{row[m][0]:.3f}±{row[m][1]:.3f}" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
