"""scripts/grid.py without a scheduler: the grid file's checks (one line each), the cells' names and -S values,
the refusals before anything is queued, and the self-contained batch script (tests/test_slurm.py runs it on Slurm)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, Repo, tiny_params

sys.path.insert(0, str(ROOT / "scripts"))

import grid_spec as G  # noqa: E402

from ahl.core.errors import UserError  # noqa: E402


def write(tmp_path, text: str):
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: t\ngrid: {seed: [0]}\nqueue: x\n", "unknown key(s) ['queue']"),
        ("name: ../x\ngrid: {seed: [0]}\n", "name = '../x' must be letters"),
        ("name: t\ngrid: {seed: 0}\n", "grid.seed = 0 must be a non-empty list"),
        ("name: t\ngrid: {}\n", "grid must map params to lists"),
        ("name: t\ngrid: {seed: [0]}\nslurm: {gpu: 1}\n", "slurm has unknown key(s) ['gpu']"),
        ("name: t\ngrid: [seed\n", "cannot read the grid"),
    ],
)
def test_a_bad_grid_file_is_one_line_naming_the_key(tmp_path, text, message):
    with pytest.raises(UserError) as caught:
        G.load_grid(write(tmp_path, text), [])
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_cells_names_and_values():
    spec = {"name": "table1", "grid": {"classname": ["carpet", "grid"], "seed": [0, 1], "protocol.n_anomalies": [10],
                                       "ahl.cdl": [False]}, "set": {"base.model": "dra"}}  # fmt: skip
    cells = G.expand(spec)
    assert [c["name"].rsplit("-", 1)[0] for c in cells] == [
        "table1-carpet-seed0-n_anomalies10-cdlfalse", "table1-carpet-seed1-n_anomalies10-cdlfalse",
        "table1-grid-seed0-n_anomalies10-cdlfalse", "table1-grid-seed1-n_anomalies10-cdlfalse",
    ]  # fmt: skip
    assert cells[0]["params"] == {"base.model": "dra", "classname": "carpet", "seed": 0, "protocol.n_anomalies": 10,
                                  "ahl.cdl": False}  # fmt: skip
    assert all(c["name"].endswith("-" + G.params_hash(c["params"])) for c in cells)
    assert G.set_args({"ahl.cdl": False, "ahl.lr": 0.001, "classname": "a b"}) == [
        "-S", "ahl.cdl=false", "-S", "ahl.lr=0.001", "-S", "classname=a b"]  # fmt: skip
    assert G.cell_name("t", {"classname": "we/ird name"}, {}).startswith("t-we_ird_name-")  # no path, no shell word


def test_dash_s_lists_replace_the_file_and_keep_types(tmp_path):
    grid = G.load_grid(write(tmp_path, "name: t\ngrid: {seed: [0]}\n"), ["seed=0,1,2", "classname=brick,grass"])
    assert grid["grid"] == {"seed": [0, 1, 2], "classname": ["brick", "grass"]}
    with pytest.raises(UserError, match="expected key=value"):
        G.load_grid(write(tmp_path, "name: t\ngrid: {seed: [0]}\n"), ["seed"])


def test_an_unknown_param_is_refused_before_anything_is_queued(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    G.check_keys_exist({"grid": {"seed": [0], "protocol.n_anomalies": [1]}, "set": {}}, params, tmp_path / "g.yaml")
    with pytest.raises(UserError, match="protocol.n_anomaly is not a param of params.yaml"):
        G.check_keys_exist({"grid": {"protocol.n_anomaly": [1]}, "set": {}}, params, tmp_path / "g.yaml")


@pytest.fixture
def lab(tmp_path):
    repo = Repo(tmp_path / "lab", tiny_params())
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    (repo.path / "grid.yaml").write_text("name: t\ngrid: {seed: [0, 1]}\nslurm: {partition: gpu, gpus: 1}\n")
    repo.git("add", "-A")
    repo.git("commit", "-qm", "grid")
    repo.git("remote", "add", "origin", str(origin))
    return repo


def _grid(repo: Repo, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/grid.py", *args], cwd=repo.path, env=repo.env, text=True,
                          capture_output=True)  # fmt: skip


def test_submit_refuses_an_unpushed_commit_and_uncommitted_params(lab):
    out = _grid(lab, "submit", "grid.yaml", "--print")
    assert out.returncode == 2 and "is not on the git remote origin: git push origin HEAD" in out.stderr, out.stderr
    lab.git("push", "-q", "origin", "HEAD:refs/heads/main")
    (lab.path / "params.yaml").write_text((lab.path / "params.yaml").read_text() + "\n# edited\n")
    out = _grid(lab, "submit", "grid.yaml", "--print")
    assert out.returncode == 2 and "uncommitted changes" in out.stderr, out.stderr


def test_the_batch_script_is_self_contained_bash(lab):
    lab.git("push", "-q", "origin", "HEAD:refs/heads/main")
    out = _grid(lab, "submit", "grid.yaml", "--print")
    assert out.returncode == 0 and "2 cell(s) to run" in out.stdout, out.stderr
    script = next((lab.path / ".grid/t").glob("batch-*.sh"))
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "#SBATCH --array=0-1" in text and "#SBATCH --partition=gpu" in text and "#SBATCH --gpus=1" in text
    payload = json.loads(text.split("<<'AHL_GRID_CELLS'\n")[1].split("\nAHL_GRID_CELLS")[0])
    assert [c["name"].rsplit("-", 1)[0] for c in payload["cells"]] == ["t-seed0", "t-seed1"]
    assert payload["commit"] == lab.git("rev-parse", "HEAD").strip()
    status = _grid(lab, "status", "grid.yaml")
    assert status.returncode == 1 and f"{payload['cells'][0]['name']}  missing" in status.stdout, status.stdout


def test_named_sets_of_params_are_cells_whole(tmp_path):
    """A grid key whose values are named sets of params (a ladder's rungs): each cell takes one set whole, named
    by it; its params are checked against params.yaml like any other."""
    path = write(tmp_path, "name: ladder\nset: {classname: elpv}\ngrid:\n  budget:\n"
                           "    - {name: a-dra, base.model: dra}\n"
                           "    - {name: b-dra, base.model: dra, base.epochs: 30}\n  seed: [0, 1]\n")  # fmt: skip
    grid = G.load_grid(path, [])
    cells = G.expand(grid)
    assert [c["name"].rsplit("-", 1)[0] for c in cells] == ["ladder-a-dra-seed0", "ladder-a-dra-seed1",
                                                          "ladder-b-dra-seed0", "ladder-b-dra-seed1"]  # fmt: skip
    assert cells[2]["params"] == {"classname": "elpv", "base.model": "dra", "base.epochs": 30, "seed": 0}
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    G.check_keys_exist(grid, params, path)
    grid["grid"]["budget"].append({"name": "c", "base.epoch": 3})
    with pytest.raises(UserError, match="base.epoch is not a param of params.yaml"):
        G.check_keys_exist(grid, params, path)
    with pytest.raises(UserError, match="gives every item a name"):
        G.load_grid(write(tmp_path, "name: t\ngrid:\n  budget: [{base.epochs: 3}]\n"), [])
    ladder = G.load_grid(ROOT / "grids/elpv_ladder.yaml", [])  # the committed ladder: 6 rungs x 3 seeds
    G.check_keys_exist(ladder, params, ROOT / "grids/elpv_ladder.yaml")
    assert len(G.expand(ladder)) == 18


def test_queue_puts_the_cells_into_dvcs_queue_once(lab):
    """`grid.py queue`: every cell into the local DVC queue; queued again, nothing is added (resumable)."""
    out = _grid(lab, "queue", "grid.yaml")
    assert out.returncode == 0 and "2 cell(s) queued" in out.stdout, out.stderr
    listed = lab.dvc("queue", "status").stdout
    assert all(n in listed for n in _names(lab)) and listed.count("Queued") == 2
    again = _grid(lab, "queue", "grid.yaml", "-S", "seed=0,1,2")
    assert again.returncode == 0 and "1 cell(s) queued, 2 already done, queued or running" in again.stdout


def test_a_cell_is_its_params_set_included(tmp_path):
    """Was: a cell's name ignored `set:`, so a changed `set:` at the same commit found every cell done with the old
    params. Now the name carries the hash of every param the cell sets."""
    text = "name: t\ngrid: {seed: [0, 1]}\nset: {ahl.epochs: 2}\n"
    before = [c["name"] for c in G.expand(G.load_grid(write(tmp_path, text), []))]
    assert before == [c["name"] for c in G.expand(G.load_grid(write(tmp_path, text), []))]  # stable
    after = [c["name"] for c in G.expand(G.load_grid(write(tmp_path, text.replace("2}", "3}")), []))]
    assert [n.rsplit("-", 1)[0] for n in after] == ["t-seed0", "t-seed1"] and not set(before) & set(after)
    bundles = "name: t\ngrid:\n  budget: [{name: a, base.epochs: 2}]\n"
    changed = bundles.replace("epochs: 2", "epochs: 3")  # a named set's params changed, its name kept
    assert G.expand(G.load_grid(write(tmp_path, bundles), []))[0]["name"] != G.expand(
        G.load_grid(write(tmp_path, changed), []))[0]["name"]  # fmt: skip


def _submitted(lab, cells: list[str]) -> None:
    """A submission of ``cells`` at HEAD in the ledger, as `submit` records it after sbatch answered job 4242."""
    ledger = lab.path / ".grid" / "t"
    ledger.mkdir(parents=True, exist_ok=True)
    commit = lab.git("rev-parse", "HEAD").strip()
    (ledger / "jobs.json").write_text(json.dumps([{"job": "4242", "commit": commit, "script": "x", "cells": cells}]))


def _line(status: str, name: str) -> str:
    """Cell ``name``'s line of `grid.py status`, or "" when it has none."""
    return next((x for x in status.splitlines() if x.startswith(name)), "")


def _names(lab) -> list[str]:
    return [c["name"] for c in G.expand(G.load_grid(lab.path / "grid.yaml", []))]


@pytest.mark.parametrize("squeue", ["missing", "failing"])
def test_unknown_is_not_failed_when_squeue_cannot_say(lab, tmp_path, squeue):
    """Was: without squeue, or when it failed, submitted cells looked failed and --retry-failed ran them a second
    time next to the live ones. Now they are unknown, with squeue's reason, and never resubmitted."""
    lab.git("push", "-q", "origin", "HEAD:refs/heads/main")
    names = _names(lab)
    _submitted(lab, names[:1])
    env = dict(lab.env)
    if squeue == "missing":  # a PATH with git and python but no squeue
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "git").symlink_to(shutil.which("git"))
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), str(bin_dir)])
        reason = "squeue: not found on PATH"
    else:
        if shutil.which("squeue") is None:
            pytest.skip("needs Debian's slurm-client (squeue): .ci/run installs it")
        bad = tmp_path / "slurm.conf"
        bad.write_text("NotAKey=1\n")
        env["SLURM_CONF"] = str(bad)  # the real squeue, failing on a broken configuration
        reason = "squeue: exit 1: squeue: fatal: Unable to process configuration file"
    status = subprocess.run([sys.executable, "scripts/grid.py", "status", "grid.yaml"], cwd=lab.path, env=env,
                            text=True, capture_output=True)  # fmt: skip
    line = next(x for x in status.stdout.splitlines() if x.startswith(names[0]))
    assert line.split()[1] == "unknown" and f"({reason}" in line, status.stdout + status.stderr
    assert next(x for x in status.stdout.splitlines() if x.startswith(names[1])).split()[1] == "missing"
    retry = subprocess.run([sys.executable, "scripts/grid.py", "submit", "grid.yaml", "--retry-failed", "--print"],
                           cwd=lab.path, env=env, text=True, capture_output=True)  # fmt: skip
    assert "1 cell(s) to run" in retry.stdout, retry.stdout + retry.stderr
    script = sorted((lab.path / ".grid/t").glob("batch-*.sh"))[-1].read_text()
    assert names[1] in script and names[0] not in script  # the unknown one is not run again


