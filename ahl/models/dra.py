"""DRA (Ding, Pang, Shen, CVPR 2022): four heads on one feature map, each trained with the deviation loss.

holistic (learns normality, enters the score negated), seen anomalies, pseudo anomalies, and the composite
(latent residual) head that compares each image with the mean feature of a reference set of normals.
"""

from __future__ import annotations

from fractions import Fraction

import torch
from torch import nn

from ahl.models.heads import (
    Memo,
    ModelSpec,
    PatchHead,
    ScoringHeads,
    conv_as_matmul,
    memoised,
    register_model,
    topk_mean,
)
from ahl.models.labels import NORMAL, PSEUDO, SEEN


class HolisticHead(nn.Module):
    """Global average pool -> FC(C, hidden) -> ReLU -> FC(hidden, 1) -> |.|."""

    def __init__(self, in_channels: int, hidden: int = 256):
        super().__init__()
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, memo: Memo | None = None) -> torch.Tensor:  # (B, C, H, W) -> (B,)
        x = memoised(memo, ("spatial mean",), lambda: x.mean(dim=(2, 3)))  # (B, C)
        return self.fc2(torch.relu(self.fc1(x))).abs()[:, 0]


class CompositeHead(nn.Module):
    """Latent residual head: (normal_mean - x) -> conv3x3 (padding 1) + BatchNorm + ReLU -> patch head.

    DRA's geometry (padding 1, trainable BatchNorm with the default init). The official AHL code uses stride 3,
    no padding and a BatchNorm initialised to zero, which makes this head output 0 and receive no gradient;
    ``official_geometry=True`` reproduces only the stride/padding, for like-for-like comparisons.
    """

    def __init__(self, in_channels: int, topk: float = 0.1, official_geometry: bool = False):
        super().__init__()
        stride, padding = (3, 0) if official_geometry else (1, 1)
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=stride, padding=padding),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(),
        )
        self.patch = PatchHead(in_channels, topk)

    def residual(self, x: torch.Tensor, normal_mean: torch.Tensor, memo: Memo | None = None) -> torch.Tensor:
        """conv(normal_mean - x) -> BatchNorm -> ReLU: x (B, C, H, W), normal_mean (C, H, W) (the mean feature of the
        reference normals at this scale) -> (B, C, H', W'), channels_last."""
        conv, norm, relu = self.conv
        return relu(norm(conv_as_matmul(x, conv, normal_mean, memo)))

    def forward(self, x: torch.Tensor, normal_mean: torch.Tensor, memo: Memo | None = None) -> torch.Tensor:
        return self.patch(self.residual(x, normal_mean, memo))

    def patch_map(self, x: torch.Tensor, normal_mean: torch.Tensor) -> torch.Tensor:  # -> (B, H', W')
        return self.patch.patch_map(self.residual(x, normal_mean))


class DRAHeads(ScoringHeads):
    head_names = ("holistic", "seen", "pseudo", "composite")
    uses_normal_mean = True

    def __init__(
        self, in_channels: int, *, topk: float, margin: float, official_geometry: bool = False, hidden: int = 256
    ):
        super().__init__(topk, margin)
        self.holistic_head = HolisticHead(in_channels, hidden)
        self.seen_head = PatchHead(in_channels, topk)
        self.pseudo_head = PatchHead(in_channels, topk)
        self.composite_head = CompositeHead(in_channels, topk, official_geometry)

    def score_scale(
        self, features: torch.Tensor, normal_mean: torch.Tensor | None, memo: Memo | None = None
    ) -> torch.Tensor:
        if normal_mean is None:
            raise ValueError("DRA's composite head needs normal_mean (the mean normal feature) of every scale")
        return torch.stack(
            [
                self.holistic_head(features, memo),
                self.seen_head(features),
                self.pseudo_head(features),
                self.composite_head(features, normal_mean, memo),
            ],
            dim=1,
        )  # (B, 4)

    def targets(self, labels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        everyone = torch.ones_like(labels, dtype=torch.bool)
        return [
            (everyone, labels == NORMAL),  # holistic head learns normality
            (labels != PSEUDO, labels == SEEN),  # seen head: normals vs seen anomalies
            (labels != SEEN, labels == PSEUDO),  # pseudo head: normals vs pseudo anomalies
            (everyone, labels != NORMAL),  # composite head: normal vs any anomaly
        ]

    def final_score(self, scores: torch.Tensor) -> torch.Tensor:
        holistic, seen, pseudo, composite = scores.unbind(dim=1)
        return -holistic + seen + pseudo + composite

    def patch_maps(self, features: torch.Tensor, normal_mean: torch.Tensor | None) -> list[torch.Tensor]:
        # The holistic head pools globally and has no map: seen + pseudo + composite, as DRA localises.
        if normal_mean is None:
            raise ValueError("DRA's composite head needs normal_mean (the mean normal feature) of every scale")
        return [
            self.seen_head.patch_map(features),
            self.pseudo_head.patch_map(features),
            self.composite_head.patch_map(features, normal_mean),
        ]


# Base batches: 2/3 normal slots (half of them become CutPaste pseudo anomalies) and 1/3 seen anomalies.
SPEC = register_model(
    ModelSpec("dra", DRAHeads, anomaly_share=Fraction(1, 3), pseudo_anomalies=True, uses_normal_mean=True,
              lr_step_at_epoch_start=True)
)

__all__ = ["SPEC", "CompositeHead", "DRAHeads", "HolisticHead", "topk_mean"]
