"""Print the papers' kind of table (mean ± std over seeds) of every commit and experiment DVC knows.

    python scripts/table.py                 # all commits and experiments (dvc exp show -A)
    python scripts/table.py exp_show.json   # from a saved `dvc exp show -A --json`
    python scripts/table.py --group-by classname base.model   # coarser rows

Runs with the same params (the group) and the same seed count once: the most recent one shown by DVC.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ahl.report import GROUP_BY, aggregate, format_table, runs_from_exp_show  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exp_show_json", nargs="?", help="a saved `dvc exp show -A --json` (default: run it)")
    parser.add_argument("--group-by", nargs="+", default=list(GROUP_BY), help="params.yaml keys of a row")
    args = parser.parse_args()
    if args.exp_show_json:
        data = json.loads(Path(args.exp_show_json).read_text())
    else:
        cmd = [sys.executable, "-m", "dvc", "exp", "show", "-A", "--json", "--no-pager"]
        data = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    print(format_table(aggregate(runs_from_exp_show(data), group_by=args.group_by)))


if __name__ == "__main__":
    main()
