"""Aggregation of runs into mean ± std tables, from the shape of `dvc exp show --json`."""

from __future__ import annotations

import pytest

from ahl.report import aggregate, format_table, runs_from_exp_show


def _node(name, rev, seed, model, auc, unseen=None):
    metrics = {"model": model, "auc_roc": auc, "auc_pr": auc, "seen_auc_roc": auc}
    if unseen is not None:
        metrics["unseen_auc_roc"] = unseen
    params = {"classname": "brick", "seed": seed, "protocol": {"n_anomalies": 5, "known_class": None}, "base": {"model": model}}
    return {
        "rev": rev, "name": name,
        "data": {"rev": rev, "params": {"params.yaml": {"data": params}},
                 "metrics": {"results/metrics.json": {"data": {"base": metrics, "ahl": {**metrics, "model": f"AHL({model})"}}}}},
    }


def test_aggregate_mean_std_over_seeds():
    data = [
        {**_node("main", "c0", 0, "dra", 0.9), "experiments": [
            {"revs": [_node("exp-a", "e1", 1, "dra", 0.8, unseen=0.7)]},
            {"revs": [_node("exp-b", "e2", 1, "dra", 0.8, unseen=0.7)]},  # same seed again: counted once
        ]},
        {"rev": "workspace", "name": "workspace", "data": {}},
    ]
    runs = runs_from_exp_show(data)
    assert sorted(r[0] for r in runs) == ["exp-a", "exp-b", "main"]
    rows = aggregate(runs, group_by=("classname", "protocol.n_anomalies", "protocol.known_class", "base.model"))
    dra = next(r for r in rows if r["model"] == "dra")
    assert dra["seeds"] == [0, 1]
    assert dra["auc_roc"] == pytest.approx((0.85, 0.05, 2))
    assert dra["unseen_auc_roc"] == pytest.approx((0.7, 0.0, 1))
    table = format_table(rows)
    assert "| brick | 5 | None | dra | AHL(dra) | [0, 1] | 0.850±0.050 |" in table
