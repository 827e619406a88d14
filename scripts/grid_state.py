"""What is known of a grid's cells: the remotes (done: the experiment's ref on the git remote and every output it
records in the DVC remote; incomplete: the ref without all of its data), Slurm's queue (queued, running; unknown
when squeue cannot say) and the cells' own state files in the submitting clone's .grid/NAME/ (failed, with the
log)."""

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


def refs_on_remote(url: str, commit: str) -> dict[str, str]:
    """{name: experiment commit} of the experiments of baseline ``commit`` the git remote holds (DVC keeps an
    experiment under refs/exps/<2 hex>/<38 hex>/<name>, the hex being its baseline commit)."""
    found = subprocess.run(["git", "ls-remote", url, "refs/exps/*"], capture_output=True, text=True)
    if found.returncode:
        raise UserError(f"cannot read the git remote {url}: {found.stderr.strip()}")
    refs = {}
    for line in found.stdout.splitlines():
        sha, _, ref = line.partition("\t")
        parts = ref.split("/")
        if len(parts) == 5 and parts[2] + parts[3] == commit:
            refs[parts[4]] = sha
    return refs


def missing_data(repo: Path, url: str, refs: dict[str, str]) -> dict[str, int]:
    """{name: how many of its outputs the DVC remote lacks} of the experiments ``refs`` ({name: commit}), asked of
    DVC itself: the outputs each experiment's dvc.lock records (DVC's used objects of that commit, directories
    included) against the default DVC remote (DVC's cloud status). The commits are fetched from the git remote
    first (refs only, no data)."""
    if not refs:
        return {}
    specs = [f"+{sha}:refs/ahl-grid/{name}" for name, sha in refs.items()]
    fetched = subprocess.run(["git", "fetch", "-q", url, *specs], cwd=repo, capture_output=True, text=True)
    if fetched.returncode:
        raise UserError(f"cannot fetch the experiments from {url}: {fetched.stderr.strip()}")
    from dvc.repo import Repo  # the grid's bookkeeping asks DVC; the library (ahl/) never imports it

    from dvc.exceptions import DvcException

    out = {}
    with Repo(str(repo)) as dvc:
        remote = dvc.cloud.get_remote_odb(None, "status")
        for name, sha in refs.items():
            lacking: set[str] = set()
            try:
                for _ in dvc.brancher(revs=[sha], workspace=False):
                    # every output's own object: a directory's .dir listing, which DVC uploads after its files
                    # (DVC's used objects skip a directory whose listing this clone's cache lacks)
                    for stage in dvc.index.stages:
                        for o in stage.outs:
                            if o.use_cache and o.hash_info and not remote.exists(o.hash_info.value):
                                lacking.add(o.hash_info.value)
                    for odb, objs in dvc.index.used_objs(force=True, push=True).items():
                        if odb is None:  # this project's own outputs (not imports from other repositories)
                            status = dvc.cloud.status(objs)
                            lacking |= {h.value for h in (*status.new, *status.missing)}
            except (DvcException, OSError) as exc:
                raise UserError(f"cannot check {name}'s outputs against the DVC remote: {exc}") from None
            out[name] = len(lacking)
    return out


def done_on_remote(
    repo: Path, url: str, commit: str, names: set[str], refs: dict[str, str] | None = None
) -> tuple[set[str], dict[str, int]]:
    """(the done cells, {incomplete cell: objects missing from the DVC remote}) among the experiments ``names``
    of baseline ``commit`` (only those are checked: other grids' experiments of the commit are not this one's);
    ``refs``: refs_on_remote's answer when the caller has it already."""
    refs = {n: sha for n, sha in (refs if refs is not None else refs_on_remote(url, commit)).items() if n in names}
    lacking = missing_data(repo, url, refs)
    return {n for n in refs if not lacking[n]}, {n: k for n, k in lacking.items() if k}


SQUEUE_TIMEOUT_S = 120  # squeue retries an unreachable controller for about a minute


