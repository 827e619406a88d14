"""What DevNet's and DRA's scoring heads share: top-k pooling, the patch head, and the heads interface.

A set of heads maps the backbone's feature maps at every scale to one score per head and image; AHL trains
exactly these modules (on cached features), so the interface is the same for base training and for AHL.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ahl.losses import deviation_loss

# Labels used everywhere: 0 = normal, 1 = seen (labelled) anomaly, 2 = pseudo anomaly.
NORMAL, SEEN, PSEUDO = 0, 1, 2


def topk_mean(x: torch.Tensor, rate: float) -> torch.Tensor:
    """Mean of the top ``rate`` fraction of |x| over positions: (B, 1, H, W) -> (B,)."""
    x = x.flatten(1).abs()  # (B, H*W)
    k = max(int(x.shape[1] * rate), 1)
    return torch.topk(x, k, dim=1).values.mean(dim=1)


class PatchHead(nn.Module):
    """DevNet's head and DRA's seen/pseudo heads: a 1x1 conv scores each position; top-k mean of |.|."""

    def __init__(self, in_channels: int, topk: float):
        super().__init__()
        self.topk = topk
        self.conv = nn.Conv2d(in_channels, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B,)
        return topk_mean(self.conv(x), self.topk)


class ScoringHeads(nn.Module):
    """Base class of a model's heads. Subclasses set ``head_names`` and implement ``score_scale``."""

    head_names: tuple[str, ...] = ()
    uses_reference: bool = False

    def score_scale(self, features: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
        """Scores of every head at one scale: features (B, C, H, W) -> (B, n_heads)."""
        raise NotImplementedError

    def forward(
        self, features: Sequence[torch.Tensor], reference: Sequence[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Per-head scores averaged over the scales: list of (B, C, H_s, W_s) -> (B, n_heads)."""
        per_scale = [
            self.score_scale(f, reference[s] if reference is not None else None) for s, f in enumerate(features)
        ]
        return torch.stack(per_scale, dim=0).mean(dim=0)

    def targets(self, labels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """For each head: (mask of the samples it trains on, its binary target). labels: (B,) in {0, 1, 2}."""
        raise NotImplementedError

    def loss(self, scores: torch.Tensor, labels: torch.Tensor, margin: float = 5.0) -> torch.Tensor:
        """Sum over heads of the deviation loss on the samples each head trains on."""
        total = scores.new_zeros(())
        for h, (mask, target) in enumerate(self.targets(labels)):
            if mask.any():
                total = total + deviation_loss(scores[mask, h], target[mask], margin)
        return total

    def final_score(self, scores: torch.Tensor) -> torch.Tensor:
        """The anomaly score of each image from its per-head scores: (B, n_heads) -> (B,)."""
        raise NotImplementedError


def build_heads(
    model: str, in_channels: int, topk: float = 0.1, hidden: int = 256, official_geometry: bool = False
) -> ScoringHeads:
    """Heads of ``model`` ("dra" or "devnet") for a backbone with ``in_channels`` output channels."""
    from ahl.devnet import DevNetHeads
    from ahl.dra import DRAHeads

    if model == "dra":
        return DRAHeads(in_channels, topk=topk, hidden=hidden, official_geometry=official_geometry)
    if model == "devnet":
        return DevNetHeads(in_channels, topk=topk)
    raise ValueError(f"unknown model {model!r}: expected 'dra' or 'devnet'")
