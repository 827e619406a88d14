"""Heads run with any weights: the functional forward pass AHL's training adapts (theta_g, a task's phi_i), and
``score_heads``, the one way features become (final score, per-head scores, anomaly maps).

``score_heads`` owns the feature rounding (AHL's heads see features rounded to the cache's dtype) and is what
scores heads everywhere: the scorer (calibrate, evaluate, ``ahl predict``, the Python API), train_ahl's per-epoch
and psi-pool scores (``final_scores``) and the exported graph (ahl/deploy/export.py), so the lab, the training
curves and the line compute one thing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import functional_call

from ahl.core.runtime import Runtime, plain
from ahl.method.cache import FeatureSet, as_cached
from ahl.models.heads import ScoringHeads

Weights = dict[str, torch.Tensor]  # a set of heads' parameters (or buffers) by name


def forward(heads: ScoringHeads, params: Weights, buffers: Weights, features, normal_mean, memo=None) -> torch.Tensor:
    """Per-head scores (B, n_heads) of ``heads`` run with the weights ``params`` (theta_g or an adapted phi_i);
    ``memo``: one ahl.models.heads.Memo per scale of a batch that is forwarded again."""
    args = (features, normal_mean if heads.uses_normal_mean else None, memo)
    return functional_call(heads, (params, buffers), args)


@dataclass
class HeadScores:
    """What heads make of one batch of features."""

    final: torch.Tensor  # (B,) the final anomaly score
    per_head: torch.Tensor  # (B, n_heads) every head's score
    maps: list[torch.Tensor]  # every spatial head's map of the full-size scale (B, h, w), at feature resolution


def score_heads(
    heads: ScoringHeads,
    features: Sequence[torch.Tensor],
    normal_mean,
    *,
    feature_dtype: str | None = None,
    params: Weights | None = None,
    buffers: Weights | None = None,
    maps: bool = True,
    autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
) -> HeadScores:
    """Features per scale (B, C, H_s, W_s) -> final score, per-head scores and (``maps``) the spatial heads' maps.

    ``feature_dtype``: round the features to the feature cache's dtype first (AHL's heads trained on the cache;
    a no-op on features read from it); ``params``/``buffers``: other weights than the heads' own (a task's
    phi_i; maps need the heads' own); ``autocast``: Runtime.autocast for bfloat16 forward passes."""
    if maps and params is not None:
        raise ValueError("score_heads: maps are drawn with the heads' own weights; pass maps=False with params")
    features = as_cached(features, feature_dtype)
    mean = normal_mean if heads.uses_normal_mean else None
    params = params if params is not None else {n: p.detach() for n, p in heads.named_parameters()}
    buffers = buffers if buffers is not None else dict(heads.named_buffers())
    with autocast():
        per_head = forward(heads, params, buffers, features, mean).float()
        spatial = heads.patch_maps(features[0], mean[0] if mean is not None else None) if maps else []
    return HeadScores(heads.final_score(per_head), per_head, [m.float() for m in spatial])


@torch.no_grad()
def final_scores(
    heads: ScoringHeads,
    params: Weights,
    buffers: Weights,
    chunks: Iterable[list[torch.Tensor]],
    normal_mean,
    autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
) -> np.ndarray:
    """Final scores (N,) in eval mode of ``heads`` with weights ``params`` on an iterable of feature lists (cached
    features); ``autocast`` is Runtime.autocast for bfloat16 forward passes."""
    was_training = heads.training
    heads.eval()

    def score(f):
        return score_heads(heads, f, normal_mean, params=params, buffers=buffers, maps=False, autocast=autocast)

    try:
        out = [score(f).final.cpu() for f in chunks]
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
