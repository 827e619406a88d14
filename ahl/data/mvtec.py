"""Read and validate a dataset in the MVTec AD layout; load its images.

ROOT/<subset>/train/good/*, ROOT/<subset>/test/good/*, ROOT/<subset>/test/<defect>/*,
ROOT/<subset>/ground_truth/<defect>/<stem>_mask.png (optional).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ahl.core.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")  # the one list: converters and readers use it
GOOD = "good"
# Rebuilding data/mvtec is the fix for a damaged converted file; a damaged raw file is fixed where it comes from.
CORRUPT_FIX = (
    "rebuild the converted data with `dvc repro -f convert`; if the error comes back, the raw file is damaged: "
    "replace it in your copy of the raw data (the folder or archive given as `data.local` in params.yaml, or the "
    "archive in the downloads folder `data.downloads`) and run `dvc repro`"
)


def to_8bit(image: Image.Image) -> Image.Image:
    """8 bits per channel. 16-bit, 32-bit integer and float greyscale are scaled by their bit depth into 0..255
    (PIL's own conversion clips them instead, which turns most 16-bit pixels white); other modes are unchanged."""
    if image.mode.startswith("I;16"):  # I;16, I;16B, I;16L: unsigned 16 bits
        grey = np.clip(np.asarray(image).astype(np.int64), 0, None) >> 8
    elif image.mode == "I":  # 32-bit integers: 16-bit data (e.g. converted by PIL) when it fits, else 31 bits
        values = np.clip(np.asarray(image).astype(np.int64), 0, None)
        grey = values >> (8 if values.max(initial=0) <= 0xFFFF else 23)
    elif image.mode == "F":  # floats carry no bit depth: the smallest usual range that holds them
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        top = values.max(initial=0.0)
        scale = next((r for r in (1.0, 255.0, 65535.0) if top <= r), top)
        grey = np.clip(values / scale * 255.0 + 0.5, 0, 255)
    else:
        return image
    return Image.fromarray(grey.astype(np.uint8))


def list_images(folder: Path) -> list[Path]:
    """Image files of a folder, sorted by name (never in os.listdir order, which differs between machines)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


@dataclass(frozen=True)
class Subset:
    """The files of one subset, as paths relative to ``root`` (the subset directory)."""

    root: Path
    train_good: tuple[str, ...]
    test_good: tuple[str, ...]
    anomalies: dict[str, tuple[str, ...]]  # defect class -> files (test/<class>/...)

    @property
    def anomaly_classes(self) -> list[str]:
        return sorted(self.anomalies)


def _images_in(folder: Path, what: str, fix: str) -> list[Path]:
    if not folder.is_dir():
        raise UserError(f"missing folder {folder} ({what}); {fix}")
    files = list_images(folder)
    if not files:
        raise UserError(f"empty folder {folder}: no {what} images ({', '.join(IMAGE_SUFFIXES)}); {fix}")
    return files


def read_subset(root: str | Path, classname: str) -> Subset:
    """List a subset's files, checking the layout; every problem names the folder and the fix."""
    base = Path(root) / classname
    fix = f"the dataset under {root} is not in MVTec layout; rerun the convert stage (dvc repro convert)"
    if not base.is_dir():
        present = sorted(p.name for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []
        raise UserError(f"missing folder {base} for classname {classname!r}; subsets present: {present}; {fix}")
    train_good = _images_in(base / "train" / GOOD, "normal training", fix)
    test_good = _images_in(base / "test" / GOOD, "normal test", fix)
    test_dir = base / "test"
    anomalies: dict[str, tuple[str, ...]] = {}
    for folder in sorted(p for p in test_dir.iterdir() if p.is_dir() and p.name != GOOD):
        files = _images_in(folder, f"anomaly class {folder.name!r}", fix)
        anomalies[folder.name] = tuple(str(p.relative_to(base)) for p in files)
    if not anomalies:
        raise UserError(f"no anomaly class folders in {test_dir} (expected test/<defect>/...); {fix}")
    rel = lambda files: tuple(str(p.relative_to(base)) for p in files)  # noqa: E731
    return Subset(base, rel(train_good), rel(test_good), anomalies)


def validate_dataset(root: str | Path) -> list[str]:
    """Check every subset under ``root``; return their names."""
    root = Path(root)
    subsets = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not subsets:
        raise UserError(f"no subsets under {root}; rerun the download and convert stages")
    for name in subsets:
        read_subset(root, name)
    return subsets


MAX_PIXELS = 40_000_000  # far above the papers' 448 x 448 inputs; a 10,000 x 10,000 PNG took 10 GB to score


def too_large(path: str | Path, width: int, height: int, max_pixels: int, key: str) -> str:
    """Why an image is refused: its pixels, the limit and the setting (``key``) that raises it."""
    return (
        f"{path} is {width} x {height} = {width * height:,} pixels, above the limit of {max_pixels:,} ({key}); "
        "shrink it or raise the limit"
    )


def load_image(path: str | Path, size: int, max_pixels: int | None = None) -> np.ndarray:
    """An image as RGB uint8 (size, size, 3); grey images (of any bit depth) are replicated to three channels.
    ``max_pixels``: a larger image is refused from its header, before it is decoded (memory)."""
    try:
        with Image.open(path) as im:
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise UserError(too_large(path, im.width, im.height, max_pixels, "--max-pixels"))
            im = to_8bit(im).convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot read image {path}: {exc}; {CORRUPT_FIX}") from None


def load_images(root: Path, files: list[str] | tuple[str, ...], size: int) -> np.ndarray:
    """Images of ``files`` (relative to ``root``) stacked as (N, size, size, 3) uint8."""
    out = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for i, f in enumerate(files):
        out[i] = load_image(Path(root) / f, size)
    return out
