"""The papers' kind of table from many runs: mean ± std over seeds per group, next to the published figure.

Input: the rows of ``dvc.api.exp_show()`` (one per commit or experiment; params and metrics as flat columns).
This module does not import dvc: scripts/table.py calls DVC and hands the rows over.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from ahl.core.layout import COST_DIR
from ahl.core.layout import METRICS as METRICS_FILE

METRICS = ("auc_roc", "auc_pr", "seen_auc_roc", "unseen_auc_roc")
# A row = one combination of these params and the model; seeds are what is averaged. The AHL switches are part
# of the group so that the ablation's variants never mix with the full method.
# The training budget is part of it too, so that the rungs of a budget ladder (grids/elpv_ladder.yaml) stay apart.
GROUP_BY = (
    "classname", "setting", "protocol.n_anomalies", "protocol.known_class", "backbone.name", "backbone.image_size",
    "ahl.hadg.random_clusters", "ahl.weighting", "ahl.cdl", "base.epochs", "base.steps_per_epoch", "base.batch_size",
    "ahl.epochs", "ahl.steps_per_epoch", "ahl.batch_size",
)  # fmt: skip
# Our model names -> the papers' column names.
PAPER_MODEL = {"dra": "DRA", "devnet": "DevNet", "AHL(dra)": "AHL(DRA)", "AHL(devnet)": "AHL(DevNet)"}
# exp_show's State: None for a commit, "Success" for a finished experiment (else Queued, Running, Failed).
FINISHED = (None, "Success")
PUBLISHED = Path(__file__).resolve().parents[2] / "docs" / "published.csv"


def _value(v: Any) -> Any:
    """dvc.api.exp_show gives every number as float, None as "None", and "-" / "!" where a value is absent or
    could not be read; undo that."""
    if v in ("None", "-", "!"):
        return None
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


# What the metrics file holds (per model under "base." and "ahl.", and at the top level); every other column of
# dvc.api.exp_show is a param (a key both files hold comes prefixed with its file name).
MODEL_KEYS = ("model", "auc_roc", "auc_pr", "seen_auc_roc", "seen_auc_pr", "unseen_auc_roc", "unseen_auc_pr")
TOP_KEYS = ("classname", "setting", "n_anomalies", "seen_classes")
COST_KEYS = ("cpu_s", "wall_s")  # what a stage's cost file holds (ahl/core/layout.py, COST_DIR)


def _split(row: dict, metrics_file: str) -> tuple[dict, dict, float | None]:
    """A row's params, its metrics, and the CPU seconds of all its stages (their cost files; None without)."""
    params, metrics, cpu = {}, {}, None
    for key, value in row.items():
        if key in ("Experiment", "rev", "typ", "Created", "parent", "State", "Executor"):
            continue
        file, _, name = key.rpartition(":")
        if file.startswith(f"{COST_DIR}/") or (file == "" and name in COST_KEYS):
            if name == "cpu_s" and _number(_value(value)) is not None:
                cpu = (cpu or 0.0) + float(value)
            continue
        head, _, rest = name.partition(".")
        is_metric = file == metrics_file or (
            file == ""
            and ((head in ("base", "ahl") and (rest in MODEL_KEYS or rest.startswith(("per_class", "n_test"))))
                 or name in TOP_KEYS[1:])
        )  # fmt: skip
        (metrics if is_metric else params)[name] = _value(value)
    return params, metrics, cpu


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def runs_from_rows(rows: Iterable[dict], metrics_file: str = METRICS_FILE) -> pd.DataFrame:
    """One row per run and model (base, AHL): the run's params (dotted names), its setting, model, metrics and
    ``cpu_h``, the CPU hours of the whole run (the sum of its stages' cost files; a stage DVC restored from its run
    cache counts what the run that made its outputs spent).

    Skipped: the workspace row (it repeats a commit or the last experiment); an experiment that has not finished
    (queued, running, failed: DVC shows it with its baseline's metrics); a row whose metrics belong to another
    subset than its params (metrics left over from another run).
    """
    out = []
    for row in rows:
        if row.get("rev") == "workspace" or row.get("State") not in FINISHED:
            continue
        params, metrics, cpu = _split(row, metrics_file)
        if metrics.get("classname") is not None and params.get("classname") not in (None, metrics["classname"]):
            continue
        for model in ("base", "ahl"):
            if metrics.get(f"{model}.auc_roc") is None:
                continue
            name = metrics[f"{model}.model"]
            entry = {**params, "run": row.get("Experiment") or row.get("rev"), "rev": row.get("rev"),
                     "setting": metrics.get("setting")}  # fmt: skip
            entry["model"] = PAPER_MODEL.get(name, name)
            entry["cpu_h"] = None if cpu is None else cpu / 3600  # the whole run's, every stage's cost file
            entry.update({m: _number(metrics.get(f"{model}.{m}")) for m in METRICS})
            out.append(entry)
    return pd.DataFrame(out)


