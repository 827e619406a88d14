"""Images as an exported graph and the scorer take them: uint8 RGB (N, S, S, 3) at the run's size, from arrays or
image files (numpy and Pillow only: `load_exported` imports this, and a line's first result should not wait for
pandas)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ahl.core.errors import UserError
from ahl.data.mvtec import load_image


def as_images(images, size: int) -> np.ndarray:
    """uint8 RGB images (N, size, size, 3) from such an array (or one image (size, size, 3)), from floats in
    [0, 1] (rounded to 8 bits, as the training images were), or from image files (read as the stages read them)."""
    if isinstance(images, (str, Path)):
        images = [images]
    if isinstance(images, (list, tuple)) and all(isinstance(i, (str, Path)) for i in images):
        return np.stack([load_image(p, size) for p in images]) if images else np.zeros((0, size, size, 3), np.uint8)
    x = np.asarray(images)
    x = x[None] if x.ndim == 3 else x
    if x.ndim != 4 or x.shape[1:] != (size, size, 3):
        raise UserError(
            f"images must be RGB (N, {size}, {size}, 3) at the run's size, got shape {np.shape(images)}; resize "
            f"them (PIL: image.convert('RGB').resize(({size}, {size}))) or pass the image files"
        )
    if np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise UserError("float images must lie in [0, 1]; pass 8-bit images (uint8, 0..255) as uint8")
        return (x * 255.0 + 0.5).astype(np.uint8)
    if x.dtype != np.uint8:
        raise UserError(f"images must be uint8 (0..255) or floats in [0, 1], got {x.dtype}; convert them")
    return np.ascontiguousarray(x)
