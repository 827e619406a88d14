"""Localisation: where in an image the heads see the anomaly (heatmaps); ahl/evaluation/overlay.py draws them.

A heatmap is made as DRA and DevNet localise: each spatial head's per-position |score| (what its top-k mean
pools; DRA: seen + pseudo + composite heads, DevNet: its one head) is upsampled bilinearly to the image and summed
over the heads. Only the full-size scale is used: the image score also averages the smaller scales, but their
maps have 1/2, 1/4 ... of its resolution and averaging them in blurs the map (docs/performance.md, "Heatmaps").
The maps come from ``score_heads`` (ahl/method/forward.py) with the scores, so the maps `ahl predict` and the export
draw are the ones evaluate's pixel metrics measure.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

PatchMaps = list  # per spatial head: (B, h, w) tensors or arrays at the full-size scale's feature resolution


def upsample(maps: PatchMaps, size: tuple[int, int]) -> torch.Tensor:
    """Patch maps -> the heatmap (B, H, W) of an image of ``size`` (H, W): each head's map bilinearly, summed."""
    maps = [torch.as_tensor(m) for m in maps]
    return sum(F.interpolate(m[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0] for m in maps)
