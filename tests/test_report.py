"""The papers' table from runs: rows of dvc.api.exp_show -> mean ± std over seeds -> next to the published cell."""

from __future__ import annotations

import pytest

from ahl.core.spreadsheet import read_csv, write_csv
from ahl.evaluation.tables import aggregate, format_table, merge_runs, runs_from_rows, with_published


def _row(exp, rev, seed, auc, known_class=None, classname="elpv", m=10, unseen=None):
    """A row as dvc.api.exp_show gives it: numbers as floats, None as "None", clashing keys prefixed."""
    row = {
        "Experiment": exp, "rev": rev, "typ": "branch_commit", "Created": None,
        "results/metrics.json:classname": classname, "setting": "hard" if known_class else "general",
        "n_anomalies": float(m), "results/metrics.json:base.model": "dra",
        "base.auc_roc": auc, "base.auc_pr": auc, "base.seen_auc_roc": auc,
        "ahl.model": "AHL(dra)", "ahl.auc_roc": auc + 0.01, "ahl.auc_pr": auc, "ahl.seen_auc_roc": auc,
        "params.yaml:classname": classname, "seed": float(seed), "protocol.n_anomalies": float(m),
        "protocol.known_class": str(known_class), "params.yaml:base.model": "dra", "ahl.weighting": "psi",
        "backbone.name": "resnet18", "backbone.image_size": 448.0,
    }  # fmt: skip
    if unseen is not None:
        row["base.unseen_auc_roc"] = unseen
    return row


def test_mean_std_over_seeds_and_the_published_cell():
    rows = [
        {**_row(None, "workspace", 0, 0.5)},  # skipped: repeats a commit
        _row(None, "main", 0, 0.80, unseen=0.7),
        _row("exp-a", "e1", 1, 0.90),
        _row("exp-b", "e2", 1, 0.90),  # the same seed again: counted once
        {**_row("exp-c", "e3", 2, 0.5), "base.auc_roc": "!", "ahl.auc_roc": "-"},  # metrics DVC could not read
    ]
    runs = runs_from_rows(rows)
    assert len(runs) == 6 and set(runs["model"]) == {"DRA", "AHL(DRA)"}
    assert runs["ahl.weighting"].iloc[0] == "psi"
    table = with_published(aggregate(runs))
    dra = table[table["model"] == "DRA"].iloc[0]
    assert dra["seeds"] == [0, 1]
    assert dra["auc_roc_mean"] == pytest.approx(0.85) and dra["auc_roc_std"] == pytest.approx(0.05)
    assert dra["unseen_auc_roc_count"] == 1
    # AHL Table 1, ELPV, M = 10: DRA 0.843 ± 0.002 (AHL's rerun); DRA's own paper: 0.845 ± 0.013
    assert dra["published"] == 0.843 and dra["difference"] == pytest.approx(0.85 - 0.843)
    assert dra["published_in"] == "AHL Table 1 (AHL's rerun of the base model)"
    assert dra["base_paper"] == 0.845 and dra["base_paper_in"].startswith("DRA Table 1")
    assert table[table["model"] == "AHL(DRA)"].iloc[0]["published_in"] == "AHL Table 1"
    text = format_table(table)
    assert "| elpv | general | 10 | - | resnet18 | 448 |" in text and "0.850±0.050 |" in text and "+0.007 |" in text
    assert "| 0.843±0.002 | +0.007 | 0.845±0.013 |" in text


def test_hard_setting_rows_and_their_mean_over_known_classes():
    rows = [_row(None, f"r{k}{s}", s, auc, known_class=k) for k, auc in (("mono", 0.7), ("poly", 0.8)) for s in (0, 1)]
    table = with_published(aggregate(runs_from_rows(rows)))
    mean = table[(table["model"] == "AHL(DRA)") & (table["protocol.known_class"] == "mean")].iloc[0]
    assert mean["auc_roc_mean"] == pytest.approx(0.76)
    assert mean["published"] == 0.788  # AHL Table 2, ELPV hard, M = 10
    per_class = table[(table["model"] == "DRA") & (table["protocol.known_class"] == "mono")].iloc[0]
    assert per_class["auc_roc_mean"] == pytest.approx(0.7) and per_class.isna()["published"]


def test_ahls_edge_over_its_base_model_is_paired_by_run():
    """AHL - base per run (same seed, same base checkpoint), by hand: seed 0 +0.05, seed 1 -0.01, seed 2 +0.02."""
    rows = [_row(None, "r0", 0, 0.80), _row("e1", "e1", 1, 0.90), _row("e2", "e2", 2, 0.70)]
    for row, ahl in zip(rows, (0.85, 0.89, 0.72)):
        row["ahl.auc_roc"] = ahl
    table = with_published(aggregate(runs_from_rows(rows)))
    ahl = table[table["model"] == "AHL(DRA)"].iloc[0]
    edges = [0.05, -0.01, 0.02]
    assert ahl["edge_mean"] == pytest.approx(sum(edges) / 3)
    assert ahl["edge_std"] == pytest.approx(float(__import__("numpy").std(edges)))
    assert ahl["edge_wins"] == 2 and ahl["edge_count"] == 3
    assert table[table["model"] == "DRA"].iloc[0].isna()["edge_mean"]
    assert "| +0.020±0.024 (2 of 3 seeds higher) |" in format_table(table)


