"""What is known of a grid's cells: the git remote (done), Slurm's queue (queued, running) and the cells' own
state files in the submitting clone's .grid/NAME/ (failed, with the log)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from ahl.core.errors import UserError  # noqa: E402


def git(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, check=check, capture_output=True, text=True)


def remote_url(repo: Path, remote: str) -> str:
    found = git("remote", "get-url", remote, cwd=repo, check=False)
    if found.returncode:
        raise UserError(f"git remote {remote!r} is not configured here: git remote add {remote} URL (the shared one)")
    url = found.stdout.strip()
    local = Path(url).expanduser()
    return str((repo / local).resolve()) if "://" not in url and ":" not in url.split("/")[0] else url


def done_on_remote(url: str, commit: str) -> set[str]:
    """Names of the experiments of baseline ``commit`` the git remote holds (DVC keeps an experiment under
    refs/exps/<2 hex>/<38 hex>/<name>, the hex being its baseline commit)."""
    found = subprocess.run(["git", "ls-remote", url, "refs/exps/*"], capture_output=True, text=True)
    if found.returncode:
        raise UserError(f"cannot read the git remote {url}: {found.stderr.strip()}")
    names = set()
    for line in found.stdout.splitlines():
        parts = line.split("\t")[-1].split("/")
        if len(parts) == 5 and parts[2] + parts[3] == commit:
            names.add(parts[4])
    return names


def squeue_states(job_ids: list[str]) -> dict[str, str]:
    """{'<job>_<task>': PENDING | RUNNING | ...} of the array tasks Slurm still knows; {} without squeue."""
    if not job_ids or shutil.which("squeue") is None:
        return {}
    found = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", "%i %T"], capture_output=True,
                           text=True)  # fmt: skip
    return dict(line.split()[:2] for line in found.stdout.splitlines() if len(line.split()) >= 2)


# The bookkeeping of one grid in the submitting clone: .grid/NAME/


class Ledger:
    def __init__(self, repo: Path, name: str):
        self.dir = repo / ".grid" / name
        self.jobs_file = self.dir / "jobs.json"

    def jobs(self) -> list[dict]:
        return json.loads(self.jobs_file.read_text()) if self.jobs_file.is_file() else []

    def state(self, cell: str) -> dict | None:
        path = self.dir / "state" / f"{cell}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def states(self, cells: list[dict], url: str, commit: str) -> dict[str, tuple[str, str]]:
        """{cell: (done | queued | running | failed | missing, detail)}: the git remote first, then Slurm's
        queue for the submissions of this commit, then the cells' own state files."""
        done = done_on_remote(url, commit)
        jobs = [j for j in self.jobs() if j["commit"] == commit]
        queue = squeue_states([j["job"] for j in jobs])
        where: dict[str, tuple[str, int]] = {}  # cell -> its latest (job, array index)
        for job in jobs:
            for index, name in enumerate(job["cells"]):
                where[name] = (job["job"], index)
        out = {}
        for cell in cells:
            name = cell["name"]
            if name in done:
                out[name] = ("done", "on the git remote")
                continue
            job, index = where.get(name, (None, None))
            slurm = queue.get(f"{job}_{index}") if job else None
            if slurm is None and job and queue.get(job, "").startswith(("PENDING", "RUNNING")):
                slurm = queue[job]  # a pending array shows as one line <job>_[0-2]
            state = self.state(name)
            log = str(self.dir / "logs" / f"{job}_{index}.log") if job else ""
            if slurm in ("PENDING", "CONFIGURING", "REQUEUED", "RESV_DEL_HOLD", "SUSPENDED"):
                out[name] = ("queued", f"job {job}_{index}")
            elif slurm in ("RUNNING", "COMPLETING"):
                out[name] = ("running", f"job {job}_{index}, log {log}")
            elif state and state.get("state") == "failed" and state.get("commit") == commit:
                out[name] = ("failed", f"exit {state.get('exit')} on {state.get('host')}, log {state.get('log')}")
            elif job:  # Slurm no longer lists it, it did not finish and left no failure behind: killed
                out[name] = ("failed", f"job {job}_{index} ended without pushing (killed?), log {log}")
            else:
                out[name] = ("missing", "never submitted for this commit")
        return out
