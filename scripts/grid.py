"""The papers' grid on a scheduler: one `dvc exp run` per cell, each in its own clone, pushed to the shared
remotes; resubmission runs only the cells no remote holds yet.

    python scripts/grid.py submit grid.yaml          # sbatch --array of the cells not done (docs/cluster.md)
    python scripts/grid.py submit grid.yaml --print  # write the batch script and cells.json, submit nothing
    python scripts/grid.py status grid.yaml          # done / incomplete / queued / running / failed / unknown /
                                                     # missing, per cell (docs/cluster.md)
    python scripts/grid.py cell CELLS.json INDEX     # run one cell (what each array task runs; any scheduler)
    python scripts/grid.py queue grid.yaml           # no scheduler: the cells into this clone's DVC queue

grid.yaml (``-S key=a,b`` on the command line adds or replaces a list, as `dvc exp run -S` reads it):

    name: table1                      # the experiments are named table1-<cell>-<hash of the cell's params>
    grid:                             # every combination of these values is one cell
      classname: [carpet, grid]
      seed: [0, 1, 2]
      protocol.n_anomalies: [10, 1]
      base.model: [dra, devnet]
      budget:                         # not a param: named sets of params, a cell takes one whole
        - {name: short}
        - {name: long, base.epochs: 30, base.steps_per_epoch: 20}
    set: {}                           # params every cell sets (dotted keys)
    remote: origin                    # the shared git remote; the DVC remote is .dvc/config's default
    slurm: {partition: gpu, gpus: 1, cpus_per_task: 8, mem: 32G, time: "08:00:00", max_parallel: 16,
            sbatch: [], setup: [". ~/venvs/ahl/bin/activate"]}
    workdir: ${TMPDIR:-/tmp}/ahl-grid  # where a task clones the repository (node-local disk is best)

The submitting clone keeps its bookkeeping under .grid/NAME/ (git-ignored): the batch scripts, jobs.json, the
Slurm logs and each cell's state file. Without a shared filesystem, logs and state files stay on the nodes; what
is done is still known from the git remote, and what is queued or running from squeue.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402
from grid_spec import check_keys_exist, expand, load_grid, set_args  # noqa: E402
from grid_state import Ledger, done_on_remote, git, remote_url  # noqa: E402

from ahl.core.errors import UserError  # noqa: E402
from ahl.core.io import atomic_path, write_json  # noqa: E402

# --------------------------------------------------------------------------------------------------------------
# submit / status

STATES = ("done", "incomplete", "queued", "running", "failed", "unknown", "missing")


def context(args) -> tuple[Path, dict, list[dict], str, str]:
    repo = Path(args.repo).resolve()
    grid = load_grid(Path(args.grid), args.set or [])
    check_keys_exist(grid, yaml.safe_load((repo / "params.yaml").read_text()), Path(args.grid))
    commit = git("rev-parse", "HEAD", cwd=repo).stdout.strip()
    return repo, grid, expand(grid), commit, remote_url(repo, grid["remote"])


def batch_script(grid: dict, ledger: Ledger, cells: list[dict], url: str, commit: str, python: str) -> str:
    """One self-contained sbatch script: the cells' JSON travels inside it, so a node needs no shared disk."""
    slurm = grid["slurm"]
    lines = ["#!/bin/bash", f"#SBATCH --job-name={grid['name']}",
             f"#SBATCH --array=0-{len(cells) - 1}" + (f"%{slurm['max_parallel']}" if slurm.get("max_parallel") else ""),
             f"#SBATCH --output={ledger.dir / 'logs'}/%A_%a.log"]  # fmt: skip
    for key, flag in (("partition", "partition"), ("account", "account"), ("gpus", "gpus"),
                      ("cpus_per_task", "cpus-per-task"), ("mem", "mem"), ("time", "time")):  # fmt: skip
        if slurm.get(key) is not None:
            lines.append(f"#SBATCH --{flag}={slurm[key]}")
    lines += [f"#SBATCH {extra}" for extra in slurm.get("sbatch", [])]
    lines += ["set -euo pipefail", *slurm.get("setup", [])]
    payload = {"grid": grid["name"], "commit": commit, "url": url, "ledger": str(ledger.dir), "cells": cells}
    names = " ".join(shlex.quote(c["name"]) for c in cells)
    lines += [
        'cells="$(mktemp)"',
        "trap 'rm -f \"$cells\"' EXIT",
        "cat > \"$cells\" <<'AHL_GRID_CELLS'",
        json.dumps(payload),
        "AHL_GRID_CELLS",
        f"names=({names})",
        f'work="{grid["workdir"]}/{grid["name"]}/${{names[$SLURM_ARRAY_TASK_ID]}}"  # grid.yaml workdir',
        'mkdir -p "$(dirname "$work")"',
        'exec 9>>"$work.lock"  # held by this task (and the cell it runs) until it ends, however it ends',
        'if ! flock -n 9; then',
        '  echo "$work is in use by another live task (its lock $work.lock is held: $(cat "$work.lock"));'
        ' not touching it" >&2',
        "  exit 75",
        "fi",
        'echo "job ${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-local}}_${SLURM_ARRAY_TASK_ID} on $(hostname)" > "$work.lock"',
        'rm -rf "$work"  # what a killed earlier attempt left: no live task holds it',
        f'git clone -q --no-checkout {shlex.quote(url)} "$work"',
        f'git -C "$work" checkout -q --detach {commit}',
        f'{shlex.quote(python)} "$work/scripts/grid.py" cell "$cells" "$SLURM_ARRAY_TASK_ID" --work "$work"',
    ]
    return "\n".join(lines) + "\n"


