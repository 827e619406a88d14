"""Shared fixtures: a small embedded dataset in MVTec layout, built once per test session; the reproduced tiny
pipeline. pyproject.toml runs the suite on one pytest-xdist worker per core, a test file per worker."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ahl.data.embedded import EmbeddedConfig, build_embedded
from ahl.data.mvtec import load_images, read_subset
from ahl.method.cache import FeatureCache, FeatureSet
from ahl.method.train_ahl import AHLConfig
from ahl.models.base import build_heads
from ahl.models.labels import NORMAL, PSEUDO, SEEN

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The workers share the cores: one thread each, and for the processes they start (stages, dvc, torchrun); with
    # a thread per core in every worker, OpenMP's spinning threads slow all of them down many times.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skip is a failure: .ci/run installs everything the suite needs (Slurm, munge, root for
    tmpfs, the offline data), so a skip there means a set-up step broke, and a skipped test would hide it."""
    outcome = yield
    report = outcome.get_result()
    if under_ci() and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true ({reason}): CI must run every test; fix .ci/run's set-up"


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
    repo = Repo(tmp_path_factory.mktemp("reproduced") / "repo", tiny_params())
    first = repo.dvc("repro")
    repo.git("add", "-A")
    repo.git("commit", "-qm", "reproduced")
    return repo, first.stdout


# --------------------------------------------------------------------------------------------------------------
# Helpers shared by test files (imported with `from conftest import ...`)

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "embedded": {"image_size": 64, "n_train": 12, "n_test_good": 6, "n_per_defect": 5, "seed": 0},
    "protocol": {"n_anomalies": 2, "test_set_m": 2},
    "backbone": {"image_size": 64, "n_scales": 2},
    "base": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 6, "n_ref": 2},
    "features": {"batch_size": 16},
    "ahl": {
        "epochs": 2,
        "steps_per_epoch": 2,
        "batch_size": 6,
        "update_step": 1,
        "history": 1,
        "pool_pseudo_per_family": 4,
        "hadg": {"n_clusters": 2, "min_cluster_size": 1},
    },
}


def _merge(params: dict, override: dict) -> dict:
    for key, value in override.items():
        if isinstance(value, dict):
            params[key] = _merge(dict(params.get(key) or {}), value)
        else:
            params[key] = value
    return params


def tiny_params(override: dict | None = None) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    _merge(params, TINY)
    return _merge(params, override or {})


class Repo:
    """A copy of the project in a fresh git repository with DVC initialised."""

    def __init__(self, path: Path, params: dict):
        self.path = path
        for name in ("ahl", "stages", "scripts", "docs"):
            shutil.copytree(ROOT / name, path / name, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "dvc.yaml", path / "dvc.yaml")
        (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        self.env = {
            **os.environ,
            "DVC_NO_ANALYTICS": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@t",
            "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@t",
        }
        self.env.pop("DVC_SITE_CACHE_DIR", None)
        self.git("init", "-q")
        self.dvc("init", "-q")
        self.dvc("config", "core.site_cache_dir", str(path / ".dvc-site-cache"))
        self.git("add", "-A")
        self.git("commit", "-qm", "init")

    @classmethod
    def existing(cls, path: Path, env: dict) -> Repo:
        """The repository already at ``path`` (a copy, a git clone), given its own DVC site cache."""
        repo = object.__new__(cls)  # not __init__: nothing is copied or initialised
        repo.path, repo.env = path, env
        repo.dvc("config", "--local", "core.site_cache_dir", str(path / ".dvc-site-cache"))
        return repo

    def copy(self, path: Path) -> Repo:
        """A copy of this repository (work tree, git, DVC cache) at ``path``, with its own DVC site cache."""
        shutil.copytree(self.path, path, symlinks=True, ignore=shutil.ignore_patterns(".dvc-site-cache"))
        return Repo.existing(path, self.env)

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run(cmd, cwd=self.path, env=self.env, capture_output=True, text=True)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    def git(self, *args: str) -> str:
        return self.run("git", *args).stdout

    def dvc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "dvc", *args, check=check)

    def ran(self, out: str) -> set[str]:
        return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")}


C = 16  # channels of the synthetic feature maps: scales (C, 4, 4) and (C, 2, 2)
FAMILIES = ("cutmix", "cutpaste", "draem")


def _maps(rng, centres, blob, defect=None):
    """Feature maps of images of the given blobs; ``defect`` (C,) is added at one random position (an anomaly)."""
    n = len(blob)
    x = centres[blob][:, :, None, None] + 0.3 * rng.normal(size=(n, C, 4, 4))
    if defect is not None:
        for k in range(n):
            i, j = rng.integers(4, size=2)
            x[k, :, i, j] += defect
    small = x.reshape(n, C, 2, 2, 2, 2).mean(axis=(3, 5))  # 2x2 average pool: the half-size scale
    return [x.astype(np.float16), small.astype(np.float16)]


