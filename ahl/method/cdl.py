"""Collaborative differentiable learning (AHL section 2): the maths of the meta-gradient of one task.

theta_g (the shared heads) is adapted to a task by plain gradient steps on its support batches (phi_i); the
weighted query loss of phi_i flows back through the inner steps into theta_g's ``.grad``. The trainer
(ahl/method/train_ahl.py) sums these over the tasks and takes one clipped Adam step on theta_g.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager

import torch

from ahl.method.forward import Weights, forward
from ahl.models.heads import ScoringHeads

# (features per scale (B, C, H_s, W_s), labels (B,)), and optionally a third item: one ahl.models.heads.Memo per
# scale, for a support batch that comes back in later rounds (what the heads derive from its features alone is then
# kept)
Batch = tuple[list[torch.Tensor], torch.Tensor] | tuple[list[torch.Tensor], torch.Tensor, list[dict]]
Autocast = Callable[[], AbstractContextManager]  # Runtime.autocast: forward passes in bfloat16, or a no-op


def adapt(
    heads: ScoringHeads,
    theta: Weights,
    buffers: Weights,
    support: Iterable[Batch],
    normal_mean: list[torch.Tensor] | None,
    inner_lr: float,
    second_order: bool,
    autocast: Autocast = contextlib.nullcontext,
) -> tuple[Weights, list[torch.Tensor]]:
    """phi_i: gradient steps from theta on the support batches; returns phi and the support losses (detached).

    The first step keeps its graph (create_graph) when ``second_order``, so the meta-gradient includes the
    Hessian term (I - inner_lr * H) of that step; later steps are first order: their gradients are constants,
    so phi_k = phi_1 - inner_lr * sum(g) and no graph of their forward/backward passes is kept.
    BatchNorm (DRA's composite head) runs in train mode on batch statistics; its running statistics are the
    shared buffers of theta_g, updated in place by every inner and query pass (as in ordinary training), and
    used in eval mode when scoring. ``autocast`` wraps the forward passes only (the gradients run outside it).
    """
    phi = dict(theta)
    names = list(phi)
    losses = []
    for k, (features, labels, *memo) in enumerate(support):
        with autocast():
            loss = heads.loss(forward(heads, phi, buffers, features, normal_mean, *memo), labels)
        create_graph = second_order and k == 0
        grads = torch.autograd.grad(loss, [phi[n] for n in names], create_graph=create_graph, allow_unused=True)
        phi = {n: phi[n] if g is None else phi[n] - inner_lr * g for n, g in zip(names, grads)}
        losses.append(loss.detach())
    return phi, losses


def query_loss(
    heads: ScoringHeads, phi: Weights, buffers: Weights, features, labels, normal_mean,
    autocast: Autocast = contextlib.nullcontext,
) -> torch.Tensor:  # fmt: skip
    """L_query(phi_i): the heads' deviation loss of the adapted model on a query batch."""
    with autocast():
        return heads.loss(forward(heads, phi, buffers, features, normal_mean), labels)


def task_meta_gradient(
    heads: ScoringHeads,
    theta: Weights,
    buffers: Weights,
    support: Iterable[Batch],
    queries: Sequence[Batch] | Iterable[Batch],
    n_queries: int,
    normal_mean: list[torch.Tensor] | None,
    *,
    weight: float,
    inner_lr: float,
    second_order: bool,
    autocast: Autocast = contextlib.nullcontext,
) -> tuple[Weights, list[torch.Tensor], float]:
    """Adapt theta to a task, then add ``weight`` * L_query(phi) (the mean over the ``n_queries`` query batches)
    to theta's ``.grad``. Returns (phi detached, the support losses, L_query). Only this task's graph is alive
    while it runs; it is freed when the function returns."""
    phi, support_losses = adapt(heads, theta, buffers, support, normal_mean, inner_lr, second_order, autocast)
    total = 0.0
    for q, (features, labels) in enumerate(queries):
        loss = query_loss(heads, phi, buffers, features, labels, normal_mean, autocast) / n_queries
        # retain the inner graph (shared by the task's query batches) until its last query batch
        (weight * loss).backward(retain_graph=q < n_queries - 1)
        total += float(loss.detach())
    return {n: p.detach() for n, p in phi.items()}, support_losses, total
