"""Atomic outputs: no litter from killed writers, modes from the umask, a full disk as a one-line error."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from ahl.core.errors import UserError
from ahl.core.io import atomic_dir, atomic_path, write_json

KILLED_WRITER = """
import os, sys, time
sys.path.insert(0, {root!r})
from ahl.core.io import atomic_dir
with atomic_dir({out!r}) as tmp:
    (tmp / "part.npy").write_bytes(b"x" * 10)
    print(tmp, flush=True)
    os.kill(os.getpid(), 9)
"""


def test_a_killed_writer_leaves_a_temp_dir_that_the_next_write_removes(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "features"
    code = KILLED_WRITER.format(root=root, out=str(out))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == -9
    left = list(tmp_path.glob(".features.*.tmp"))
    assert len(left) == 1 and not out.exists()  # killed: litter, but nothing that looks finished
    with atomic_dir(out) as tmp:
        (tmp / "ok").write_text("done")
    assert list(tmp_path.glob(".features.*.tmp")) == [] and (out / "ok").read_text() == "done"


def test_a_live_writers_temp_is_left_alone(tmp_path):
    mine = tmp_path / f".out.json.{os.getpid()}.abc.tmp.json"
    mine.write_text("in progress")
    write_json(tmp_path / "out.json", {"a": 1})
    assert mine.exists()


def test_outputs_get_the_umask_modes(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "m.json", {"a": 1})
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_a_full_disk_is_a_user_error_naming_the_output_and_leaves_nothing(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match=r"no space left on the disk while writing .*model.pt"):
        with atomic_path(tmp_path / "model.pt") as tmp:
            monkeypatch.setattr(os, "replace", full)
            tmp.write_bytes(b"x")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_csv_cells_that_start_a_formula_are_written_as_text(tmp_path):
    import pandas as pd

    from ahl.core.spreadsheet import write_csv

    table = pd.DataFrame({
        "file": ["=1+1", "+A1", "-cmd", "@SUM(A1)", "\tx", "\ry", "test/=1+1/000.png", "ok"],
        "score": [-1.5, 2.0, -3.0, 0.0, 1.0, 2.0, 3.0, 4.0],  # negative numbers are numbers
        "flag": [True, False, pd.NA, True, False, True, False, True],
    })  # fmt: skip
    write_csv(tmp_path / "t.csv", table)
    back = pd.read_csv(tmp_path / "t.csv", keep_default_na=False)
    assert back["file"].tolist()[:6] == ["'=1+1", "'+A1", "'-cmd", "'@SUM(A1)", "'\tx", "'\ry"]
    assert back["file"].tolist()[6:] == ["test/=1+1/000.png", "ok"]
    assert back["score"].tolist() == table["score"].tolist()
    assert back["flag"].astype(str).tolist()[:3] == ["True", "False", ""]
    assert [p.name for p in tmp_path.iterdir()] == ["t.csv"]  # atomic: no temp file left
