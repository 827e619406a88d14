"""A full disk, for real: the tiny pipeline on a small tmpfs, filled with a ballast file so that features and
train_base run out of space while writing. Each must stop with one line naming its output and the free space,
exit 2, and leave no temporary file behind; by hand and under `dvc repro`. Mounting needs root (CI's machine is
root); elsewhere the tests skip and say why."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import Repo

MARGIN = {"features": 128 * 1024, "train_base": 2 * 1024 * 1024}  # free bytes left: less than each output needs
OUTPUT = {"features": "cache/features", "train_base": "models/base.pt"}


@pytest.fixture
def tmpfs(tmp_path):
    mount = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=160m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if res.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({res.stderr.strip() or res.returncode}): run as root to test a full disk"
        )
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(mount: Path, leave: int) -> None:
    """A ballast file that leaves ``leave`` bytes free on the tmpfs."""
    free = shutil.disk_usage(mount).free
    with open(mount / "ballast", "wb") as f:
        f.truncate(0)
    subprocess.run(["fallocate", "-l", str(free - leave), str(mount / "ballast")], check=True)
    assert abs(shutil.disk_usage(mount).free - leave) < 64 * 1024


def check_failure(res: subprocess.CompletedProcess, repo: Path, stage: str) -> None:
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "Traceback" not in out and "Bus error" not in out and "exited with -7" not in out, out
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, out
    assert OUTPUT[stage] in lines[0] and " free" in lines[0] and "free space" in lines[0], lines[0]
    output = repo / OUTPUT[stage]
    assert not output.exists()
    assert not list(output.parent.glob(f".{output.name}.*")), "a temporary file was left behind"


@pytest.mark.parametrize("stage", ["features", "train_base"])
def test_a_full_disk_by_hand_is_one_line_and_leaves_nothing(reproduced, tmpfs, stage):
    repo = reproduced[0].copy(tmpfs / "repo")
    shutil.rmtree(repo.path / ".dvc" / "cache")  # not needed by hand; the output's own space is what counts
    (repo.path / OUTPUT[stage]).unlink() if stage == "train_base" else shutil.rmtree(repo.path / OUTPUT[stage])
    fill(tmpfs, MARGIN[stage])
    res = subprocess.run(
        [sys.executable, f"stages/{stage}.py"], cwd=repo.path, env=repo.env, capture_output=True, text=True
    )
    check_failure(res, repo.path, stage)


@pytest.mark.parametrize("stage", ["features", "train_base"])
def test_a_full_disk_under_dvc_repro_is_one_line_and_leaves_nothing(reproduced, tmpfs, tmp_path, stage):
    repo: Repo = reproduced[0].copy(tmpfs / "repo")
    # DVC's hash databases live in its site cache (/var/tmp/dvc unless configured): off the full disk here, so
    # that the stage meets the full disk first, not DVC's own bookkeeping ("database or disk is full")
    repo.dvc("config", "--local", "core.site_cache_dir", str(tmp_path / "site-cache"))
    (repo.path / OUTPUT[stage]).unlink() if stage == "train_base" else shutil.rmtree(repo.path / OUTPUT[stage])
    fill(tmpfs, MARGIN[stage])
    res = repo.dvc("repro", "--force", "--single-item", stage, check=False)  # not from the run cache
    out = res.stdout + res.stderr
    assert f"failed to reproduce '{stage}'" in out, out
    check_failure(res, repo.path, stage)