def submit(args) -> int:
    repo, grid, cells, commit, url = context(args)
    if git("status", "--porcelain", "--untracked-files=no", cwd=repo).stdout.strip():
        raise UserError("the work tree has uncommitted changes: each cell runs the committed code and params, so "
                        "commit (and push) them first")  # fmt: skip
    git("fetch", "-q", grid["remote"], cwd=repo, check=False)  # its remote-tracking branches, for --contains
    if not git("branch", "-r", "--contains", commit, cwd=repo, check=False).stdout.strip() and git(
        "ls-remote", url, cwd=repo).stdout.find(commit) < 0:  # fmt: skip
        raise UserError(f"commit {commit[:10]} is not on the git remote {grid['remote']}: git push {grid['remote']} "
                        "HEAD (each task clones it from there)")  # fmt: skip
    ledger = Ledger(repo, grid["name"], grid["remote"])
    states = ledger.states(cells, url, commit)
    wanted = {"missing", "incomplete", "failed"} if args.retry_failed else {"missing", "incomplete"}
    todo = [c for c in cells if states[c["name"]][0] in wanted]  # never an unknown one: it may still run
    counts = {s: sum(1 for v in states.values() if v[0] == s) for s in STATES}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    if not todo:
        print(f"nothing to submit: {summary or 'no cells'}" + (" (--retry-failed reruns the failed)"
                                                             if counts["failed"] else "")  # fmt: skip
              + (" (unknown: squeue cannot say whether they still run; they are never resubmitted)"
                 if counts["unknown"] else ""))  # fmt: skip
        return 0
    (ledger.dir / "logs").mkdir(parents=True, exist_ok=True)
    (ledger.dir / "state").mkdir(exist_ok=True)
    script = ledger.dir / f"batch-{time.strftime('%Y%m%d-%H%M%S')}-{commit[:8]}.sh"
    with atomic_path(script) as tmp:
        tmp.write_text(batch_script(grid, ledger, todo, url, commit, args.python))
    if args.print:
        print(f"{len(todo)} cell(s) to run: {script}\n  sbatch {script}\n"
              f"  or any scheduler: bash {script} with SLURM_ARRAY_TASK_ID=0..{len(todo) - 1}")  # fmt: skip
        return 0
    found = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if found.returncode:
        raise UserError(f"sbatch refused {script}: {found.stderr.strip()}")
    job = found.stdout.strip().split(";")[0]
    with atomic_path(ledger.jobs_file) as tmp:
        tmp.write_text(json.dumps(ledger.jobs() + [{"job": job, "commit": commit, "script": str(script),
                                                    "cells": [c["name"] for c in todo]}], indent=1))  # fmt: skip
    print(f"submitted job {job}: {len(todo)} cell(s)" + (f"; skipped {summary}" if summary else ""))
    for index, cell in enumerate(todo):
        print(f"  {job}_{index}  {cell['name']}")
    return 0


