"""Scoring in one place: images through a base model, cached features through a set of heads (any weights).

Everything here runs in eval mode under no_grad; training code (base or AHL) calls the same functions, so a
score seen during training is the score evaluation reports.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager

import numpy as np
import torch
from torch.func import functional_call

from ahl.backbones import to_input
from ahl.features import FeatureSet
from ahl.heads import ScoringHeads
from ahl.model import AnomalyModel
from ahl.runtime import Runtime, plain

Params = dict[str, torch.Tensor]


def forward(heads: ScoringHeads, params: Params, buffers: Params, features, reference, memo=None) -> torch.Tensor:
    """Per-head scores (B, n_heads) of ``heads`` run with the weights ``params`` (theta_g or an adapted phi_i);
    ``memo``: one ahl.heads.Memo per scale of a batch that is forwarded again."""
    args = (features, reference if heads.uses_reference else None, memo)
    return functional_call(heads, (params, buffers), args)


@torch.no_grad()
def score_images(
    model: AnomalyModel,
    images: np.ndarray,
    reference: Sequence[torch.Tensor] | None,
    device: torch.device,
    batch_size: int,
    runtime: Runtime | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(final scores (N,), per-head scores (N, n_heads)) of uint8 images (N, S, S, 3), model in eval mode.
    ``runtime`` (None: float32, eager) prepares the backbone in place and sets the autocast dtype."""
    runtime = runtime or plain(device)
    model.eval()
    runtime.prepare(model.backbone)
    heads = []
    for start in range(0, len(images), batch_size):
        x = runtime.input(to_input(images[start : start + batch_size], device))
        with runtime.autocast():
            heads.append(model(x, reference).float().cpu())
    per_head = torch.cat(heads)
    return model.heads.final_score(per_head).numpy(), per_head.numpy()


@torch.no_grad()
def final_scores(
    heads: ScoringHeads,
    params: Params,
    buffers: Params,
    chunks: Iterable[list[torch.Tensor]],
    reference,
    autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
) -> np.ndarray:
    """Final scores (N,) in eval mode of ``heads`` with weights ``params`` on an iterable of feature lists;
    ``autocast`` is Runtime.autocast for bfloat16 forward passes."""
    was_training = heads.training
    heads.eval()

    def score(f):
        with autocast():
            per_head = forward(heads, params, buffers, f, reference)
        return heads.final_score(per_head.float()).cpu()

    try:
        out = [score(f) for f in chunks]
    finally:
        heads.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def score_features(
    features: FeatureSet,
    heads: ScoringHeads,
    reference: Sequence[np.ndarray | torch.Tensor] | None,
    device: torch.device | str,
    batch_size: int,
    runtime: Runtime | None = None,
) -> np.ndarray:
    """Final anomaly score (N,) of every image of a FeatureSet under ``heads`` (eval mode, no gradient);
    ``runtime`` (None: float32) sets the autocast dtype."""
    device = torch.device(device)
    runtime = runtime or plain(device)
    ref = None
    if reference is not None:
        ref = [torch.from_numpy(np.array(r, dtype=np.float32)).to(device) for r in reference]
    params = {n: p.detach() for n, p in heads.named_parameters()}
    buffers = dict(heads.named_buffers())

    def chunks():
        for start in range(0, len(features), batch_size):
            stop = min(start + batch_size, len(features))
            yield [torch.from_numpy(np.asarray(x[start:stop], dtype=np.float32)).to(device) for x in features.scales]

    return final_scores(heads, params, buffers, chunks(), ref, runtime.autocast)