def _set(scales, label, cls):
    n = len(scales[0])
    return FeatureSet(scales=scales, labels=np.full(n, label, np.int64), classes=[cls] * n, files=[""] * n)


def make_cache(seed=0, n_normal=60, n_seen=6, sizes=None) -> tuple[FeatureCache, np.ndarray]:
    """Normals from 3 well-separated Gaussian blobs (shuffled order), seen/unseen/pseudo anomalies as local defects."""
    rng = np.random.default_rng(seed)
    centres = 4.0 * rng.normal(size=(3, C))
    if sizes is None:
        blob = rng.permutation(np.arange(n_normal) % 3)
    else:
        blob = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
        centres = 4.0 * rng.normal(size=(len(sizes), C))
    # defects of the seen class, an unseen class and 3 pseudo families: a shared "anomalous" direction plus
    # a kind-specific one, so that what the heads learn from seen and pseudo anomalies carries over to unseen ones
    shared = rng.normal(size=C)
    directions = 8.0 * (shared + 0.5 * rng.normal(size=(5, C))) / np.sqrt(C)
    normal = _maps(rng, centres, blob)
    seen = _maps(rng, centres, rng.integers(len(centres), size=n_seen), directions[0])
    pseudo = {}
    for f, family in enumerate(FAMILIES):  # row i made from normal i: same blob, a defect of this family
        pseudo[family] = _set(_maps(rng, centres, blob, directions[2 + f]), PSEUDO, family)
    test_blob = rng.integers(len(centres), size=40)
    test_parts = [
        _maps(rng, centres, test_blob[:20]),
        _maps(rng, centres, test_blob[20:30], directions[0]),  # seen class
        _maps(rng, centres, test_blob[30:], directions[1]),  # unseen class
    ]
    test = FeatureSet(
        scales=[np.concatenate([p[s] for p in test_parts]) for s in range(2)],
        labels=np.r_[np.zeros(20), np.ones(20)].astype(np.int64),
        classes=["good"] * 20 + ["seen"] * 10 + ["unseen"] * 10,
        files=[""] * 40,
    )
    cache = FeatureCache(
        train_normal=_set(normal, NORMAL, "good"),
        train_anomaly=_set(seen, SEEN, "seen"),
        pseudo=pseudo,
        test=test,
        normal_mean=[x[:5].astype(np.float32).mean(axis=0) for x in normal],
    )
    return cache, blob


def make_heads(model="dra", seed=0, margin=5.0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_heads(model, C, topk=0.1, margin=margin)


FAST = AHLConfig(epochs=3, steps_per_epoch=3, update_step=1, batch_size=24, lr=2e-2, history=2, psi_steps=5)


def feature_splits(root):
    """Images of the session's small embedded dataset, as the feature cache's splits take them."""
    sub = read_subset(root, "brick")
    normals = list(sub.train_good[:6])
    anomalies = list(sub.anomalies["hole"][:2])
    test = list(sub.test_good[:3]) + list(sub.anomalies["crack"][:3])
    part = lambda files, labels, classes: (load_images(sub.root, files, 64), labels, classes, files)  # noqa: E731
    return {
        "train_normal": part(normals, [0] * 6, ["good"] * 6),
        "train_anomaly": part(anomalies, [1] * 2, ["hole"] * 2),
        "test": part(test, [0, 0, 0, 1, 1, 1], ["good"] * 3 + ["crack"] * 3),
    }


def hostile_names(on_disk: bool):
    """A hypothesis strategy of hostile names: separators, `..`, lookalike slashes, control characters, bidi and
    zero-width marks, leading `-`/`=`/`+`/`@`, spaces. ``on_disk``: only names a file can have here (no `/`, no
    NUL, not `.`/`..`, at most 100 bytes)."""
    from hypothesis import strategies as st

    parts = [*"ab.-=+@ _\t\r\n\\:;'\"$`*?<>|%~\x01\x1b\x7f/\x00", "..", "\u2044", "\u2215", "\uff0f", "\u29f8", "é",
             "\u202e", "\u200b", "\U0001d538", "$(id)", "-rf"]  # fmt: skip
    names = st.lists(st.sampled_from(parts), min_size=1, max_size=6).map("".join)
    if on_disk:
        names = names.filter(
            lambda n: "/" not in n and "\x00" not in n and n not in (".", "..") and len(n.encode()) <= 100
        )
    return names


def tree_digest(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (links not followed) with its bytes: compare before and after to see a write."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()
    }
