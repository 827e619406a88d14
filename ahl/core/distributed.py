"""Data parallelism over processes (torchrun): the process group, which rank owns what, and the reductions.

One process per GPU (or CPU share); ``torchrun`` sets RANK/WORLD_SIZE/LOCAL_RANK. Every rank draws the same
batches from the same seeded generator and keeps only its share, so a run is defined by the seed alone;
rank 0 writes the outputs. With one process nothing here starts a process group and the code paths are the
single-process ones.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ahl.core.config import at_least
from ahl.core.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedConfig:
    # processes (one per GPU; gloo processes on CPU) that train_base, features and train_ahl run on; > 1 makes
    # `python stages/X.py` (and so `dvc repro`) start itself under torchrun
    nproc: int = 1
    # with device auto and several GPUs, each run holds its own (ahl/core/gpus.py) and waits when all are held;
    # true: a run that finds every GPU held shares the first ones instead of waiting
    share_gpus: bool = False

    def __post_init__(self) -> None:
        at_least("distributed.nproc", self.nproc, 1)


@dataclass(frozen=True)
class Group:
    """This process's place: rank of world. ``Group()`` is the single process (no process group)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, i: int) -> bool:
        """Item i (a task, a batch) is this rank's: round robin."""
        return i % self.world == self.rank

    def rows(self, n: int) -> np.ndarray:
        """This rank's rows of a batch of n (strided, so every rank gets normals and anomalies)."""
        return np.arange(self.rank, n, self.world)

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over the ranks (nothing with one process)."""
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def sum_array(self, array: np.ndarray) -> np.ndarray:
        """Sum of a numpy array over the ranks (each rank fills its own entries, zeros elsewhere: exact)."""
        if self.world == 1:
            return array
        out = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64)).to(comm_device())
        return self.sum_(out).cpu().numpy().astype(array.dtype)

    def broadcast_array(self, array: np.ndarray) -> np.ndarray:
        """Rank 0's array on every rank."""
        if self.world == 1:
            return array
        out = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64)).to(comm_device())
        dist.broadcast(out, 0)
        return out.cpu().numpy().astype(array.dtype)

    def gather(self, obj) -> list | None:
        """Every rank's ``obj`` in rank order on rank 0 (None elsewhere)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out


SINGLE = Group()


def comm_device() -> torch.device:
    """Where collective tensors live: the rank's GPU under nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def nproc_limit(device: torch.device) -> tuple[int, str]:
    """How many processes ``device`` can take (one per GPU on CUDA, one per usable core on the CPU), and of what."""
    if device.type == "cuda":
        return torch.cuda.device_count(), "GPUs"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores, "CPU cores"


def check_nproc(nproc: int, device: torch.device) -> None:
    """One process per GPU, or per core on the CPU: more only makes them wait on each other (64 gloo processes on
    2 cores load the machine without going faster)."""
    limit, what = nproc_limit(device)
    if nproc > limit:
        raise UserError(
            f"params.yaml: distributed.nproc = {nproc} is more than the {limit} {what} this process can use on "
            f"{device}; set it to at most {limit} (1: one process)"
        )


def relaunch(config: DistributedConfig, argv: list[str], device: torch.device | None = None) -> None:
    """With nproc > 1 and not yet under torchrun, replace this process by ``torchrun --nproc-per-node nproc``
    running the same script and arguments (what `dvc repro` runs is always `python stages/X.py`). ``device``
    (None: the CPU) bounds nproc (check_nproc)."""
    if config.nproc > 1 and not under_torchrun():
        check_nproc(config.nproc, device if device is not None else torch.device("cpu"))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={config.nproc}"]
        log.info("distributed.nproc = %d: %s", config.nproc, " ".join(command + argv))
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, command + argv)


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[tuple[Group, torch.device]]:
    """(this rank's Group, its device): under torchrun a process group (nccl on CUDA with the GPU LOCAL_RANK,
    gloo on CPU) that is destroyed on exit; otherwise the single process and ``device`` unchanged."""
    if not under_torchrun():
        yield Group(), device
        return
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"params.yaml: distributed.nproc (or torchrun's --nproc-per-node) starts process {local_rank} on a "
                f"machine with {torch.cuda.device_count()} GPU(s): use at most one process per GPU"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        group = Group(dist.get_rank(), dist.get_world_size())
        log.info("rank %d of %d on %s (%s)", group.rank, group.world, device, dist.get_backend())
        yield group, device
    finally:
        dist.destroy_process_group()


def sum_grads(params: Iterable[torch.Tensor], group: Group) -> None:
    """Sum .grad over the ranks in one flat all-reduce. A parameter without a gradient on every rank keeps
    None (as in one process, where Adam then skips it); one with a gradient somewhere gets the sum."""
    if group.world == 1:
        return
    params = list(params)
    device = params[0].device
    has = group.sum_(torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device))
    live = [p for p, h in zip(params, has.tolist()) if h > 0]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = group.sum_(torch.cat([p.grad.reshape(-1) for p in live]))
    for p, g in zip(live, flat.split([p.numel() for p in live])):
        p.grad.copy_(g.view_as(p.grad))


