"""The papers' grid on a real Slurm (scripts/grid.py, docs/cluster.md): a single-node cluster from Debian's
slurm-wlm and munge, started here and stopped afterwards; 3 tiny cells (one with a bad param) submitted against a
bare git remote and a DVC remote in folders; the good ones pulled into a fresh clone with their metrics, the bad
one reported failed with its log, and the resubmission running nothing."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, Repo, tiny_params

sys.path.insert(0, str(ROOT / "scripts"))
import grid_spec as G  # noqa: E402

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue")
pytestmark = [
    pytest.mark.pipeline,
    pytest.mark.skipif(
        any(shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists() for d in DAEMONS) or os.geteuid() != 0,
        reason="needs root and Debian's slurm-wlm and munge (.ci/run: apt-get install slurm-wlm munge)",
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _daemon(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


@pytest.fixture
def slurm():
    """A one-node Slurm (slurmctld + slurmd, munge authentication) in a temporary folder, its daemons run in the
    foreground as children of this test so that they stop with it, whatever happens. Yields the environment
    that points sbatch, squeue and sacct at it."""
    root = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))  # short: the munge socket path has a length limit
    root.chmod(0o755)  # munged wants its socket's folder reachable by every client
    host = socket.gethostname().split(".")[0]
    (root / "state").mkdir()
    (root / "spool").mkdir()
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    conf = root / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=ahltest",
                f"SlurmctldHost={host}(127.0.0.1)",  # whether or not the host name resolves
                "SlurmUser=root",
                f"SlurmctldPort={_free_port()}",
                f"SlurmdPort={_free_port()}",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                f"AuthInfo=socket={root}/munge.sock",
                f"StateSaveLocation={root}/state",
                f"SlurmdSpoolDir={root}/spool",
                f"SlurmctldPidFile={root}/slurmctld.pid",
                f"SlurmdPidFile={root}/slurmd.pid",
                f"SlurmctldLogFile={root}/slurmctld.log",
                f"SlurmdLogFile={root}/slurmd.log",
                "ProctrackType=proctrack/linuxproc",  # no cgroups in a container
                "TaskPlugin=task/none",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                "JobCompType=jobcomp/filetxt",  # sacct -c reads it: accounting without slurmdbd
                f"JobCompLoc={root}/jobcomp.txt",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "ReturnToService=2",
                "MpiDefault=none",
                "MinJobAge=2",  # slurmctld forgets an ended job after 2 s (default 300): squeue -j then says
                # "Invalid job id", which status must read as "not queued", not as squeue failing
                f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=4000 State=UNKNOWN",
                "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            ]
        )
        + "\n"
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    procs = []
    try:
        procs.append(subprocess.Popen([_daemon("munged"), "-F", "--force", f"--key-file={key}",
                                       f"--socket={root}/munge.sock", f"--pid-file={root}/munged.pid",
                                       f"--log-file={root}/munged.log", f"--seed-file={root}/munge.seed"]))  # fmt: skip
        _wait(lambda: (root / "munge.sock").exists(), 20, "munged did not start")
        procs.append(subprocess.Popen([_daemon("slurmctld"), "-D", "-i", "-f", str(conf)], env=env))
        procs.append(subprocess.Popen([_daemon("slurmd"), "-D", "-f", str(conf)], env=env))

        def idle() -> bool:
            found = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True)
            return found.stdout.strip() == "idle"

        _wait(idle, 60, f"the node did not come up: {root}/slurmctld.log, {root}/slurmd.log")
        yield env
    finally:
        subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True, timeout=30)
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(root, ignore_errors=True)


def _wait(ready, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.5)


def _grid(repo: Repo, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/grid.py", *args], cwd=repo.path, env=env, capture_output=True,
                          text=True)  # fmt: skip


def _lab(slurm: dict, tmp_path: Path, grid: dict) -> Repo:
    """The tiny project with ``grid`` committed and pushed to a bare git remote, and a DVC remote in a folder, as a
    team sets them up once (README "Scale"); its env points sbatch and squeue at ``slurm``."""
    repo = Repo(tmp_path / "lab", tiny_params())
    repo.env = {**repo.env, **slurm, "DVC_NO_ANALYTICS": "1"}
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    repo.dvc("remote", "add", "-d", "shared", str(tmp_path / "dvc-remote"))
    (repo.path / "grid.yaml").write_text(yaml.safe_dump(grid))
    repo.git("add", "-A")
    repo.git("commit", "-qm", "the grid")
    repo.git("remote", "add", "origin", str(origin))
    repo.git("push", "-q", "origin", "HEAD:refs/heads/main")
    subprocess.run(["git", "symbolic-ref", "HEAD", "refs/heads/main"], cwd=origin, check=True)
    return repo


def _submit(repo: Repo) -> tuple[str, str]:
    """`grid.py submit`: (its output, the job id sbatch gave)."""
    submitted = _grid(repo, repo.env, "submit", "grid.yaml")
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout, submitted.stdout.split("submitted job ")[1].split(":")[0]


def test_a_grid_of_three_cells_on_slurm_one_bad_then_resubmitted(slurm, tmp_path):
    env = {**slurm, "DVC_NO_ANALYTICS": "1"}
    grid = {"name": "t3", "grid": {"seed": [0, 1, -1]}, "slurm": {"cpus_per_task": 1}, "workdir": str(tmp_path / "w")}
    repo = _lab(slurm, tmp_path, grid)
    origin = tmp_path / "origin.git"

    started = time.monotonic()
    out, job = _submit(repo)
    assert "submitted job" in out and "3 cell(s)" in out, out
    print(out)
    seen = set()

    def finished() -> bool:
        queue = subprocess.run(["squeue", "-h", "-r", "-j", job, "-o", "%i %T %j"], env=env, capture_output=True,
                               text=True).stdout  # fmt: skip
        for line in queue.splitlines():
            if line not in seen:
                seen.add(line)
                print("squeue:", line)
        return queue.strip() == ""

    _wait(finished, 1200, "the array did not finish within 20 minutes")
    print(f"array finished in {time.monotonic() - started:.0f} s")
    print(subprocess.run(["sacct", "-c", "-o", "JobID,JobName,State,ExitCode,End"], env=env,
                         capture_output=True, text=True).stdout)  # fmt: skip

    status = _grid(repo, repo.env, "status", "grid.yaml")
    print(status.stdout)
    lines = {line.split()[0].rsplit("-", 1)[0]: line.split()[1] for line in status.stdout.splitlines()[:-1]}
    assert lines == {"t3-seed0": "done", "t3-seed1": "done", "t3-seed-1": "failed"}, status.stdout + status.stderr
    names = {c["name"].rsplit("-", 1)[0]: c["name"] for c in G.expand(G.load_grid(repo.path / "grid.yaml", []))}
    assert status.returncode == 1  # not all done
    failed = next(line for line in status.stdout.splitlines() if line.startswith(names["t3-seed-1"]))
    log = Path(failed.split("log ")[-1])
    assert log.is_file() and "seed = -1" in log.read_text(), failed  # the stage's one-line error, in its log

    again = _grid(repo, repo.env, "submit", "grid.yaml")
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("nothing to submit: 2 done, 1 failed"), again.stdout
    assert len(json.loads((repo.path / ".grid/t3/jobs.json").read_text())) == 1  # no second job

    fresh = tmp_path / "fresh"
    subprocess.run(["git", "clone", "-q", str(origin), str(fresh)], env=repo.env, check=True)
    other = Repo.existing(fresh, repo.env)
    other.dvc("exp", "pull", "origin", names["t3-seed0"], names["t3-seed1"])
    shown = json.loads(other.dvc("exp", "show", "--json").stdout)
    auc = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                metrics = (data.get("metrics") or {}).get("results/metrics.json", {}).get("data", {})
                auc[rev.get("name")] = metrics.get("ahl", {}).get("auc_roc")
    good = (names["t3-seed0"], names["t3-seed1"])
    assert set(auc) >= set(good) and all(0 <= auc[n] <= 1 for n in good), auc
    table = subprocess.run([sys.executable, str(fresh / "scripts/table.py")], cwd=fresh, env=repo.env,
                           capture_output=True, text=True)  # fmt: skip
    print(table.stdout)
    assert table.returncode == 0, table.stderr
    rows = [line for line in table.stdout.splitlines() if "[0, 1]" in line]  # the row of seeds 0 and 1
    assert len(rows) == 2 and all("±" in row for row in rows), table.stdout  # base and AHL: mean ± std


def test_a_killed_cell_is_reported_failed_and_rerun_only_when_asked(slurm, tmp_path):
    """A task killed mid-run (scancel: what a dying node looks like to the scheduler) left no result behind: status
    names it failed with its log; submit skips it until --retry-failed."""
    repo = _lab(slurm, tmp_path, {"name": "k", "grid": {"seed": [5]}, "workdir": str(tmp_path)})
    _, job = _submit(repo)
    (cell,) = G.expand(G.load_grid(repo.path / "grid.yaml", []))
    state = repo.path / f".grid/k/state/{cell['name']}.json"
    _wait(lambda: state.is_file(), 120, "the cell did not start")
    assert "running" in _grid(repo, repo.env, "status", "grid.yaml").stdout
    subprocess.run(["scancel", job], env=repo.env, check=True)
    _wait(lambda: not subprocess.run(["squeue", "-h", "-j", job], env=repo.env, capture_output=True,
                                     text=True).stdout.strip(), 60, "scancel did not end the task")  # fmt: skip
    _wait(lambda: "Invalid job id" in subprocess.run(["squeue", "-h", "-j", job], env=repo.env, capture_output=True,
                                                     text=True).stderr, 120, "slurmctld kept the job")  # fmt: skip
    status = _grid(repo, repo.env, "status", "grid.yaml")
    print(status.stdout)
    assert f"{cell['name']}  failed     job " in status.stdout and "ended without pushing" in status.stdout, status.stdout
    assert _grid(repo, repo.env, "submit", "grid.yaml").stdout.startswith("nothing to submit: 1 failed")
    retry = _grid(repo, repo.env, "submit", "grid.yaml", "--retry-failed", "--print")
    assert "1 cell(s) to run" in retry.stdout, retry.stdout + retry.stderr


def test_cells_that_differ_in_an_ahl_param_share_the_stages_before_it_through_dvcs_run_cache(slurm, tmp_path):
    """Three cells of one class and seed that differ only in ahl.epochs, one after the other (max_parallel 1): the
    first runs every stage; the second and third restore download, convert, split, train_base and features from
    DVC's run cache on the DVC remote (their logs say so) and run selection (which reads every param) and the
    stages after features."""
    grid = {"name": "rc", "grid": {"ahl.epochs": [1, 2, 3]}, "set": {"seed": 0},
            "slurm": {"cpus_per_task": 1, "max_parallel": 1}, "workdir": str(tmp_path / "w")}  # fmt: skip
    repo = _lab(slurm, tmp_path, grid)
    _, job = _submit(repo)
    _wait(lambda: not subprocess.run(["squeue", "-h", "-j", job], env=repo.env, capture_output=True,
                                     text=True).stdout.strip(), 1800, "the array did not finish")  # fmt: skip
    status = _grid(repo, repo.env, "status", "grid.yaml")
    assert status.returncode == 0, status.stdout + status.stderr  # all done
    stages = ("selection", "download", "convert", "split", "train_base", "features", "train_ahl", "calibrate",
              "evaluate")  # fmt: skip
    ran, cached, seconds = [], [], []
    for index in range(3):
        log = (repo.path / ".grid/rc/logs" / f"{job}_{index}.log").read_text()
        ran.append({s for s in stages if f"Running stage '{s}'" in log})
        cached.append({s for s in stages if f"Stage '{s}' is cached - skipping run" in log})
        seconds.append(float(log.rsplit("cell took ", 1)[1].split(" s")[0]))
        print(f"cell {index}: ran {sorted(ran[-1])}, from the run cache {sorted(cached[-1])}, {seconds[-1]:.0f} s")
    assert ran[0] == set(stages) and cached[0] == set()
    # selection checks every param (ahl's too), so its inputs differ and it runs again, writing the same file; split
    # on (its output now cached: was cache: false, which the run cache cannot restore in another clone) is restored
    for index in (1, 2):
        assert cached[index] == {"download", "convert", "split", "train_base", "features"}, (ran, cached)
        assert ran[index] == {"selection", "train_ahl", "calibrate", "evaluate"}, (ran, cached)