def test_a_task_never_deletes_a_work_folder_that_a_live_task_holds(lab, tmp_path):
    """Was: each task began with rm -rf of its work folder, a live earlier task's clone included, and left its
    cells file in $TMPDIR. Now the folder's lock says whether a live task holds it, and the cells file goes."""
    grid = yaml.safe_load((lab.path / "grid.yaml").read_text()) | {"workdir": str(tmp_path / "w")}
    (lab.path / "grid.yaml").write_text(yaml.safe_dump(grid))
    lab.git("commit", "-qam", "workdir")
    lab.git("push", "-q", "origin", "HEAD:refs/heads/main")
    out = _grid(lab, "submit", "grid.yaml", "--print")
    assert out.returncode == 0, out.stderr
    script = next((lab.path / ".grid/t").glob("batch-*.sh"))
    work = tmp_path / "w" / "t" / _names(lab)[0]
    (work / "scripts").mkdir(parents=True)
    (work / "scripts" / "in-use").write_text("a live task's clone")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**lab.env, "SLURM_ARRAY_TASK_ID": "0", "TMPDIR": str(tmp)}
    with open(f"{work}.lock", "a") as held:  # the live task
        fcntl.flock(held, fcntl.LOCK_EX)
        task = subprocess.run(["bash", str(script)], env=env, text=True, capture_output=True, timeout=120)
    assert task.returncode == 75, task.stdout + task.stderr
    assert f"{work} is in use by another live task" in task.stderr
    assert (work / "scripts" / "in-use").read_text() == "a live task's clone"
    assert list(tmp.iterdir()) == []  # the cells file is removed on exit