def status(args) -> int:
    repo, grid, cells, commit, url = context(args)
    ledger = Ledger(repo, grid["name"], grid["remote"])
    states = ledger.states(cells, url, commit)
    width = max(len(c["name"]) for c in cells)
    for cell in cells:
        state, detail = states[cell["name"]]
        print(f"{cell['name']:<{width}}  {state:<10} {detail}")
    for name in ledger.others(cells, grid["name"]):
        print(f"{name:<{width}}  (another version of this grid: its params are none of these cells')")
    counts = [f"{sum(1 for s, _ in states.values() if s == k)} {k}" for k in STATES]
    print(f"commit {commit[:10]}: " + ", ".join(counts))
    return 0 if all(s == "done" for s, _ in states.values()) else 1


def queue(args) -> int:
    """The cells into the local DVC queue (``dvc exp run --queue``), skipping those queued, running or done (an
    experiment of that name on any commit): run it again after an interruption and only the rest is queued."""
    repo = Path(args.repo).resolve()
    grid = load_grid(Path(args.grid), args.set or [])
    check_keys_exist(grid, yaml.safe_load((repo / "params.yaml").read_text()), Path(args.grid))
    dvc = [sys.executable, "-m", "dvc"]
    listed = subprocess.run([*dvc, "exp", "list", "--all-commits", "--name-only"], cwd=repo, capture_output=True,
                            text=True)  # fmt: skip
    queued = subprocess.run([*dvc, "queue", "status"], cwd=repo, capture_output=True, text=True)
    if listed.returncode or queued.returncode:
        raise UserError(f"dvc cannot list the experiments here: {(listed.stderr or queued.stderr).strip()}")
    done = set(listed.stdout.split())
    waiting = {line.split()[1] for line in queued.stdout.splitlines()
               if len(line.split()) >= 4 and line.split()[-1] in ("Queued", "Running")}  # fmt: skip
    todo = [c for c in expand(grid) if c["name"] not in done | waiting]
    for cell in todo:
        step = [*dvc, "exp", "run", "--queue", "-n", cell["name"], *set_args(cell["params"])]
        found = subprocess.run(step, cwd=repo, capture_output=True, text=True)
        if found.returncode:
            raise UserError(f"{shlex.join(step[2:])} failed: {found.stderr.strip()}")
        print(f"queued {cell['name']}")
    skipped = len(expand(grid)) - len(todo)
    print(f"{len(todo)} cell(s) queued, {skipped} already done, queued or running; run them with: dvc queue start")
    return 0


# --------------------------------------------------------------------------------------------------------------
# cell: one task, under any scheduler


def record(payload: dict, index: int, state: str, **extra) -> None:
    """Cell ``index``'s state file in the submitting clone's ledger, where it is reachable (a shared filesystem);
    else nothing (status then goes by the git remote and squeue)."""
    ledger, job = Path(payload["ledger"]), os.environ.get("SLURM_ARRAY_JOB_ID", os.environ.get("SLURM_JOB_ID", "local"))
    try:
        path = ledger / "state" / f"{payload['cells'][index]['name']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"state": state, "commit": payload["commit"], "host": socket.gethostname(), "job": job,
                          "log": str(ledger / "logs" / f"{job}_{index}.log"),
                          "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra})  # fmt: skip
    except OSError:
        pass


