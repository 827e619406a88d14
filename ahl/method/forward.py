"""Heads run with any weights: the functional forward pass AHL's training adapts (theta_g, a task's phi_i), and
the final scores of cached features under such weights (eval mode, no gradient).

Images are scored by ahl/evaluation/scorer.py alone; it runs the heads through ``forward`` too, so a score seen
during AHL's training is the score evaluation reports.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager

import numpy as np
import torch
from torch.func import functional_call

from ahl.core.runtime import Runtime, plain
from ahl.method.cache import FeatureSet
from ahl.models.heads import ScoringHeads

Weights = dict[str, torch.Tensor]  # a set of heads' parameters (or buffers) by name


def forward(heads: ScoringHeads, params: Weights, buffers: Weights, features, normal_mean, memo=None) -> torch.Tensor:
    """Per-head scores (B, n_heads) of ``heads`` run with the weights ``params`` (theta_g or an adapted phi_i);
    ``memo``: one ahl.models.heads.Memo per scale of a batch that is forwarded again."""
    args = (features, normal_mean if heads.uses_normal_mean else None, memo)
    return functional_call(heads, (params, buffers), args)


@torch.no_grad()
def final_scores(
    heads: ScoringHeads,
    params: Weights,
    buffers: Weights,
    chunks: Iterable[list[torch.Tensor]],
    normal_mean,
    autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
) -> np.ndarray:
    """Final scores (N,) in eval mode of ``heads`` with weights ``params`` on an iterable of feature lists;
    ``autocast`` is Runtime.autocast for bfloat16 forward passes."""
    was_training = heads.training
    heads.eval()

    def score(f):
        with autocast():
            per_head = forward(heads, params, buffers, f, normal_mean)
        return heads.final_score(per_head.float()).cpu()

    try:
        out = [score(f) for f in chunks]
    finally:
        heads.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def score_features(
    features: FeatureSet,
    heads: ScoringHeads,
    normal_mean: Sequence[np.ndarray | torch.Tensor] | None,
    device: torch.device | str,
    batch_size: int,
    runtime: Runtime | None = None,
) -> np.ndarray:
    """Final anomaly score (N,) of every image of a FeatureSet under ``heads`` (eval mode, no gradient);
    ``runtime`` (None: float32) sets the autocast dtype."""
    device = torch.device(device)
    runtime = runtime or plain(device)
    ref = None
    if normal_mean is not None:
        ref = [torch.from_numpy(np.array(r, dtype=np.float32)).to(device) for r in normal_mean]
    params = {n: p.detach() for n, p in heads.named_parameters()}
    buffers = dict(heads.named_buffers())
    return final_scores(heads, params, buffers, features.batches(batch_size, device), ref, runtime.autocast)
