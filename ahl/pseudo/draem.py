"""DRAEM-style pseudo anomalies (AHL): a Perlin-noise mask blends an augmented texture into a normal image.

The texture pool is DTD when ``features.dtd_dir`` is set, else photographs that ship with scikit-image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import skimage.data
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from ahl.core.errors import UserError
from ahl.pseudo.augment import _as_rgb, _check_image, _resize, _to_numpy, _to_tensor

# DRAEM: Perlin lattice resolution 2^a per axis, a in 0..5; noise above 0.5 is the anomaly; beta ~ U[0, 0.8].
PERLIN_MAX_LOG2 = 5
PERLIN_THRESHOLD = 0.5
BETA_MAX = 0.8

# Real photographs that ship with scikit-image (no download needed); the texture pool when DTD is not given.
SKIMAGE_SOURCES = (
    "brick", "grass", "gravel", "coffee", "chelsea", "astronaut", "rocket",
    "coins", "moon", "immunohistochemistry", "hubble_deep_field",
)  # fmt: skip
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


# ---------------------------------------------------------------------------------------------------------
# DRAEM: Perlin mask and augmented texture source


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6 - 15) + 10)  # Perlin's 6t^5 - 15t^4 + 10t^3: zero 1st and 2nd derivative at 0, 1


def perlin_noise(
    shape: tuple[int, int], res: tuple[int, int], angle: float, rng: np.random.Generator
) -> np.ndarray:
    """2D gradient (Perlin) noise of ``shape`` with ``res`` lattice cells per axis, rotated by ``angle`` degrees.

    Values lie in about [-1, 1] (DRAEM's sqrt(2) scaling). The rotation is applied to the sampling coordinates,
    which is the same as rotating the noise image but leaves no empty corners and needs no interpolation.
    """
    height, width = shape
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    ys = (np.arange(height, dtype=np.float32) - (height - 1) / 2)[:, None]  # (H, 1), centred pixel rows
    xs = (np.arange(width, dtype=np.float32) - (width - 1) / 2)[None, :]  # (1, W)
    # rotated pixel coordinates -> lattice coordinates (one lattice cell = height/res_y by width/res_x pixels)
    a = (cos * ys - sin * xs) * (res[0] / height)  # (H, W)
    b = (sin * ys + cos * xs) * (res[1] / width)  # (H, W)
    a -= np.floor(a.min())  # shift so that lattice indices start at 0
    b -= np.floor(b.min())
    i0 = a.astype(np.intp)  # floor, since a >= 0
    j0 = b.astype(np.intp)
    fa = a - i0  # (H, W) position inside the cell, in [0, 1)
    fb = b - j0
    n_i, n_j = int(i0.max()) + 2, int(j0.max()) + 2

    # unit gradient at every lattice node, (n_i * n_j,) each component, flat for cheap gathering
    theta = rng.uniform(0, 2 * np.pi, size=n_i * n_j).astype(np.float32)
    g_a, g_b = np.cos(theta), np.sin(theta)
    idx = i0 * n_j + j0  # (H, W) flat index of the cell's top-left node

    def corner(di: int, dj: int) -> np.ndarray:
        k = idx + (di * n_j + dj)
        return g_a[k] * (fa - di) + g_b[k] * (fb - dj)  # (H, W) dot(gradient, offset to the pixel)

    wa, wb = _fade(fa), _fade(fb)
    c00, c01 = corner(0, 0), corner(0, 1)  # each used twice below (a gather over the image: computed once)
    n0 = c00 + wa * (corner(1, 0) - c00)
    n1 = c01 + wa * (corner(1, 1) - c01)
    return math.sqrt(2) * (n0 + wb * (n1 - n0))


def perlin_mask(shape: tuple[int, int], rng: np.random.Generator, max_tries: int = 1000) -> np.ndarray:
    """DRAEM's anomaly mask: Perlin noise of random scales 2^a x 2^b (a, b in 0..5) and random rotation in
    [-90, 90] degrees, thresholded at 0.5; an empty mask is redrawn. Returns a (H, W) bool array."""
    height, width = shape
    for _ in range(max_tries):
        res = (2 ** int(rng.integers(0, PERLIN_MAX_LOG2 + 1)), 2 ** int(rng.integers(0, PERLIN_MAX_LOG2 + 1)))
        angle = float(rng.uniform(-90, 90))
        mask = perlin_noise((height, width), res, angle, rng) > PERLIN_THRESHOLD
        if mask.any():
            return mask
    raise RuntimeError(f"no non-empty Perlin mask of shape {shape} in {max_tries} draws; the image is too small")


def _brightness(img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    # imgaug's MultiplyAndAddToBrightness(mul=(0.8, 1.2), add=(-30, 30)), approximated in RGB
    img = TF.adjust_brightness(img, float(rng.uniform(0.8, 1.2)))
    return (img.to(torch.int16) + int(rng.integers(-30, 31))).clamp(0, 255).to(torch.uint8)


def _gamma(img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    # imgaug's GammaContrast((0.5, 2.0), per_channel=True): one gamma per channel
    gammas = rng.uniform(0.5, 2.0, size=3)
    return torch.cat([TF.adjust_gamma(img[c : c + 1], float(gammas[c])) for c in range(3)])


def _hue_saturation(img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    # imgaug's AddToHueAndSaturation((-50, 50)): hue +-50/255 of the half circle ~ +-0.1 turn
    img = TF.adjust_hue(img, float(rng.uniform(-0.1, 0.1)))
    return TF.adjust_saturation(img, float(rng.uniform(0.5, 1.5)))


# The ten DRAEM source augmentations; parameter ranges follow DRAEM's imgaug list. Solarize is always applied
# when chosen (imgaug's Solarize(0.5) fires half the time) so that every chosen op does something.
SOURCE_OPS: dict[str, Callable[[torch.Tensor, np.random.Generator], torch.Tensor]] = {
    "gamma": _gamma,
    "brightness": _brightness,
    "sharpness": lambda img, rng: TF.adjust_sharpness(img, float(rng.uniform(0.0, 2.0))),
    "hue_saturation": _hue_saturation,
    "solarize": lambda img, rng: TF.solarize(img, float(rng.integers(32, 129))),
    "posterize": lambda img, rng: TF.posterize(img, int(rng.integers(1, 8))),
    "invert": lambda img, rng: TF.invert(img),
    "autocontrast": lambda img, rng: TF.autocontrast(img),
    "equalize": lambda img, rng: TF.equalize(img),
    "rotate": lambda img, rng: TF.rotate(img, float(rng.uniform(-45, 45)), TF.InterpolationMode.BILINEAR),
}


def augment_source(source: np.ndarray, rng: np.random.Generator, n_ops: int = 3) -> np.ndarray:
    """Apply ``n_ops`` distinct DRAEM source augmentations, chosen and ordered at random, to (H, W, 3) uint8."""
    names = list(SOURCE_OPS)
    tensor = _to_tensor(_check_image(source, "source"))  # (3, H, W)
    for k in rng.choice(len(names), size=n_ops, replace=False):
        tensor = SOURCE_OPS[names[k]](tensor, rng)
    return _to_numpy(tensor)


def draem(image: np.ndarray, source: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """DRAEM-style pseudo anomaly: inside a Perlin mask m, blend an augmented texture into ``image``.

    out = image * (1 - m) + (1 - beta) * source_aug * m + beta * image * m, beta ~ U[0, 0.8].
    ``source`` may have any size and be grey or RGB; it is stretched to the image size.
    """
    image = _check_image(image)
    height, width = image.shape[:2]
    mask = perlin_mask((height, width), rng)  # (H, W) bool
    source_aug = augment_source(_resize(_as_rgb(source), height, width), rng)  # (H, W, 3)
    beta = rng.uniform(0, BETA_MAX)
    out = image.copy()
    # only the masked pixels are computed, so pixels outside the mask stay bit-identical
    blend = (1 - beta) * source_aug[mask].astype(np.float32) + beta * image[mask].astype(np.float32)  # (K, 3)
    out[mask] = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
    return out


# ---------------------------------------------------------------------------------------------------------
# texture pool and the convenience maker


class ImageFiles(Sequence[np.ndarray]):
    """A list of image files read on access as (H, W, 3) uint8, so that all of DTD (5,640 images, ~4 GB
    decoded) never has to sit in memory at once."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return ImageFiles(self.paths[index])
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                return np.asarray(img.convert("RGB"))
        except OSError as err:
            raise UserError(f"cannot read anomaly-source image {path}: {err}; replace or delete the file") from err

    def __repr__(self) -> str:
        return f"ImageFiles({len(self)} files)"


def anomaly_sources(dtd_dir: Path | None) -> Sequence[np.ndarray]:
    """The DRAEM texture pool: every jpg/png under ``dtd_dir`` (recursive, sorted), or, when ``dtd_dir`` is
    None, photographs that ship with scikit-image. Images are (H, W, 3) uint8 of their own size."""
    if dtd_dir is None:
        return [_as_rgb(getattr(skimage.data, name)()) for name in SKIMAGE_SOURCES]
    dtd_dir = Path(dtd_dir)
    what = "a folder of texture images (.jpg/.jpeg/.png, searched recursively), e.g. DTD's images/ folder"
    if not dtd_dir.is_dir():
        raise UserError(f"anomaly-source folder {dtd_dir} does not exist; it must be {what}, or unset it to "
                        "use the scikit-image photographs")  # fmt: skip
    paths = sorted(
        (p for p in dtd_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
        key=lambda p: p.relative_to(dtd_dir).as_posix(),
    )
    if not paths:
        raise UserError(f"anomaly-source folder {dtd_dir} holds no images; it must be {what}")
    return ImageFiles(paths)