def test_done_means_the_data_is_on_the_remote_a_partial_push_is_incomplete(lab, tmp_path):
    """`dvc exp push` sends the git refs first and the data second. Was: a failed data step left a ref that
    counted as done forever. Now DVC's own status of the experiment's outputs against the DVC remote decides:
    incomplete (with the repair) and run again by submit, until the data is there."""
    lab.git("push", "-q", "origin", "HEAD:refs/heads/main")
    name = _names(lab)[0]
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the DVC remote's folder should be: every upload fails")
    lab.dvc("remote", "add", "-d", "shared", str(blocked))
    lab.git("commit", "-qam", "the DVC remote")
    lab.git("push", "-q", "origin", "HEAD:refs/heads/main")
    lab.dvc("exp", "run", "-n", name, "-S", "seed=0")
    push = lab.dvc("exp", "push", "origin", name, check=False)
    assert push.returncode != 0, push.stdout + push.stderr  # the data step failed ...
    assert name in subprocess.run(["git", "ls-remote", str(tmp_path / "origin.git"), "refs/exps/*"],
                                  capture_output=True, text=True).stdout  # ... after the ref went up  # fmt: skip
    blocked.unlink()  # the remote works again (an empty one): its data never arrived
    lab.git("checkout", "-q", "--", ".")  # the workspace back at the commit (exp run left the cell's params)
    status = _grid(lab, "status", "grid.yaml")
    line = _line(status.stdout, name)
    assert line.split()[1:2] == ["incomplete"] and f"`dvc exp push origin {name}`" in line, status.stdout + status.stderr
    again = _grid(lab, "submit", "grid.yaml", "--print")
    assert "2 cell(s) to run" in again.stdout, again.stdout + again.stderr  # the incomplete one is run again
    lab.dvc("exp", "push", "origin", name)  # the repair
    status = _grid(lab, "status", "grid.yaml")
    line = _line(status.stdout, name)
    assert line.split()[1:2] == ["done"], status.stdout + status.stderr
    grid = yaml.safe_load((lab.path / "grid.yaml").read_text()) | {"set": {"ahl.epochs": 1}}
    (lab.path / "grid.yaml").write_text(yaml.safe_dump(grid))  # set: changed: new cells, the old one set apart
    status = _grid(lab, "status", "grid.yaml").stdout
    assert f"{name}  (another version of this grid" in status and name not in _names(lab), status
    assert all(f"{n}  missing" in status for n in _names(lab)), status
    # a directory output whose listing (.dir, uploaded after its files) is not in the DVC remote, asked from a
    # clone whose cache lacks it too (the submitting clone is seldom where the cell ran): incomplete, not done
    lab.git("checkout", "-q", "--", "grid.yaml")
    listing = next(p for p in sorted((tmp_path / "not-a-folder").rglob("*.dir")))
    listing.unlink()
    for cached in (lab.path / ".dvc" / "cache").rglob(listing.name):
        cached.unlink()
    status = _grid(lab, "status", "grid.yaml")
    line = _line(status.stdout, name)
    assert line.split()[1:2] == ["incomplete"], status.stdout + status.stderr
