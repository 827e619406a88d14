"""DevNet for images (Pang et al., arXiv 2108.00462): one patch head trained with the deviation loss."""

from __future__ import annotations

from fractions import Fraction

import torch

from ahl.models.heads import ModelSpec, PatchHead, ScoringHeads, register_model
from ahl.models.labels import NORMAL


class DevNetHeads(ScoringHeads):
    head_names = ("seen",)

    def __init__(self, in_channels: int, *, topk: float, margin: float, official_geometry: bool = False):
        super().__init__(topk, margin)  # official_geometry concerns DRA's composite head only
        self.seen_head = PatchHead(in_channels, topk)

    def score_scale(self, features: torch.Tensor, normal_mean: torch.Tensor | None, memo=None) -> torch.Tensor:
        return self.seen_head(features)[:, None]  # (B, 1); the 1x1 head derives nothing worth a memo

    def targets(self, labels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # Seen and pseudo anomalies (AHL's tasks add pseudo ones) are both "anomalous" for the single head.
        return [(torch.ones_like(labels, dtype=torch.bool), labels != NORMAL)]

    def final_score(self, scores: torch.Tensor) -> torch.Tensor:
        return scores[:, 0]

    def patch_maps(self, features: torch.Tensor, normal_mean: torch.Tensor | None) -> list[torch.Tensor]:
        return [self.seen_head.patch_map(features)]


# Base batches: half normals, half seen anomalies.
SPEC = register_model(
    ModelSpec("devnet", DevNetHeads, anomaly_share=Fraction(1, 2), pseudo_anomalies=False, uses_normal_mean=False,
              lr_step_at_epoch_start=False)
)