def merge_runs(saved: pd.DataFrame, live: pd.DataFrame) -> pd.DataFrame:
    """The runs of a committed runs file (``saved``) and those DVC holds now (``live``) as one frame: a run DVC
    holds replaces the saved rows of the same run and model, so the file grows as experiments finish, and the
    table rebuilds from it where the experiments are gone (another machine, a fresh clone)."""
    if saved.empty or live.empty:
        return live if saved.empty else saved
    held = pd.MultiIndex.from_frame(live[["run", "model"]])
    kept = saved[~pd.MultiIndex.from_frame(saved[["run", "model"]]).isin(held)]
    return pd.concat([kept, live], ignore_index=True).sort_values(["run", "model"], ignore_index=True)


def aggregate(runs: pd.DataFrame, group_by: Sequence[str] = GROUP_BY, metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """mean, std (population, as the papers report) and n over seeds of every metric, per group and model; a
    seed repeated within a group counts once (the last run listed). Hard-setting groups also get a row
    ``known_class = "mean"``: the mean over known classes of the per-class means, as the papers' Table 2."""
    keys = [g for g in group_by if g in runs.columns] + ["model"]
    runs = runs.astype({k: object for k in keys}).fillna({k: "-" for k in keys})
    edges = paired_edges(runs, keys)  # before dropping repeated seeds: each AHL run keeps its own base model
    runs = runs.drop_duplicates(subset=[*keys, "seed"], keep="first")
    table = runs.groupby(keys, dropna=False)[list(metrics)].agg(["mean", lambda x: float(np.std(x.dropna())), "count"])
    table.columns = [f"{m}_{stat if stat != '<lambda_0>' else 'std'}" for m, stat in table.columns]
    table["seeds"] = runs.groupby(keys, dropna=False)["seed"].apply(lambda s: sorted(s.tolist()))
    if "cpu_h" in runs.columns:  # the mean over the seeds that recorded it
        table["cpu_h"] = pd.to_numeric(runs["cpu_h"], errors="coerce").groupby(
            [runs[k] for k in keys], dropna=False).mean()  # fmt: skip
    table = table.reset_index().merge(edges, on=keys, how="left")
    if "protocol.known_class" in keys:
        hard = table[table["setting"] == "hard"]
        if len(hard):
            others = [k for k in keys if k != "protocol.known_class"]
            means = hard.groupby(others, dropna=False)[[f"{m}_mean" for m in metrics]].mean().reset_index()
            means["protocol.known_class"] = "mean"
            table = pd.concat([table, means], ignore_index=True)
    return table


def paired_edges(runs: pd.DataFrame, keys: Sequence[str], metric: str = "auc_roc") -> pd.DataFrame:
    """AHL's edge over its base model, paired: per AHL run, AHL's ``metric`` minus the base model's of the same
    run (one commit or experiment, ``rev``: it trains the base model and AHL on its checkpoint, with one seed); a
    seed run more than once counts once (the first listed, as ``aggregate`` does); per group and model the mean,
    the std (population) over seeds, the seeds where AHL is higher, and their count."""
    is_ahl = runs["model"].astype(str).str.startswith("AHL(")
    base = runs[~is_ahl].drop_duplicates(subset="rev").set_index("rev")[metric]
    ahl = runs[is_ahl].copy()
    ahl["edge"] = ahl[metric] - ahl["rev"].map(base)
    ahl = ahl.dropna(subset=["edge"]).drop_duplicates(subset=[*keys, "seed"], keep="first")
    if ahl.empty:
        return pd.DataFrame(columns=[*keys, "edge_mean", "edge_std", "edge_wins", "edge_count"])
    grouped = ahl.groupby(list(keys), dropna=False)["edge"]
    return pd.DataFrame({
        "edge_mean": grouped.mean(), "edge_std": grouped.agg(lambda x: float(np.std(x.dropna()))),
        "edge_wins": grouped.agg(lambda x: int((x > 0).sum())), "edge_count": grouped.count(),
    }).reset_index()  # fmt: skip


def with_published(table: pd.DataFrame, published: Path | str = PUBLISHED) -> pd.DataFrame:
    """Add the published AUC-ROC (mean, std, source) of the same cell and our mean minus it.

    A cell: classname, setting, M and model; in the hard setting only the papers' mean over known classes.
    ``published`` is AHL's table (for DRA and DevNet: AHL's rerun of them, its source says so); where the base
    model's own paper reports the cell (DRA Table 1), ``base_paper`` holds that figure too."""
    pub = pd.read_csv(published)
    pub["known_class"] = pub["known_class"].fillna("-")
    table = table.copy()
    keys = {"classname": "classname", "setting": "setting", "protocol.n_anomalies": "m", "model": "model"}
    if not set(keys) <= set(table.columns):
        return table
    known = table["protocol.known_class"] if "protocol.known_class" in table.columns else "-"
    table["_known"] = np.where(table["setting"] == "hard", known, "-")
    pub = pub.rename(columns={"m": "protocol.n_anomalies", "known_class": "_known", "auc_roc": "published",
                              "auc_roc_std": "published_std", "source": "published_in"})  # fmt: skip
    on = ["classname", "setting", "protocol.n_anomalies", "model", "_known"]
    own = pub["published_in"].str.startswith("DRA ")
    merged = table.merge(pub[~own], how="left", on=on)
    base_paper = pub[own].rename(columns={"published": "base_paper", "published_std": "base_paper_std",
                                          "published_in": "base_paper_in"})  # fmt: skip
    merged = merged.merge(base_paper, how="left", on=on)
    merged["difference"] = merged["auc_roc_mean"] - merged["published"]
    return merged.drop(columns="_known")


def format_table(table: pd.DataFrame, metrics: Sequence[str] = METRICS) -> str:
    """A Markdown table; each metric as mean±std, with the published AUC-ROC and the difference when known."""
    if table.empty:
        return "(no runs with metrics)"
    stats = {f"{m}_{s}" for m in metrics for s in ("mean", "std", "count")}
    extra = {"published", "published_std", "published_in", "difference", "edge_mean", "edge_std", "edge_wins",
             "edge_count", "base_paper", "base_paper_std", "base_paper_in", "cpu_h"}  # fmt: skip
    keys = [c for c in table.columns if c not in stats | extra]
    header = keys + list(metrics) + (["published", "difference"] if "published" in table.columns else [])
    header += ["base model's paper"] if "base_paper" in table.columns else []
    header += ["AHL - base (paired)"] if "edge_mean" in table.columns else []
    header += ["CPU h per run"] if "cpu_h" in table.columns else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in table.iterrows():
        cells = [str(row[k]) for k in keys]
        for m in metrics:
            mean, std = row.get(f"{m}_mean"), row.get(f"{m}_std")
            cells.append("-" if pd.isna(mean) else f"{mean:.3f}" + ("" if pd.isna(std) else f"±{std:.3f}"))
        if "published" in table.columns:
            pub, sd = row["published"], row["published_std"]
            cells.append("-" if pd.isna(pub) else f"{pub:.3f}" + ("" if pd.isna(sd) else f"±{sd:.3f}"))
            cells.append("-" if pd.isna(row["difference"]) else f"{row['difference']:+.3f}")
        if "base_paper" in table.columns:
            pub, sd = row["base_paper"], row["base_paper_std"]
            cells.append("-" if pd.isna(pub) else f"{pub:.3f}" + ("" if pd.isna(sd) else f"±{sd:.3f}"))
        if "edge_mean" in table.columns:
            cells.append("-" if pd.isna(row["edge_mean"]) else f"{row['edge_mean']:+.3f}±{row['edge_std']:.3f} "
                         f"({int(row['edge_wins'])} of {int(row['edge_count'])} seeds higher)")  # fmt: skip
        if "cpu_h" in table.columns:
            cells.append("-" if pd.isna(row["cpu_h"]) else f"{row['cpu_h']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
