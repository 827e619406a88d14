"""Pseudo anomalies made by moving patches: CutPaste (DRA, AHL) and CutMix (AHL); image helpers shared with
ahl/pseudo/draem.py (DRAEM-style Perlin blends).

Every generator takes an explicit ``numpy.random.Generator``, draws its parameters from it and then calls
deterministic ops, so the same image and generator state always give the same pseudo anomaly.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

# Patch geometry shared by CutPaste and CutMix (DRA's CutPasteNormal): area 2-15 % of the image,
# aspect ratio w/h log-uniform in [0.3, 1/0.3].
PATCH_AREA = (0.02, 0.15)
PATCH_ASPECT = 0.3
COLOR_JITTER = 0.1  # brightness, contrast, saturation and hue, as torchvision's ColorJitter(0.1, 0.1, 0.1, 0.1)



# ---------------------------------------------------------------------------------------------------------
# helpers


def _check_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name} must be an RGB uint8 array of shape (H, W, 3), got {image.dtype} {image.shape}")
    return image


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    # (H, W, 3) uint8 -> (3, H, W) uint8; a copy, so torch never aliases the caller's array
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    # (3, H, W) uint8 -> (H, W, 3) uint8
    return np.ascontiguousarray(tensor.permute(1, 2, 0).numpy())


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """Grey (H, W), (H, W, 1), RGB or RGBA of any integer/bool/float type -> (H, W, 3) uint8."""
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    elif image.dtype != np.uint8:
        # skimage-style float images live in [0, 1]; anything else is assumed to be in [0, 255]
        scale = 255.0 if image.dtype.kind == "f" and image.max(initial=0) <= 1.0 else 1.0
        image = np.clip(np.rint(image.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return np.ascontiguousarray(image[:, :, :3])
    raise ValueError(f"cannot use an array of shape {image.shape} as an image")


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Stretch an (h, w, 3) uint8 image to (height, width, 3); PIL's bilinear antialiases when shrinking."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def _patch_size(height: int, width: int, rng: np.random.Generator) -> tuple[int, int]:
    """(cut_h, cut_w) of a patch covering 2-15 % of the image with a log-uniform aspect ratio."""
    area = rng.uniform(*PATCH_AREA) * height * width
    aspect = math.exp(rng.uniform(math.log(PATCH_ASPECT), math.log(1 / PATCH_ASPECT)))  # w / h
    cut_h = min(max(round(math.sqrt(area / aspect)), 1), height)
    cut_w = min(max(round(math.sqrt(area * aspect)), 1), width)
    return cut_h, cut_w


def _corner(height: int, width: int, cut_h: int, cut_w: int, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner of a (cut_h, cut_w) box placed uniformly inside a (height, width) image."""
    return int(rng.integers(0, height - cut_h + 1)), int(rng.integers(0, width - cut_w + 1))


def _color_jitter(patch: np.ndarray, rng: np.random.Generator, strength: float = COLOR_JITTER) -> np.ndarray:
    """torchvision's ColorJitter(strength x 4) with its factors and its random op order drawn from ``rng``."""
    tensor = _to_tensor(patch)
    factors = {
        "brightness": rng.uniform(1 - strength, 1 + strength),
        "contrast": rng.uniform(1 - strength, 1 + strength),
        "saturation": rng.uniform(1 - strength, 1 + strength),
        "hue": rng.uniform(-strength, strength),
    }
    ops = {
        "brightness": TF.adjust_brightness,
        "contrast": TF.adjust_contrast,
        "saturation": TF.adjust_saturation,
        "hue": TF.adjust_hue,
    }
    names = list(ops)
    for k in rng.permutation(len(names)):
        tensor = ops[names[k]](tensor, float(factors[names[k]]))
    return _to_numpy(tensor)


# ---------------------------------------------------------------------------------------------------------
# CutPaste and CutMix


def cutpaste(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A colour-jittered patch of ``image`` (2-15 % of its area) pasted at another random place in it.

    DRA's pseudo anomaly and AHL's CutPaste family; the trainer adds the random rotation of the whole image.
    """
    image = _check_image(image)
    height, width = image.shape[:2]
    cut_h, cut_w = _patch_size(height, width, rng)
    y0, x0 = _corner(height, width, cut_h, cut_w, rng)
    patch = _color_jitter(image[y0 : y0 + cut_h, x0 : x0 + cut_w], rng)  # (cut_h, cut_w, 3)
    y1, x1 = _corner(height, width, cut_h, cut_w, rng)
    out = image.copy()
    out[y1 : y1 + cut_h, x1 : x1 + cut_w] = patch
    return out


def cutmix(image: np.ndarray, other: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A colour-jittered patch of another normal image ``other`` (2-15 % of the area) pasted at a random place in
    ``image`` (the official AHL CutMix).

    The patch is cut from an independent random place of ``other`` (not the same box, as in classic CutMix),
    so that aligned objects still produce a visible misplacement. ``other`` of another size is resized first.
    """
    image = _check_image(image)
    height, width = image.shape[:2]
    other = _resize(_check_image(other, "other"), height, width)
    cut_h, cut_w = _patch_size(height, width, rng)
    y0, x0 = _corner(height, width, cut_h, cut_w, rng)
    y1, x1 = _corner(height, width, cut_h, cut_w, rng)
    out = image.copy()
    out[y1 : y1 + cut_h, x1 : x1 + cut_w] = _color_jitter(other[y0 : y0 + cut_h, x0 : x0 + cut_w], rng)
    return out


def rotate(images: np.ndarray, max_degrees: float, interpolation: str, rng: np.random.Generator) -> np.ndarray:
    """Each image rotated by an angle drawn from [-max_degrees, max_degrees], corners filled black (as
    torchvision's RandomRotation)."""
    if max_degrees <= 0:
        return images
    mode = TF.InterpolationMode(interpolation)
    out = np.empty_like(images)
    for i, img in enumerate(images):
        angle = float(rng.uniform(-max_degrees, max_degrees))
        t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
        out[i] = TF.rotate(t, angle, interpolation=mode).permute(1, 2, 0).numpy()
    return out
