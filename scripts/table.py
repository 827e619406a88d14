"""Print the papers' kind of table (mean ± std over seeds) of every commit and experiment DVC knows, next to the
published figure of the same cell (docs/published.csv) and the difference.

    python scripts/table.py                                # the commits up to HEAD and their experiments
    python scripts/table.py --group-by classname setting protocol.n_anomalies protocol.known_class
    python scripts/table.py --csv table.csv                # also write the table as CSV
    python scripts/table.py --match ladder- --runs results/ladder_runs.csv --csv results/ladder.csv
                         # the experiments named ladder-*, kept run by run in a committed file: the file's runs
                         # and DVC's together (DVC's replace the file's), written back, then the table from them

Runs with the same params (the group) and the same seed count once: the most recent one DVC lists.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ahl.core.spreadsheet import read_csv, write_csv  # noqa: E402
from ahl.evaluation.tables import (  # noqa: E402
    GROUP_BY, aggregate, format_table, merge_runs, runs_from_rows, with_published,
)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group-by", nargs="+", default=list(GROUP_BY), help="params of a row (dotted names)")
    parser.add_argument("--csv", help="also write the table to this CSV file")
    parser.add_argument("--repo", default=".", help="the DVC repository (default: .)")
    parser.add_argument("--num", type=int, default=1000, help="commits back from HEAD, with their experiments")
    parser.add_argument("--match", help="only the experiments whose name starts with this (e.g. ladder-)")
    parser.add_argument("--runs", help="a CSV of runs (one row per run and model), read and written back")
    args = parser.parse_args()
    import dvc.api

    rows = dvc.api.exp_show(repo=args.repo, num=args.num)
    if args.match:
        rows = [r for r in rows if str(r.get("Experiment") or "").startswith(args.match)]
    runs = runs_from_rows(rows)
    if args.runs:
        saved = read_csv(args.runs) if Path(args.runs).is_file() else runs.iloc[0:0]
        runs = merge_runs(saved, runs)
        if not runs.empty:
            first = [c for c in ("run", "model", "seed", "auc_roc", "rev") if c in runs.columns]
            write_csv(args.runs, runs[first + [c for c in runs.columns if c not in first]])
    if runs.empty:
        print("(no runs with metrics)")
        return
    table = with_published(aggregate(runs, group_by=args.group_by))
    print(format_table(table))
    if args.csv:
        write_csv(args.csv, table)  # spreadsheet-safe, atomic


if __name__ == "__main__":
    main()
