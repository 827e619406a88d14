"""AHL's tasks over the ranks of a torchrun group: which rank trains which task's model, the BatchNorm statistics
and the scores they share, so that several processes give the single-process result."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

from ahl.core.distributed import Group, comm_device, sum_grads


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
        self.pool: tuple = ()  # (final_scores, chunks, normal_mean) of psi's query pool
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

    def score(self, i: int, phi: dict, out: np.ndarray, final_scores: Callable, chunks: Callable, normal_mean) -> None:
        """psi's pool scores of phi_i (ahl.method.forward.final_scores of ``chunks()``) into column i of ``out``: at
        once with one process, at ``finish`` with several (once the statistics of the tasks before i are known)."""
        if self.group.world == 1:
            out[:, i] = final_scores(self.module, phi, dict(self.module.named_buffers()), chunks(), normal_mean)
        else:
            self.phis[i], self.pool = phi, (final_scores, chunks, normal_mean)

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
        after = self._replay(group.sum_(self.deltas.to(comm_device())).cpu()) if self.norms else None
        if pool_scores is not None:
            for i, phi in self.phis.items():
                buffers = after[i] if after else dict(self.module.named_buffers())
                final_scores, chunks, normal_mean = self.pool
                pool_scores[:, i] = final_scores(self.module, phi, buffers, chunks(), normal_mean)
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