def test_unfinished_experiments_and_leftover_metrics_are_not_runs():
    """DVC lists a queued or running experiment with its baseline's metrics (another subset's, here brick's):
    such a row is not a run of the grid."""
    rows = [
        {**_row("ladder-a", "e1", 0, 0.80), "State": "Success"},
        {**_row("ladder-b", "e2", 1, 0.70, classname="brick"), "State": "Running", "params.yaml:classname": "elpv"},
        {**_row("ladder-c", "e3", 2, 0.70), "State": "Queued"},
        {**_row("ladder-d", "e4", 2, 0.70), "State": "Failed"},
        {**_row("ladder-e", "e5", 2, 0.70, classname="brick"), "State": "Success", "params.yaml:classname": "elpv"},
    ]
    runs = runs_from_rows(rows)
    assert sorted(set(runs["run"])) == ["ladder-a"]


def test_a_committed_runs_file_and_the_experiments_make_one_table(tmp_path):
    """The runs file keeps what DVC held once; a run DVC holds now replaces its saved rows; written and read back
    through the spreadsheet-safe CSV, a text cell that looks like a formula comes back as it was."""
    first = runs_from_rows([_row("e0", "r0", 0, 0.80), _row("e1", "r1", 1, 0.70)])
    first["note"] = "=1+1"
    write_csv(tmp_path / "runs.csv", first)
    saved = read_csv(tmp_path / "runs.csv")
    assert saved["note"].tolist() == ["=1+1"] * 4
    later = runs_from_rows([_row("e1", "r1b", 1, 0.90), _row("e2", "r2", 2, 0.60)])  # e1 rerun, e2 new
    runs = merge_runs(saved, later)
    assert sorted(zip(runs["run"], runs["model"], runs["auc_roc"])) == [
        ("e0", "AHL(DRA)", 0.81), ("e0", "DRA", 0.80), ("e1", "AHL(DRA)", 0.91), ("e1", "DRA", 0.90),
        ("e2", "AHL(DRA)", 0.61), ("e2", "DRA", 0.60),
    ]  # fmt: skip
    table = aggregate(runs)
    assert table[table["model"] == "DRA"].iloc[0]["auc_roc_mean"] == pytest.approx((0.80 + 0.90 + 0.60) / 3)
    assert table[table["model"] == "AHL(DRA)"].iloc[0]["edge_mean"] == pytest.approx(0.01)
    assert merge_runs(saved.iloc[0:0], later).equals(later) and merge_runs(saved, later.iloc[0:0]).equals(saved)


def test_cpu_hours_per_run_sum_every_stages_cost_file():
    """A run's cpu_h is the sum of its stages' cost files (results/cost/<stage>.json:cpu_s), the group's the mean
    over its seeds; the cost files are no params and a run without them has none. By hand: seed 0 spent
    1800 + 5400 s = 2.0 h, seed 1 3600 + 3600 s = 2.0 h, seed 2 720 + 0 s = 0.2 h: mean 1.4 h (seed 3 recorded
    no cost)."""
    rows = [_row(None, "r0", 0, 0.80), _row("e1", "e1", 1, 0.90), _row("e2", "e2", 2, 0.70), _row("e3", "e3", 3, 0.6)]
    for row, (base, ahl) in zip(rows, ((1800.0, 5400.0), (3600.0, 3600.0), (720.0, 0.0))):
        row.update({"results/cost/train_base.json:cpu_s": base, "results/cost/train_base.json:wall_s": base / 2,
                    "results/cost/train_ahl.json:cpu_s": ahl, "results/cost/train_ahl.json:wall_s": "-"})  # fmt: skip
    runs = runs_from_rows(rows)
    assert not [c for c in runs.columns if "cost" in c or c in ("cpu_s", "wall_s")]
    assert runs.groupby("run")["cpu_h"].first().dropna().to_dict() == pytest.approx({"r0": 2.0, "e1": 2.0, "e2": 0.2})
    assert runs[runs["run"] == "e3"]["cpu_h"].isna().all()
    table = aggregate(runs)
    assert table[table["model"] == "DRA"].iloc[0]["cpu_h"] == pytest.approx(1.4)
    assert format_table(table).splitlines()[0].endswith("| AHL - base (paired) | CPU h per run |")
    assert "| 1.40 |" in format_table(table)
