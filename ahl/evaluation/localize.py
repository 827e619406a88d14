"""Localisation: where in an image the heads see the anomaly (heatmaps); ahl/evaluation/overlay.py draws them.

A heatmap is made as DRA and DevNet localise: each spatial head's per-position |score| (what its top-k mean
pools; DRA: seen + pseudo + composite heads, DevNet: its one head) is upsampled bilinearly to the image and summed
over the heads. Only the full-size scale is used: the image score also averages the smaller scales, but their
maps have 1/2, 1/4 ... of its resolution and averaging them in blurs the map (docs/performance.md, "Heatmaps").
The scorer (ahl/evaluation/scorer.py) takes the maps from the pass that scores the image, so the maps `ahl predict`
draws are the ones evaluate's pixel metrics measure.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

from ahl.models.heads import ScoringHeads

PatchMaps = list  # per spatial head: (B, h, w) tensors or arrays at the full-size scale's feature resolution


@torch.no_grad()
def patch_maps(heads: ScoringHeads, features: Sequence[torch.Tensor], normal_mean) -> PatchMaps:
    """The spatial heads' maps (heads in eval mode): features per scale (B, C, H_s, W_s) -> per head (B, h, w) of
    the full-size scale, at feature resolution (small: keep these, upsample when a picture is drawn)."""
    return heads.patch_maps(features[0], normal_mean[0] if normal_mean is not None and heads.uses_normal_mean else None)


def upsample(maps: PatchMaps, size: tuple[int, int]) -> torch.Tensor:
    """Patch maps -> the heatmap (B, H, W) of an image of ``size`` (H, W): each head's map bilinearly, summed."""
    maps = [torch.as_tensor(m) for m in maps]
    return sum(F.interpolate(m[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0] for m in maps)


def heatmaps(heads: ScoringHeads, features: Sequence[torch.Tensor], normal_mean, size: int) -> torch.Tensor:
    """Heatmaps (B, size, size) of a batch of features (B, C, H_s, W_s) per scale, at the model's input size."""
    return upsample(patch_maps(heads, features, normal_mean), (size, size))
