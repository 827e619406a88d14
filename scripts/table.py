"""Print the papers' kind of table (mean ± std over seeds) of every commit and experiment DVC knows.

    python scripts/table.py                 # all commits and experiments (dvc exp show -A)
    python scripts/table.py exp_show.json   # from a saved `dvc exp show -A --json`
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ahl.report import aggregate, format_table, runs_from_exp_show  # noqa: E402


def main() -> None:
    if len(sys.argv) > 1:
        data = json.loads(Path(sys.argv[1]).read_text())
    else:
        cmd = [sys.executable, "-m", "dvc", "exp", "show", "-A", "--json", "--no-pager"]
        data = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    print(format_table(aggregate(runs_from_exp_show(data))))


if __name__ == "__main__":
    main()
