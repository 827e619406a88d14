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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

from ahl.config import at_least
from ahl.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedConfig:
    # processes (one per GPU; gloo processes on CPU) that train_base, features and train_ahl run on; > 1 makes
    # `python stages/X.py` (and so `dvc repro`) start itself under torchrun
    nproc: int = 1

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
        out = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64)).to(_comm_device())
        return self.sum_(out).cpu().numpy().astype(array.dtype)

    def broadcast_array(self, array: np.ndarray) -> np.ndarray:
        """Rank 0's array on every rank."""
        if self.world == 1:
            return array
        out = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64)).to(_comm_device())
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


def _comm_device() -> torch.device:
    """Where collective tensors live: the rank's GPU under nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def relaunch(config: DistributedConfig, argv: list[str]) -> None:
    """With nproc > 1 and not yet under torchrun, replace this process by ``torchrun --nproc-per-node nproc``
    running the same script and arguments (what `dvc repro` runs is always `python stages/X.py`)."""
    if config.nproc > 1 and not under_torchrun():
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


class TaskSplit:
    """AHL's tasks over the ranks, with the result of the single-process loop over them.

    One process: ``begin`` is always True and ``score`` scores the pool at once (the code path is unchanged).
    Several: rank r runs tasks r, r + world, ...; BatchNorm's running statistics (updated in place by every
    train-mode pass, and read by the eval-mode pool scoring after each task) are recorded per task from zero and
    recombined in task order (r <- (1 - m)^n r + delta: the update is affine), so that each phi_i is scored with
    the statistics the sequential loop would have had; the meta-gradients, losses and pool scores are summed.
    """

    def __init__(self, group: Group, module: torch.nn.Module, n_tasks: int):
        self.group, self.module, self.n = group, module, n_tasks
        self.norms = {n: m for n, m in module.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats}
        if group.world > 1 and any(m.momentum is None for m in self.norms.values()):
            raise NotImplementedError("tasks over ranks need BatchNorm with a momentum (not a cumulative average)")
        self.start = {n: _stats(m).clone() for n, m in self.norms.items()}
        self.deltas = torch.zeros(n_tasks, sum(len(s) for s in self.start.values()), dtype=torch.float64)
        self.phis: dict[int, dict] = {}
        self.pool: tuple = ()  # (final_scores, chunks, reference) of psi's query pool
        self.current: int | None = None  # this rank's task in progress (its statistics not yet recorded)

    def begin(self, i: int) -> bool:
        """Whether task i is this rank's; if so (several ranks), its BatchNorm statistics start from zero."""
        if self.group.world == 1:
            return True
        if not self.group.owns(i):
            return False
        self._record()
        for m in self.norms.values():
            m.running_mean.zero_(), m.running_var.zero_(), m.num_batches_tracked.zero_()
        self.current = i
        return True

    def _record(self) -> None:
        """The statistics the current task accumulated from zero (its delta)."""
        if self.current is not None and self.norms:
            self.deltas[self.current] = torch.cat([_stats(m) for m in self.norms.values()]).cpu()
        self.current = None

    def score(self, i: int, phi: dict, out: np.ndarray, final_scores: Callable, chunks: Callable, reference) -> None:
        """psi's pool scores of phi_i (ahl.scoring.final_scores of ``chunks()``) into column i of ``out``: at once
        with one process, at ``finish`` with several (once the statistics of the tasks before i are known)."""
        if self.group.world == 1:
            out[:, i] = final_scores(self.module, phi, dict(self.module.named_buffers()), chunks(), reference)
        else:
            self.phis[i], self.pool = phi, (final_scores, chunks, reference)

    def finish(self, losses: Iterable[np.ndarray], pool_scores: np.ndarray | None) -> None:
        """Sum the meta-gradients and per-task losses (filled in place), restore the sequential BatchNorm
        statistics, score this rank's phi_i with them and sum the pool scores."""
        group = self.group
        if group.world == 1:
            return
        self._record()
        sum_grads(self.module.parameters(), group)
        for array in losses:
            array[:] = group.sum_array(array)
        after = self._replay(group.sum_(self.deltas.to(_comm_device())).cpu()) if self.norms else None
        if pool_scores is not None:
            for i, phi in self.phis.items():
                buffers = after[i] if after else dict(self.module.named_buffers())
                final_scores, chunks, reference = self.pool
                pool_scores[:, i] = final_scores(self.module, phi, buffers, chunks(), reference)
            pool_scores[:] = group.sum_array(pool_scores)

    def _replay(self, deltas: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """The buffers after each task of the sequential loop; leaves the module's at the last task's."""
        state = {n: s.double() for n, s in self.start.items()}
        buffers, after = dict(self.module.named_buffers()), []
        for i in range(self.n):
            offset, current = 0, dict(buffers)
            for name, m in self.norms.items():
                d, s = deltas[i, offset : offset + 2 * m.num_features + 1], state[name]  # (mean, var, count)
                decay = (1.0 - m.momentum) ** float(d[-1])  # n passes of r <- (1 - m) r + m x
                state[name] = torch.cat([decay * s[:-1] + d[:-1], s[-1:] + d[-1:]])
                offset += len(d)
                current.update(_as_buffers(name, m, state[name]))
            after.append(current)
        for name, m in self.norms.items():
            for key, value in _as_buffers(name, m, state[name]).items():
                buffers[key].copy_(value)
        return after


def share_members(models: list[torch.nn.Module], losses: np.ndarray, group: Group) -> np.ndarray:
    """The independent-heads ablation over ranks: member i (trained by rank i % world) is copied to every rank;
    returns the losses (each rank's own entries, zeros elsewhere) summed."""
    if group.world == 1:
        return losses
    for i, model in enumerate(models):
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, i % group.world)
    return group.sum_array(losses)


def _stats(m: _BatchNorm) -> torch.Tensor:
    """(running_mean, running_var, num_batches_tracked) of one BatchNorm as one float64 vector."""
    return torch.cat([m.running_mean.double(), m.running_var.double(), m.num_batches_tracked.double().view(1)])


def _as_buffers(name: str, m: _BatchNorm, state: torch.Tensor) -> dict[str, torch.Tensor]:
    c, dtype, device = m.num_features, m.running_mean.dtype, m.running_mean.device
    return {
        f"{name}.running_mean": state[:c].to(device, dtype),
        f"{name}.running_var": state[c : 2 * c].to(device, dtype),
        f"{name}.num_batches_tracked": state[2 * c].round().to(device, torch.long),
    }
