"""Shared results through a DVC remote (docs/sharing.md): one clone runs the pipeline and pushes; another
clone of the same git repository pulls, has nothing to reproduce and shows the same metrics; experiments travel
with `dvc exp push/pull origin`. The remote is a local folder and origin a bare git repository, both temporary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Repo

pytestmark = pytest.mark.pipeline


def clone(path: Path, origin: Path, env: dict) -> Repo:
    """A git clone of ``origin`` with its own DVC site cache (what a teammate's checkout is)."""
    subprocess.run(["git", "clone", "-q", str(origin), str(path)], env=env, check=True)
    return Repo.existing(path, env)


def metrics(repo: Repo) -> dict:
    return json.loads(repo.dvc("metrics", "show", "--json").stdout)


def up_to_date(repo: Repo) -> bool:
    """dvc status is clean but for local_manifest, which hashes data.local on every repro (always_changed)."""
    status = json.loads(repo.dvc("status", "--json").stdout)
    return status in ({}, {"local_manifest": ["always changed"]})


def test_push_then_pull_in_another_clone_reproduces_nothing_and_shares_experiments(reproduced, tmp_path):
    a = reproduced[0].copy(tmp_path / "a")  # the tiny pipeline, reproduced
    remote, origin = tmp_path / "dvc-remote", tmp_path / "origin.git"
    a.dvc("remote", "add", "-d", "shared", str(remote))
    a.git("add", "-A")
    a.git("commit", "-qm", "results")
    a.dvc("push")
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    a.git("remote", "add", "origin", str(origin))
    a.git("push", "-q", "origin", "HEAD:refs/heads/main")
    subprocess.run(["git", "symbolic-ref", "HEAD", "refs/heads/main"], cwd=origin, check=True)

    b = clone(tmp_path / "b", origin, a.env)
    assert not (b.path / "models/ahl.pt").exists()
    b.dvc("pull")
    assert up_to_date(b)
    assert b.ran(b.dvc("repro").stdout) <= {"local_manifest"}  # its output is unchanged, so nothing after it runs
    assert up_to_date(b)
    assert metrics(b) == metrics(a)
    assert (b.path / "models/ahl.pt").read_bytes() == (a.path / "models/ahl.pt").read_bytes()

    # an experiment run in a is pulled by b, with its outputs
    a.dvc("exp", "run", "-n", "shared-exp", "-S", "evaluate.batch_size=8")
    a.dvc("exp", "push", "origin", "shared-exp")
    b.dvc("exp", "pull", "origin", "shared-exp")
    assert "shared-exp" in b.dvc("exp", "list", "--name-only").stdout
    b.dvc("exp", "apply", "shared-exp")
    a.dvc("exp", "apply", "shared-exp")
    assert metrics(b) == metrics(a)
    assert up_to_date(b)


@pytest.fixture(autouse=True)
def no_site_cache_leak(monkeypatch):
    monkeypatch.delenv("DVC_SITE_CACHE_DIR", raising=False)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
