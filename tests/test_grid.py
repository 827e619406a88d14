"""scripts/grid.py without a scheduler: the grid file's checks (one line each), the cells' names and -S values,
the refusals before anything is queued, and the self-contained batch script (tests/test_slurm.py runs it on Slurm)."""

from __future__ import annotations

import json
import subprocess
import sys

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
    assert [c["name"] for c in cells] == [
        "table1-carpet-seed0-n_anomalies10-cdlfalse", "table1-carpet-seed1-n_anomalies10-cdlfalse",
        "table1-grid-seed0-n_anomalies10-cdlfalse", "table1-grid-seed1-n_anomalies10-cdlfalse",
    ]  # fmt: skip
    assert cells[0]["params"] == {"base.model": "dra", "classname": "carpet", "seed": 0, "protocol.n_anomalies": 10,
                                  "ahl.cdl": False}  # fmt: skip
    assert G.set_args({"ahl.cdl": False, "ahl.lr": 0.001, "classname": "a b"}) == [
        "-S", "ahl.cdl=false", "-S", "ahl.lr=0.001", "-S", "classname=a b"]  # fmt: skip
    assert G.cell_name("t", {"classname": "we/ird name"}) == "t-we_ird_name"  # never a path or a shell word


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
    assert [c["name"] for c in payload["cells"]] == ["t-seed0", "t-seed1"]
    assert payload["commit"] == lab.git("rev-parse", "HEAD").strip()
    status = _grid(lab, "status", "grid.yaml")
    assert status.returncode == 1 and "t-seed0  missing" in status.stdout, status.stdout


def test_named_sets_of_params_are_cells_whole(tmp_path):
    """A grid key whose values are named sets of params (a ladder's rungs): each cell takes one set whole, named
    by it; its params are checked against params.yaml like any other."""
    path = write(tmp_path, "name: ladder\nset: {classname: elpv}\ngrid:\n  budget:\n"
                           "    - {name: a-dra, base.model: dra}\n"
                           "    - {name: b-dra, base.model: dra, base.epochs: 30}\n  seed: [0, 1]\n")  # fmt: skip
    grid = G.load_grid(path, [])
    cells = G.expand(grid)
    assert [c["name"] for c in cells] == ["ladder-a-dra-seed0", "ladder-a-dra-seed1", "ladder-b-dra-seed0",
                                          "ladder-b-dra-seed1"]  # fmt: skip
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
    assert "t-seed0" in listed and "t-seed1" in listed and listed.count("Queued") == 2
    again = _grid(lab, "queue", "grid.yaml", "-S", "seed=0,1,2")
    assert again.returncode == 0 and "1 cell(s) queued, 2 already done, queued or running" in again.stdout