def squeue_states(job_ids: list[str]) -> tuple[dict[str, str], str | None]:
    """({'<job>_<task>': PENDING | RUNNING | ...} of the array tasks Slurm still knows, None), or ({}, why not)
    when squeue is missing or fails: then nobody knows whether a submitted cell still runs."""
    if not job_ids:
        return {}, None
    if shutil.which("squeue") is None:
        return {}, "not found on PATH"
    try:
        found = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", "%i %T"], capture_output=True,
                               text=True, timeout=SQUEUE_TIMEOUT_S)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {}, f"no answer within {SQUEUE_TIMEOUT_S} s"
    if found.returncode and "Invalid job id" in found.stderr:
        return {}, None  # Slurm has forgotten the job (MinJobAge after it ended): none of its tasks is queued
    if found.returncode:
        why = (found.stderr.strip().splitlines() or [f"exit {found.returncode}"])[-1]
        return {}, f"exit {found.returncode}: {why}"
    return dict(line.split()[:2] for line in found.stdout.splitlines() if len(line.split()) >= 2), None


# The bookkeeping of one grid in the submitting clone: .grid/NAME/


class Ledger:
    def __init__(self, repo: Path, name: str, remote: str = "origin"):
        self.repo, self.remote, self.refs = repo, remote, {}
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
        """{cell: (done | incomplete | queued | running | failed | unknown | missing, detail)}: the remotes first,
        then Slurm's queue for the submissions of this commit, then the cells' own state files."""
        self.refs = refs_on_remote(url, commit)  # others() reads them too: one ls-remote per status
        done, incomplete = done_on_remote(self.repo, url, commit, {c["name"] for c in cells}, self.refs)
        jobs = [j for j in self.jobs() if j["commit"] == commit]
        queue, unknown = squeue_states([j["job"] for j in jobs])
        where: dict[str, tuple[str, int]] = {}  # cell -> its latest (job, array index)
        for job in jobs:
            for index, name in enumerate(job["cells"]):
                where[name] = (job["job"], index)
        out = {}
        for cell in cells:
            name = cell["name"]
            job, index = where.get(name, (None, None))
            slurm = queue.get(f"{job}_{index}") if job else None
            if slurm is None and job and queue.get(job, "").startswith(("PENDING", "RUNNING")):
                slurm = queue[job]  # a pending array shows as one line <job>_[0-2]
            state = self.state(name)
            failed = bool(state and state.get("state") == "failed" and state.get("commit") == commit)
            log = str(self.dir / "logs" / f"{job}_{index}.log") if job else ""
            if name in done:
                out[name] = ("done", "its ref on the git remote, its data in the DVC remote")
            elif slurm in ("PENDING", "CONFIGURING", "REQUEUED", "RESV_DEL_HOLD", "SUSPENDED"):
                out[name] = ("queued", f"job {job}_{index}")
            elif slurm in ("RUNNING", "COMPLETING"):
                out[name] = ("running", f"job {job}_{index}, log {log}")
            elif job and unknown:  # it may still run (its push may be under way): never resubmitted
                out[name] = ("unknown", f"(squeue: {unknown}) job {job}_{index}, log {log}")
            elif name in incomplete and not (failed and "exp push" not in str(state.get("step"))):
                out[name] = ("incomplete", f"its ref is on the git remote but {incomplete[name]} of its output "
                             f"objects are not in the DVC remote: `dvc exp push {self.remote} {name}` where it ran, "
                             "or submit runs it again")  # fmt: skip
            elif failed:
                out[name] = ("failed", f"exit {state.get('exit')} on {state.get('host')}, log {state.get('log')}")
            elif job:  # Slurm no longer lists it, it did not finish and left no failure behind: killed
                out[name] = ("failed", f"job {job}_{index} ended without pushing (killed?), log {log}")
            else:
                out[name] = ("missing", "never submitted for this commit")
        return out

    def others(self, cells: list[dict], prefix: str) -> list[str]:
        """Experiments of this grid's name on the git remote for the commit ``states`` read that are none of its
        cells: made by another version of the grid file (other params, so another name)."""
        names = {c["name"] for c in cells}
        return sorted(n for n in self.refs if n.startswith(f"{prefix}-") and n not in names)
