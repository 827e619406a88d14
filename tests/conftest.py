"""Shared fixtures: a small embedded dataset in MVTec layout, built once per test session; the reproduced tiny
pipeline. pyproject.toml runs the suite on one pytest-xdist worker per core, a test file per worker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ahl.data.embedded import EmbeddedConfig, build_embedded

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The workers share the cores: one thread each, and for the processes they start (stages, dvc, torchrun); with
    # a thread per core in every worker, OpenMP's spinning threads slow all of them down many times.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("embedded") / "mvtec"
    build_embedded(root, EmbeddedConfig(image_size=64, n_train=12, n_test_good=6, n_per_defect=5, seed=0))
    return root


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny ops: OpenMP's thread handoff would dominate (and CI's cores are
    shared). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory):
    """The tiny pipeline (tests/test_pipeline.py TINY) after its first `dvc repro`, committed; and that repro's
    stdout. Built once: the tests that need a reproduced pipeline work on copies of it (``Repo.copy``)."""
    from test_pipeline import Repo, tiny_params

    repo = Repo(tmp_path_factory.mktemp("reproduced") / "repo", tiny_params())
    first = repo.dvc("repro")
    repo.git("add", "-A")
    repo.git("commit", "-qm", "reproduced")
    return repo, first.stdout
