"""Data parallelism over 2 CPU processes (gloo), started like torchrun does: the same results as one process."""

from __future__ import annotations

import dataclasses
import os
import pickle
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import FAST, feature_splits, make_cache, make_heads

from ahl.core.distributed import DistributedConfig, Group, process_group, under_torchrun
from ahl.core.errors import UserError
from ahl.core.runtime import plain
from ahl.method.cache import CacheConfig, write_cache
from ahl.method.train_ahl import train_ahl
from ahl.models.backbones import to_input
from ahl.models.base import BackboneConfig, build_model
from ahl.models.train_base import BaseConfig, BatchSampler, _Step, rank_backward, train_base, train_step

WORLD = 2


def _worker(rank: int, port: int, out: str, fn, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    with process_group(torch.device("cpu")) as (group, device):
        assert group == Group(rank, WORLD) and device.type == "cpu"
        result = fn(group, *args)
    with open(os.path.join(out, f"{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def spawn(fn, *args, tmp_path) -> list:
    """fn(group, *args) on WORLD gloo processes; their results in rank order."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path), fn, args), nprocs=WORLD)
    results = []
    for rank in range(WORLD):
        with open(tmp_path / f"{rank}.pkl", "rb") as f:
            results.append(pickle.load(f))
    return results


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _every_check(group: Group, dataset, out) -> dict:
    """What the 2 ranks compute for the tests below, in one start of the processes (seconds each on 2 cores)."""
    return {
        "ahl_dra": _ahl(group, AHL_CONFIG, "dra"),
        "ahl_devnet": _ahl(group, AHL_CONFIG, "devnet"),
        "ahl_independent": _ahl(group, INDEPENDENT, "dra"),
        "gradient": _one_step_gradient(group),
        "train": _train(group),
        "cache": _cache(group, dataset, out),
    }


@pytest.fixture(scope="module")
def ranks(small_dataset, tmp_path_factory) -> tuple[list[dict], Path]:
    """Every rank's results, and the folder the ranks' feature cache was written into."""
    root = tmp_path_factory.mktemp("ranks")
    (root / "results").mkdir(), (root / "out").mkdir()
    return spawn(_every_check, small_dataset, root / "out" / "c", tmp_path=root / "results"), root / "out"


# ---------------------------------------------------------------- AHL: tasks over ranks
# history 1: psi is trained from epoch 2, so epochs 3 and 4 run with psi's (non-uniform) task weights
AHL_CONFIG = dataclasses.replace(FAST, epochs=4, history=1)
INDEPENDENT = dataclasses.replace(AHL_CONFIG, cdl=False, epochs=2)


def _ahl(group: Group, config, model: str):
    result = train_ahl(make_cache()[0], make_heads(model), config, seed=3, device="cpu", group=group)
    return {k: v.detach().clone() for k, v in result.heads.state_dict().items()}, result.history


def _assert_same_run(single, ranks) -> None:
    (state, history), (state0, history0), (state1, _) = single, ranks[0], ranks[1]
    for key, value in state.items():
        assert torch.allclose(state0[key].double(), value.double(), rtol=0, atol=1e-5), key
        assert torch.equal(state0[key], state1[key]), key  # the ranks hold the same model
    for entry, entry0 in zip(history, history0, strict=True):
        for key in ("outer_loss", "query_losses", "support_losses", "task_weights", "rewards", "grad_norm"):
            if key in entry:
                a, b = (np.asarray(e[key], dtype=float) for e in (entry, entry0))
                assert np.allclose(a, b, rtol=0, atol=1e-5, equal_nan=True), (entry["epoch"], key, a, b)


@pytest.mark.parametrize("model", ["dra", "devnet"])
def test_ahl_tasks_over_two_ranks_equal_one_process(ranks, model):
    """The meta-gradients summed over ranks, DRA's BatchNorm statistics replayed in task order, psi's pool
    scores gathered: 4 epochs (2 with psi's weights) give the single-process heads and history within 1e-5."""
    single = _ahl(Group(), AHL_CONFIG, model)
    assert len(set(np.round(single[1][-1]["task_weights"], 6))) > 1  # psi's weights are in play
    _assert_same_run(single, [r[f"ahl_{model}"] for r in ranks[0]])


def test_ahl_independent_heads_over_two_ranks_equal_one_process(ranks):
    _assert_same_run(_ahl(Group(), INDEPENDENT, "dra"), [r["ahl_independent"] for r in ranks[0]])


# ---------------------------------------------------------------- base training with DDP
BACKBONE = BackboneConfig(name="efficientnet_lite0", pretrained="none", image_size=64, n_scales=2)
BASE = BaseConfig(model="dra", epochs=1, steps_per_epoch=2, batch_size=7, n_ref=2, rotation=0)


def _images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (8, 64, 64, 3), dtype=np.uint8), rng.integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)


def _model():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_model("dra", BACKBONE, topk=0.1, margin=5.0)


def _one_step_gradient(group: Group):
    """DDP gradient of one global batch of 7 (rows 4 + 3), BatchNorm on its running statistics (eval mode)."""
    model = _model().eval()
    ddp = torch.nn.parallel.DistributedDataParallel(_Step(model))
    images, labels, ref = BatchSampler(*_images(), BASE, np.random.default_rng(1))()
    loss = rank_backward(ddp, images, labels, ref, plain(torch.device("cpu")), group)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_base_gradient_over_two_ranks_equals_one_process(ranks):
    """Why only this can be equal: in training the backbone's BatchNorm normalises each rank's rows with their
    own batch statistics (DDP's behaviour; gloo has no SyncBatchNorm), which one process does over the whole
    batch. With the statistics fixed, the ranks' uneven shares (4 and 3 rows) and the reference images every
    rank forwards give, summed by DDP, the single-process gradient of the global batch."""
    model = _model().eval()
    images, labels, ref = BatchSampler(*_images(), BASE, np.random.default_rng(1))()
    cpu = torch.device("cpu")
    loss = train_step(model, to_input(images, cpu), torch.from_numpy(labels), to_input(ref, cpu))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for rank_loss, rank_grads in (r["gradient"] for r in ranks[0]):
        assert abs(rank_loss - float(loss.detach())) < 1e-5
        assert rank_grads.keys() == grads.keys()
        for name, g in grads.items():
            assert torch.allclose(rank_grads[name], g, rtol=1e-4, atol=1e-5), name


def _train(group: Group):
    ckpt = train_base(*_images(), BACKBONE, BASE, seed=0, device=torch.device("cpu"), group=group)
    return {k: v.clone() for k, v in ckpt.model.state_dict().items() if "running" not in k}, ckpt.meta["history"]


def test_base_training_over_two_ranks_keeps_the_replicas_equal(ranks):
    (state0, history0), (state1, history1) = (r["train"] for r in ranks[0])
    assert history0 == history1 and np.isfinite(history0[0]["loss"])
    for key, value in state0.items():
        assert torch.equal(value, state1[key]), key


# ---------------------------------------------------------------- feature cache
def _cache(group: Group, dataset, out):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model("dra", dataclasses.replace(BACKBONE, pretrained="imagenet"), topk=0.1, margin=5.0).eval()
    normal_mean = [torch.ones(320, 2, 2), torch.ones(320, 1, 1)]
    write_cache(out, model, normal_mean, feature_splits(dataset), CacheConfig(batch_size=4), seed=0, device="cpu", group=group)


def test_feature_cache_from_two_ranks_is_identical_to_one(small_dataset, ranks, tmp_path):
    _cache(Group(), small_dataset, tmp_path / "c")
    two = ranks[1]
    assert sorted(p.name for p in two.iterdir()) == ["c"]  # rank 1 wrote nothing, not even a temporary folder
    files = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert files == sorted(p.name for p in (two / "c").iterdir()) and len(files) > 10
    for name in files:
        assert (tmp_path / "c" / name).read_bytes() == (two / "c" / name).read_bytes(), name


# ---------------------------------------------------------------- config
def test_config_and_single_process():
    assert DistributedConfig(nproc=1).nproc == 1
    with pytest.raises(UserError, match="distributed.nproc"):
        DistributedConfig(nproc=0)
    assert not under_torchrun()
    with process_group(torch.device("cpu")) as (group, device):
        assert group == Group() and group.is_main and group.owns(5) and device == torch.device("cpu")
    assert list(Group(1, 3).rows(7)) == [1, 4] and [Group(r, 2).owns(3) for r in range(2)] == [False, True]


@pytest.mark.parametrize("stage", ["train_base", "features", "train_ahl"])
def test_more_processes_than_cores_are_refused_before_anything_starts(stage, tmp_path):
    """distributed.nproc above the usable cores (CPU) is one line from the stage itself, before torchrun starts."""
    import subprocess
    import sys

    import yaml

    root = Path(__file__).resolve().parents[1]
    cores = len(os.sched_getaffinity(0))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["device"], params["distributed"]["nproc"] = "cpu", cores + 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    res = subprocess.run([sys.executable, f"stages/{stage}.py", "--params", str(tmp_path / "params.yaml")],
                         cwd=root, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 2, res.stderr[-800:]
    expected = f"error: params.yaml: distributed.nproc = {cores + 1} is more than the {cores} CPU cores"
    assert res.stderr.startswith(expected) and res.stderr.count("\n") == 1 and "torch.distributed.run" not in res.stdout
