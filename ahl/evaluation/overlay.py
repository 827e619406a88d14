"""A heatmap drawn over its image (numpy, Pillow and matplotlib only, no torch: the torch-free `ahl infer` draws
with it too)."""

from __future__ import annotations

import numpy as np


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
