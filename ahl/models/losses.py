"""The deviation loss of DevNet, shared by every head of DevNet, DRA and AHL."""

from __future__ import annotations

import torch

N_DRAWS = 5000  # the official code's sample of N(0, 1) per loss call


def deviation_loss(
    scores: torch.Tensor, targets: torch.Tensor, margin: float = 5.0, draws: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean deviation loss of scores (B,) against binary targets (B,) (1 = anomalous for this head).

    dev = (s - mean(r)) / std(r) with r ~ N(0, 1). By default we use the distribution's own mean 0 and std 1,
    which is the same in expectation and deterministic, so dev = s. ``draws``: a sample r (the official
    code draws 5,000 per call; ``base.deviation_reference: sampled``), used as given.
    L = (1 - y) |dev| + y max(0, margin - dev).
    """
    targets = targets.to(scores.dtype)
    dev = scores
    if draws is not None:
        draws = draws.to(scores)
        dev = (scores - draws.mean()) / draws.std()
    inlier = torch.abs(dev)
    outlier = torch.clamp(margin - dev, min=0.0)
    return torch.mean((1.0 - targets) * inlier + targets * outlier)