def run_cell(args) -> int:
    try:
        payload = json.loads(Path(args.cells).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{args.cells}: not a cells file ({exc}); submit --print writes one into its batch script")
    index = int(args.index)
    if not 0 <= index < len(payload["cells"]):
        raise UserError(f"{args.cells}: no cell {index} (it has {len(payload['cells'])})")
    cell, commit, url = payload["cells"][index], payload["commit"], payload["url"]
    name = cell["name"]
    cloned = args.work is not None
    work = Path(args.work) if cloned else Path(os.environ.get("TMPDIR", "/tmp")) / "ahl-grid" / payload["grid"] / name
    record(payload, index, "running", workdir=str(work))
    started = time.monotonic()
    print(f"{name}: commit {commit[:10]} in {work} on {socket.gethostname()}", flush=True)
    if not cloned:
        work.parent.mkdir(parents=True, exist_ok=True)
        lock = open(f"{work}.lock", "a")  # noqa: SIM115 (held until this process ends, as the batch script's)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{work} is in use by another live task (its lock {work}.lock is held); not touching it")
        shutil.rmtree(work, ignore_errors=True)  # what a killed earlier attempt left: no live task holds it
        for step in (["git", "clone", "-q", "--no-checkout", url, str(work)],
                     ["git", "-C", str(work), "checkout", "-q", "--detach", commit]):  # fmt: skip
            if not _step(step, work, payload, index, name):
                return 1
    done, _ = done_on_remote(work, url, commit, {name})
    if name in done:
        print(f"{name}: already done (its ref on the git remote, its data in the DVC remote), nothing to do")
        record(payload, index, "done")
        return 0
    dvc = [sys.executable, "-m", "dvc"]
    # What other cells ran on identical inputs comes from DVC's run cache on the DVC remote: its entries first
    # (`selection` names a stage with no cached outputs, so nothing else is fetched), then `--pull` restores a
    # stage whose deps, params and command match an entry instead of running it ("Stage ... is cached").
    fetched = subprocess.run([*dvc, "fetch", "--run-cache", "selection"], cwd=work).returncode
    if fetched:
        print(f"{name}: could not fetch the run cache (exit {fetched}); every stage runs", flush=True)
    for step in (
        [*dvc, "exp", "run", "--pull", "-n", name, *set_args(cell["params"])],
        # the experiment's refs to git and its outputs to the DVC remote (--force: over an incomplete earlier push)
        [*dvc, "exp", "push", "--force", "origin", name],
        [*dvc, "push", "--run-cache", "selection"],  # this cell's stages, for the cells after it
    ):  # fmt: skip
        if not _step(step, work, payload, index, name):
            return 1
    record(payload, index, "done")
    shutil.rmtree(work, ignore_errors=True)
    print(f"{name}: done, pushed; the cell took {time.monotonic() - started:.1f} s")
    return 0


def _step(step: list[str], work: Path, payload: dict, index: int, name: str) -> bool:
    print("+ " + shlex.join(step), flush=True)
    code = subprocess.run(step, cwd=work if step[0] != "git" else None).returncode
    if code:
        record(payload, index, "failed", exit=code, step=shlex.join(step[:5]))
        print(f"{name}: FAILED (exit {code}) at: {shlex.join(step)}", file=sys.stderr)
    return code == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, func in (("submit", submit), ("status", status), ("queue", queue)):
        sub = commands.add_parser(name, help=f"{name} a grid")
        sub.add_argument("grid", help="the grid's YAML file")
        sub.add_argument("-S", "--set", action="append", help="key=a,b: a list of values (adds or replaces)")
        sub.add_argument("--repo", default=".", help="the submitting clone (default: .)")
        sub.set_defaults(func=func)
        if name == "submit":
            sub.add_argument("--retry-failed", action="store_true", help="also run the cells that failed")
            sub.add_argument("--print", action="store_true", help="write the batch script; do not call sbatch")
            sub.add_argument("--python", default="python", help="the tasks' python (default: python on PATH)")
    cell = commands.add_parser("cell", help="run one cell (what an array task runs)")
    cell.add_argument("cells", help="cells.json (inside the batch script)")
    cell.add_argument("index", help="the cell's index ($SLURM_ARRAY_TASK_ID)")
    cell.add_argument(
        "--work",
        help="the clone to run in, already at the commit (the batch script makes it); "
        "without it, a clone under $TMPDIR/ahl-grid",
    )
    cell.set_defaults(func=run_cell)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
