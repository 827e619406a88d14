"""The embedded demo dataset: crops of scikit-image's texture photographs in MVTec layout, with five families of
synthetic surface defects and their pixel masks. Offline, deterministic from a seed, built in seconds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import skimage.data
from PIL import Image
from skimage.color import rgb2gray
from skimage.draw import bezier_curve, ellipse, line, polygon
from skimage.filters import gaussian
from skimage.morphology import dilation, disk

from ahl.core.errors import UserError
from ahl.core.io import atomic_dir

logger = logging.getLogger(__name__)

SUBSETS = ("brick", "grass", "gravel")  # classnames; each is also the name of its skimage.data photo
DEFECTS = ("scratch", "hole", "stain", "foreign", "crack")

# A mild colour cast per subset, so the grey photos become RGB images on which a colour stain is a colour change.
_TINT = {"brick": (1.08, 0.95, 0.85), "grass": (0.92, 1.05, 0.86), "gravel": (1.02, 1.00, 0.95)}
# Photos a "foreign" patch is cut from; a subset never receives a patch of its own texture.
_FOREIGN = ("coins", "moon", "brick", "grass", "gravel")
_CROP = (160, 256)  # side, in pixels of the 512-px photo, of the square crop one image is made of
# Multiplicative colour of a stain (a dye keeps the texture below it): reddish, bluish, ochre, dark brown.
_STAIN_COLOURS = ((1.30, 0.65, 0.55), (0.60, 0.80, 1.35), (1.25, 1.05, 0.45), (0.75, 0.55, 0.40))


@dataclass(frozen=True)
class EmbeddedConfig:
    """Size of the embedded dataset. The protocol needs >= 60 train normals, >= 20 test normals, >= 15 per defect."""

    image_size: int = 256  # side of the written PNGs
    n_train: int = 80  # train/good per subset
    n_test_good: int = 30  # test/good per subset
    n_per_defect: int = 20  # test/<defect> per defect class
    seed: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise UserError(f"params.yaml: embedded.{f.name} must be an integer, got {value!r}; set a whole number")
        for name in ("n_train", "n_test_good", "n_per_defect"):
            if getattr(self, name) < 1:
                raise UserError(
                    f"params.yaml: embedded.{name} must be positive, got {getattr(self, name)}; "
                    f"set it to 1 or more (the protocol wants >= 60 train, >= 20 test normals, >= 15 per defect)"
                )
        if self.image_size < 64:
            raise UserError(f"params.yaml: embedded.image_size must be >= 64, got {self.image_size}; set 64 or more")
        if self.seed < 0:
            raise UserError(f"params.yaml: embedded.seed must be >= 0, got {self.seed}; use a non-negative integer")


@dataclass(frozen=True)
class _Sources:
    """The photos one subset is made of: its texture (float grey, 0..1), its tint and the foreign photos."""

    texture: np.ndarray
    tint: np.ndarray  # (3,)
    foreign: tuple[np.ndarray, ...]


def _photo(name: str) -> np.ndarray:
    image = getattr(skimage.data, name)()
    if image.ndim == 3:
        image = rgb2gray(image[..., :3])
        return image.astype(np.float64)
    return image.astype(np.float64) / 255.0


def _resize(grey: np.ndarray, size: int) -> np.ndarray:
    """Resize a float grey image (0..1) to size x size with PIL's antialiased bilinear filter."""
    image = Image.fromarray(np.clip(grey * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float64) / 255.0


def _random_crop(rng: np.random.Generator, photo: np.ndarray, side: int) -> np.ndarray:
    side = min(side, *photo.shape)
    top = rng.integers(0, photo.shape[0] - side + 1)
    left = rng.integers(0, photo.shape[1] - side + 1)
    return photo[top : top + side, left : left + side]


def _normal(rng: np.random.Generator, src: _Sources, size: int) -> np.ndarray:
    """A defect-free image: a random crop, rotated/flipped, resized, jittered in brightness and contrast, tinted."""
    crop = _random_crop(rng, src.texture, int(rng.integers(_CROP[0], _CROP[1] + 1)))
    crop = np.rot90(crop, k=int(rng.integers(4)))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    grey = _resize(crop, size)
    grey = (grey - grey.mean()) * rng.uniform(0.9, 1.1) + grey.mean() + rng.uniform(-0.04, 0.04)
    return np.clip(grey[..., None] * src.tint, 0.0, 1.0)  # (H, W, 3)


# ---- defect families: each draws on a normal image (H, W, 3) and returns (image, mask (H, W) bool) ----


def _point(rng: np.random.Generator, size: int, margin: float = 0.2) -> np.ndarray:
    return rng.uniform(margin * size, (1 - margin) * size, 2)  # (row, col)


def _soft(mask: np.ndarray, sigma: float) -> np.ndarray:
    """Soft-edged opacity of a binary shape: about 0.5 on its border."""
    return gaussian(mask.astype(np.float64), sigma=sigma)


def _blob(rng: np.random.Generator, size: int, centre: np.ndarray, radius: float) -> np.ndarray:
    """An irregular star-shaped blob: a polygon whose radius is a random low-frequency function of the angle."""
    angle = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    r = np.ones_like(angle)
    for k in range(2, 7):  # harmonics with decreasing amplitude give a lumpy but closed outline
        r += rng.uniform(0, 0.35 / np.sqrt(k - 1)) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
    r = radius * np.maximum(r, 0.4)
    rows, cols = polygon(centre[0] + r * np.sin(angle), centre[1] + r * np.cos(angle), (size, size))
    mask = np.zeros((size, size), bool)
    mask[rows, cols] = True
    return mask


def _scratch(rng: np.random.Generator, image: np.ndarray, src: _Sources) -> tuple[np.ndarray, np.ndarray]:
    """One or two thin, long, smoothly curved lines, brighter or darker than the surface."""
    size = image.shape[0]
    mask = np.zeros((size, size), bool)
    centre, theta = _point(rng, size), rng.uniform(0, np.pi)
    length = rng.uniform(0.4, 0.8) * size
    for offset in range(int(rng.integers(1, 3))):
        direction, normal = np.array([np.sin(theta), np.cos(theta)]), np.array([np.cos(theta), -np.sin(theta)])
        c = centre + normal * offset * rng.uniform(0.03, 0.06) * size
        p0, p2 = c - direction * length / 2, c + direction * length / 2
        p1 = c + normal * rng.uniform(-0.3, 0.3) * length  # the control point bends the line
        (r0, c0), (r1, c1), (r2, c2) = np.round([p0, p1, p2]).astype(int)
        rows, cols = bezier_curve(r0, c0, r1, c1, r2, c2, 1.0, shape=(size, size))
        mask[rows, cols] = True
        length *= rng.uniform(0.5, 0.9)
    mask = dilation(mask, disk(max(1, round(size / 256 * rng.uniform(1.0, 2.2)))))
    # blend towards a light or a dark tone: a fixed shift would vanish on a busy texture such as grass
    alpha = _soft(mask, 0.4 + 0.4 * size / 256)[..., None] * rng.uniform(0.55, 0.8)
    tone = (rng.uniform(0.8, 0.95) if rng.random() < 0.5 else rng.uniform(0.05, 0.2)) * src.tint
    return np.clip(image * (1 - alpha) + tone * alpha, 0, 1), mask


def _hole(rng: np.random.Generator, image: np.ndarray, src: _Sources) -> tuple[np.ndarray, np.ndarray]:
    """A dark elliptical pit, deepest in the middle, with the far inner wall caught by the light."""
    size = image.shape[0]
    (cr, cc), rot = _point(rng, size), rng.uniform(0, np.pi)
    a, b = rng.uniform(0.05, 0.12, 2) * size
    rows, cols = ellipse(cr, cc, a, b, (size, size), rotation=rot)
    mask = np.zeros((size, size), bool)
    mask[rows, cols] = True
    # elliptical coordinates (u, v) of every pixel, matching skimage.draw.ellipse's rotation convention
    y, x = np.mgrid[:size, :size].astype(np.float64)
    y, x = y - cr, x - cc
    u = (x * np.sin(rot) + y * np.cos(rot)) / a
    v = (x * np.cos(rot) - y * np.sin(rot)) / b
    d2 = np.clip(u**2 + v**2, 0, 1)
    light = rng.uniform(0, 2 * np.pi)
    lit = np.clip(u * np.cos(light) + v * np.sin(light), 0, None) * d2  # a crescent on one inner wall
    depth = rng.uniform(0.55, 0.8)
    alpha = _soft(mask, 0.6 + 0.8 * size / 256)[..., None]
    shade = ((1 - depth * (0.55 + 0.45 * (1 - d2))) + 0.35 * lit)[..., None]
    floor = gaussian(image, sigma=1.5 * size / 256, channel_axis=-1)  # the pit's floor is out of focus
    return np.clip(image * (1 - alpha) + floor * shade * alpha, 0, 1), mask


def _stain(rng: np.random.Generator, image: np.ndarray, src: _Sources) -> tuple[np.ndarray, np.ndarray]:
    """A semi-transparent coloured blob of uneven density, like dye soaked into the surface."""
    size = image.shape[0]
    mask = _blob(rng, size, _point(rng, size), rng.uniform(0.08, 0.15) * size)
    density = gaussian(rng.random((size, size)), sigma=size / 24)
    density = (density - density.min()) / (np.ptp(density) + 1e-8)  # smooth 0..1 field
    alpha = _soft(mask, rng.uniform(1.5, 3.5) * size / 256) * rng.uniform(0.55, 0.8) * (0.6 + 0.4 * density)
    colour = np.asarray(_STAIN_COLOURS[int(rng.integers(len(_STAIN_COLOURS)))]) / src.tint
    dyed = image * colour
    return np.clip(image * (1 - alpha[..., None]) + dyed * alpha[..., None], 0, 1), mask


def _foreign(rng: np.random.Generator, image: np.ndarray, src: _Sources) -> tuple[np.ndarray, np.ndarray]:
    """A patch of another photo (coins, moon, another texture) inlaid with an irregular outline."""
    size = image.shape[0]
    mask = _blob(rng, size, _point(rng, size), rng.uniform(0.08, 0.15) * size)
    photo = src.foreign[int(rng.integers(len(src.foreign)))]
    patch = _resize(_random_crop(rng, photo, int(rng.integers(96, 257))), size)
    host = image.mean(axis=2) / src.tint.mean()
    # bring the patch near the host's grey level and contrast, so it stands out by its texture, not only its tone
    patch = (patch - patch.mean()) / (patch.std() + 1e-8) * host.std() * rng.uniform(0.8, 1.4)
    patch = patch + host.mean() + rng.uniform(-0.12, 0.12)
    alpha = _soft(mask, 0.5 + 0.5 * size / 256)[..., None]
    return np.clip(image * (1 - alpha) + (patch[..., None] * src.tint) * alpha, 0, 1), mask


def _crack(rng: np.random.Generator, image: np.ndarray, src: _Sources) -> tuple[np.ndarray, np.ndarray]:
    """A dark, jagged, branching fracture: a random walk of short segments that forks now and then."""
    size = image.shape[0]
    trunk, branches = np.zeros((size, size), bool), np.zeros((size, size), bool)
    walks = [(trunk, _point(rng, size, 0.25), rng.uniform(0, 2 * np.pi), int(rng.integers(10, 17)))]
    while walks:
        target, p, theta, steps = walks.pop()
        for _ in range(steps):
            theta += rng.normal(0, 0.45)
            q = p + rng.uniform(0.035, 0.065) * size * np.array([np.sin(theta), np.cos(theta)])
            if not (0 <= q.min() and q.max() <= size - 1):  # the crack runs off the image
                break
            rows, cols = line(*np.round(p).astype(int), *np.round(q).astype(int))
            target[rows, cols] = True
            if target is trunk and rng.random() < 0.25:  # fork: a shorter, thinner walk at an angle
                fork = theta + rng.choice([-1, 1]) * rng.uniform(0.4, 1.1)
                walks.append((branches, q, fork, int(rng.integers(2, 6))))
            p = q
    width = max(1, round(size / 256 * rng.uniform(1.0, 1.8)))
    mask = dilation(trunk, disk(width)) | dilation(branches, disk(max(0, width - 1)))
    alpha = _soft(mask, 0.4 + 0.3 * size / 256)
    return np.clip(image * (1 - alpha * rng.uniform(0.7, 0.85))[..., None], 0, 1), mask


# defect class -> the function that draws it (tests replace entries here)
DEFECT_DRAWERS: dict[str, Callable[[np.random.Generator, np.ndarray, _Sources], tuple[np.ndarray, np.ndarray]]] = {
    "scratch": _scratch,
    "hole": _hole,
    "stain": _stain,
    "foreign": _foreign,
    "crack": _crack,
}


# ---- writing ----


def _rng(seed: int, *key: int) -> np.random.Generator:
    """An independent stream per image, keyed by (seed, subset, part, [defect], index): changing one count or
    dropping one subset leaves every other image unchanged."""
    return np.random.default_rng(np.random.SeedSequence([seed, *key]))


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.dtype == bool:
        pixels = array.astype(np.uint8) * 255
    else:
        pixels = np.clip(array * 255.0 + 0.5, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, compress_level=1)


def _stem(index: int, count: int) -> str:
    return f"{index:0{max(3, len(str(count - 1)))}d}"


def _sources(subset: str, photos: dict[str, np.ndarray]) -> _Sources:
    return _Sources(
        texture=photos[subset],
        tint=np.asarray(_TINT[subset]),
        foreign=tuple(photos[name] for name in _FOREIGN if name != subset),
    )


def _load_photos(subsets: Sequence[str]) -> dict[str, np.ndarray]:
    return {name: _photo(name) for name in sorted(set(_FOREIGN) | set(subsets))}


def _build_subset(root: Path, subset: str, config: EmbeddedConfig, src: _Sources) -> None:
    size, key = config.image_size, SUBSETS.index(subset)
    for part_id, (part, count) in enumerate((("train/good", config.n_train), ("test/good", config.n_test_good))):
        for i in range(count):
            _save(root / part / f"{_stem(i, count)}.png", _normal(_rng(config.seed, key, part_id, i), src, size))
    for defect_id, defect in enumerate(DEFECTS):
        for i in range(config.n_per_defect):
            rng = _rng(config.seed, key, 2, defect_id, i)
            image, mask = DEFECT_DRAWERS[defect](rng, _normal(rng, src, size), src)
            if not mask.any():  # cannot happen with the margins above; a silent empty mask would mislabel data
                raise RuntimeError(f"embedded {subset}/{defect} #{i}: the drawn defect has an empty mask")
            stem = _stem(i, config.n_per_defect)
            _save(root / "test" / defect / f"{stem}.png", image)
            _save(root / "ground_truth" / defect / f"{stem}_mask.png", mask)


def build_embedded(out: Path, config: EmbeddedConfig, subsets: Sequence[str] = SUBSETS) -> None:
    """Write the embedded dataset in MVTec layout under ``out`` (out/<subset>/...), replacing it atomically."""
    subsets = list(subsets)
    unknown = [s for s in subsets if s not in SUBSETS]
    if unknown or not subsets or len(set(subsets)) != len(subsets):
        raise UserError(
            f"embedded dataset: subsets must be distinct names among {list(SUBSETS)}, got {subsets}; "
            f"choose from {', '.join(SUBSETS)}"
        )
    start = time.perf_counter()
    photos = _load_photos(subsets)
    with atomic_dir(Path(out)) as tmp:
        for subset in subsets:
            _build_subset(tmp / subset, subset, config, _sources(subset, photos))
            logger.info(
                "embedded %s: %d train, %d test good, %d x %d defects at %d px",
                subset, config.n_train, config.n_test_good, len(DEFECTS), config.n_per_defect, config.image_size,
            )
    logger.info("embedded dataset written to %s in %.1f s", out, time.perf_counter() - start)
