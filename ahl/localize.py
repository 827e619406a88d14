"""Localisation: where in an image the heads see the anomaly (heatmaps), and a picture of it (an overlay).

A heatmap is made as DRA and DevNet localise: each spatial head's per-position |score| (what its top-k mean
pools; DRA: seen + pseudo + composite heads, DevNet: its one head) is upsampled bilinearly to the image and summed
over the heads. Only the full-size scale is used: the image score also averages the smaller scales, but their
maps have 1/2, 1/4 ... of its resolution (3 x 3 positions at the demo's 192 px, 2 x 2 at 128 px) and averaging them in blurs the
map (demo before the validation slice, AHL: pixel AUC-ROC 0.76 from the full-size scale, 0.72 with both). `ahl predict` and the evaluate
stage both call ``patch_maps``/``heatmaps``, so the maps predict draws are the ones evaluate's metrics measure.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.nn import functional as F

from ahl.backbones import to_input
from ahl.heads import ScoringHeads
from ahl.model import AnomalyModel

PatchMaps = list[torch.Tensor]  # per spatial head: (B, h, w) at the full-size scale's feature resolution


@torch.no_grad()
def patch_maps(heads: ScoringHeads, features: Sequence[torch.Tensor], reference) -> PatchMaps:
    """The spatial heads' maps (heads in eval mode): features per scale (B, C, H_s, W_s) -> per head (B, h, w) of
    the full-size scale, at feature resolution (small: keep these, upsample when a picture is drawn)."""
    return heads.patch_maps(features[0], reference[0] if reference is not None and heads.uses_reference else None)


def upsample(maps: PatchMaps, size: tuple[int, int]) -> torch.Tensor:
    """Patch maps -> the heatmap (B, H, W) of an image of ``size`` (H, W): each head's map bilinearly, summed."""
    return sum(F.interpolate(m[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0] for m in maps)


def heatmaps(heads: ScoringHeads, features: Sequence[torch.Tensor], reference, size: int) -> torch.Tensor:
    """Heatmaps (B, size, size) of a batch of features (B, C, H_s, W_s) per scale, at the model's input size."""
    return upsample(patch_maps(heads, features, reference), (size, size))


@torch.no_grad()
def image_heatmaps(
    model: AnomalyModel, images: np.ndarray, reference, device: torch.device, batch_size: int
) -> np.ndarray:
    """Heatmaps (N, S, S) float32 of uint8 images (N, S, S, 3) under the base model (eval mode)."""
    model.eval()
    out = [  # the backbone on the full-size image only: the one scale the heatmap uses
        heatmaps(
            model.heads, [model.backbone(to_input(images[i : i + batch_size], device))], reference, images.shape[1]
        )
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out).cpu().numpy() if out else np.zeros((0, *images.shape[1:3]), np.float32)


@torch.no_grad()
def feature_heatmaps(
    heads: ScoringHeads, scales: Sequence[np.ndarray], reference, size: int, device: torch.device, batch_size: int
) -> np.ndarray:
    """Heatmaps (N, size, size) of cached features (per scale (N, C, H, W), e.g. float16) under ``heads``."""
    heads.eval()
    ref = None if reference is None else [torch.tensor(np.asarray(r, np.float32)).to(device) for r in reference]
    out = []
    for start in range(0, len(scales[0]), batch_size):
        full_size = torch.from_numpy(np.asarray(scales[0][start : start + batch_size], np.float32)).to(device)
        out.append(heatmaps(heads, [full_size], ref, size).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, size, size), np.float32)


def overlay(image: np.ndarray, heat: np.ndarray, caption: str = "", alpha: float = 0.5) -> np.ndarray:
    """An image (H, W, 3) uint8 with its heatmap (H, W) drawn over it in the jet colours, from blue (the map's
    minimum) to red (its maximum): each picture depends on its image alone; ``caption`` (e.g. the score) on top."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    heat = np.asarray(heat, np.float64)
    span = heat.max() - heat.min()
    scaled = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    colours = colormaps["jet"](scaled)[..., :3] * 255.0  # (H, W, 3)
    out = Image.fromarray(np.clip((1 - alpha) * image + alpha * colours + 0.5, 0, 255).astype(np.uint8))
    if caption:
        draw = ImageDraw.Draw(out)
        draw.rectangle((0, 0, out.width, 12), fill=(0, 0, 0))
        draw.text((2, 1), caption, fill=(255, 255, 255))
    return np.asarray(out)
