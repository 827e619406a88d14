"""What DevNet's and DRA's scoring heads share: top-k pooling, the patch head, the heads interface, the ensemble
of the "no CDL" ablation, and the model registry (a name -> its heads and how its base batches are made).

A set of heads maps the backbone's feature maps at every scale to one score per head and image; AHL trains
exactly these modules (on cached features), so the interface is the same for base training and for AHL. The
heads carry their top-k rate and deviation-loss margin, so AHL trains with the base model's values.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Sequence

import torch
from torch import nn

from ahl.errors import UserError
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

    def patch_map(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, H, W): what top-k pools
        return self.conv(x)[:, 0].abs()


class ScoringHeads(nn.Module):
    """Base class of a model's heads. Subclasses set ``head_names`` and implement ``score_scale``."""

    head_names: tuple[str, ...] = ()
    uses_reference: bool = False

    def __init__(self, topk: float, margin: float):
        super().__init__()
        self.topk = topk  # fraction of positions the patch heads average
        self.margin = margin  # a of the deviation loss

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

    def loss(self, scores: torch.Tensor, labels: torch.Tensor, counts: Sequence[int] | None = None) -> torch.Tensor:
        """Sum over heads of the deviation loss (margin ``self.margin``) on the samples each head trains on.
        ``counts``: when the rows are one rank's share of a larger batch, each head's samples in the whole batch
        (head_counts); each head's mean then becomes this rank's part of the whole batch's mean."""
        total = scores.new_zeros(())
        for h, (mask, target) in enumerate(self.targets(labels)):
            if mask.any():
                loss = deviation_loss(scores[mask, h], target[mask], self.margin)
                total = total + (loss if counts is None else loss * (int(mask.sum()) / counts[h]))
        return total

    def head_counts(self, labels: torch.Tensor) -> list[int]:
        """The number of samples each head trains on in a batch of ``labels``."""
        return [int(mask.sum()) for mask, _ in self.targets(labels)]

    def final_score(self, scores: torch.Tensor) -> torch.Tensor:
        """The anomaly score of each image from its per-head scores: (B, n_heads) -> (B,)."""
        raise NotImplementedError

    def patch_maps(self, features: torch.Tensor, reference: torch.Tensor | None) -> list[torch.Tensor]:
        """Localisation at one scale: the |score| of every position of each spatial head, before top-k pooling:
        features (B, C, H, W) -> list of (B, h, w) (ahl/localize.py upsamples, sums and averages them)."""
        raise NotImplementedError(f"{type(self).__name__} has no spatial heads to localise with")


class HeadsEnsemble(ScoringHeads):
    """Ablation "independent heads averaged": T copies of the heads; the final score is the mean of theirs."""

    def __init__(self, members: Sequence[ScoringHeads]):
        super().__init__(members[0].topk, members[0].margin)
        self.members = nn.ModuleList(members)
        names = members[0].head_names
        self.head_names = tuple(f"{name}.{k}" for k in range(len(members)) for name in names)
        self.uses_reference = members[0].uses_reference

    def forward(self, features, reference=None) -> torch.Tensor:  # -> (B, T * n_heads)
        return torch.cat([m(features, reference) for m in self.members], dim=1)

    def final_score(self, scores: torch.Tensor) -> torch.Tensor:
        per_member = scores.view(scores.shape[0], len(self.members), -1)  # (B, T, n_heads)
        return torch.stack([m.final_score(per_member[:, k]) for k, m in enumerate(self.members)], 1).mean(1)

    def patch_maps(self, features: torch.Tensor, reference: torch.Tensor | None) -> list[torch.Tensor]:
        # The final score averages the members, so the map does too: each member's maps divided by T.
        return [m / len(self.members) for member in self.members for m in member.patch_maps(features, reference)]


# --------------------------------------------------------------------------------------------------------------
# The model registry: ahl/dra.py and ahl/devnet.py register themselves; ahl/model.py imports both.


@dataclass(frozen=True)
class ModelSpec:
    """Everything the pipeline knows about a base model besides its heads' code.

    heads: (in_channels, *, topk, margin, official_geometry) -> the model's ScoringHeads.
    anomaly_share: fraction of a base-training batch filled with seen anomalies (the rest are normal slots).
    pseudo_anomalies: base training turns each normal slot into a CutPaste pseudo anomaly with probability
        base.pseudo_prob (DRA's pseudo head needs them).
    uses_reference: the heads compare each image with the mean feature of base.n_ref reference normals.
    lr_step_at_epoch_start: base training steps its StepLR before each epoch (official DRA) instead of after
        (official DevNet).
    """

    name: str
    heads: Callable[..., ScoringHeads]
    anomaly_share: Fraction
    pseudo_anomalies: bool
    uses_reference: bool
    lr_step_at_epoch_start: bool


MODELS: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    if spec.name in MODELS:
        raise ValueError(f"model {spec.name!r} registered twice")
    MODELS[spec.name] = spec
    return spec


def get_model(name: str) -> ModelSpec:
    if name not in MODELS:
        raise UserError(f"params.yaml: base.model = {name!r} is not a model; known: {', '.join(sorted(MODELS))}")
    return MODELS[name]
