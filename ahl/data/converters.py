"""Converters: each dataset's real raw layout -> the MVTec layout every stage reads (``out/<subset>/...``).

The protocol is the official DRA/AHL convert scripts' (one script per dataset), with one fix: every listing is
sorted before the 3:1 split of the normals, so the split no longer depends on the filesystem's listing order.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from ahl.core.errors import RawDataError, UserError
from ahl.core.io import atomic_dir, link_or_copy
from ahl.data.mvtec import IMAGE_SUFFIXES, to_8bit

log = logging.getLogger(__name__)

T = TypeVar("T")

TEST_SIZE = 0.25  # normals split 3:1 train/test, as in the official convert scripts
_JUNK_DIRS = frozenset({"__MACOSX"})  # folders that zip tools on macOS add next to the real ones
# What to do about bad raw data. The raw folder a converter reads is a pipeline output that the download stage
# rebuilds, so the fix is always made where the data comes from, never in that folder.
RAW_FIX = (
    "Fix the raw data where it comes from, not in the pipeline's folders (the download stage rebuilds them): give "
    "a folder or archive holding it as `data.local` in params.yaml, or place its archive in the downloads folder "
    "(`data.downloads`, data/downloads by default), then run `dvc repro`."
)

# AITEX: the defect code is the second field of a file name such as 0001_002_00.png (official DRA table).
AITEX_DEFECT_CLASSES = {
    "002": "Broken_end", "006": "Broken_yarn", "010": "Broken_pick", "016": "Weft_curling",
    "019": "Fuzzyball", "022": "Cut_selvage", "023": "Crease", "025": "Warp_ball",
    "027": "Knots", "029": "Contamination", "030": "Nep", "036": "Weft_crack",
}


# --------------------------------------------------------------------------------------------- raw-layout search
def _layout_error(dataset: str, raw: Path, missing: str) -> RawDataError:
    # The dataset entry (registry.Dataset.convert) adds the layout it expects and where the data comes from.
    return RawDataError(f"{dataset}: {missing} (looked under {raw}).", RAW_FIX)


def _subdirs(folder: Path) -> list[Path]:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return []
    keep = [e for e in entries if e.is_dir() and not e.name.startswith(".") and e.name not in _JUNK_DIRS]
    return [Path(e.path) for e in keep]


def _find_root(raw: Path, dataset: str, required: Sequence[str]) -> Path:
    """The shallowest folder under ``raw`` (``raw`` included) that holds every path in ``required``.

    Archives nest differently (``brain_tumor_dataset/no`` vs ``no``), so the depth is searched, not assumed.
    """
    raw = Path(raw)
    if not raw.is_dir():
        raise _layout_error(dataset, raw, f"the raw folder {raw} does not exist")
    level = [raw]
    while level:
        matches = [d for d in level if all((d / r).exists() for r in required)]
        if matches:
            if len(matches) > 1:
                log.warning("%s: several copies of the raw layout %s; using %s", dataset, matches, matches[0])
            return matches[0]
        level = [sub for d in level for sub in _subdirs(d)]
    wanted = ", ".join(required)
    raise _layout_error(dataset, raw, f"no folder holding {wanted} was found")


def _files(folder: Path, *, recursive: bool = False, suffixes: Iterable[str] = IMAGE_SUFFIXES) -> list[Path]:
    """Image files in ``folder``, sorted; hidden files and macOS zip leftovers are skipped."""
    suffixes = frozenset(suffixes)
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p
        for p in found
        if p.is_file()
        and p.suffix.lower() in suffixes
        and not p.name.startswith(".")
        and not _JUNK_DIRS.intersection(p.relative_to(folder).parts)
    )


def _dedupe(paths: list[Path], key: Callable[[Path], object], dataset: str) -> list[Path]:
    """Keep the first (sorted) of files that are the same sample twice (an archive unpacked into itself)."""
    seen: dict[object, Path] = {}
    for p in paths:
        if key(p) in seen:
            log.warning("%s: %s duplicates %s; keeping the first", dataset, p, seen[key(p)])
        else:
            seen[key(p)] = p
    return list(seen.values())


# ---------------------------------------------------------------------------------------------- reading, writing
def _unreadable(path: Path, err: BaseException) -> UserError:
    return UserError(f"cannot read image {path}: {err}. The raw file is damaged or incomplete. {RAW_FIX}")


def _read_image(
    path: Path, header_only: bool = False, unreadable: Callable[[Path, BaseException], UserError] = _unreadable
) -> Image.Image:
    """An image PIL has decoded (only its header, with ``header_only``: size and mode); a file it cannot read is
    ``unreadable(path, err)`` (the raw-data advice by default; your own data says its own)."""
    try:
        img = Image.open(path)
        if not header_only:
            img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise unreadable(path, err) from err
    return img


def _read_mask(path: Path, unreadable: Callable[[Path, BaseException], UserError] = _unreadable) -> np.ndarray:
    """A label image as a boolean (H, W) array: a pixel is defective where any channel is non-zero."""
    arr = np.asarray(_read_image(path, unreadable=unreadable))
    return arr.any(axis=2) if arr.ndim == 3 else arr != 0


def _save_png(img: Image.Image, dst: Path) -> None:
    img = to_8bit(img)  # 16-bit, 32-bit and float greyscale scaled, not clipped
    if img.mode not in {"1", "L", "LA", "P", "RGB", "RGBA"}:
        img = img.convert("RGB")  # e.g. CMYK JPEGs: PNG cannot store them
    img.save(dst, format="PNG")


def _put_png(src: Path, dst: Path, *, image: bool = True) -> None:
    """A raw PNG into place: hard-linked after a cheap integrity check, or, for an ``image`` deeper than 8 bits,
    re-encoded as 8 bits. Masks are linked as they are (scaling would turn a 16-bit mask of 0/1 into zeros)."""
    try:
        with Image.open(src) as img:
            deep = img.mode.startswith(("I", "F"))  # I;16*, I (32-bit) and F (float)
            img.verify()  # walks the chunks and checks their CRCs without decoding: cheap
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise _unreadable(src, err) from err
    if deep and image:
        _save_png(_read_image(src), dst)
    else:
        link_or_copy(src, dst)


def _save_mask(mask: np.ndarray, dst: Path) -> None:
    # MVTec convention: 8-bit grey, 0 = normal, 255 = defect (raw labels may use 1, 255 or colours).
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(dst, format="PNG")


def _free_name(folder: Path, stem: str) -> Path:
    """``folder/stem.png``, or ``stem_1.png``, ... when two raw files share a stem (``a.jpg`` and ``a.jpeg``)."""
    folder.mkdir(parents=True, exist_ok=True)
    dst, k = folder / f"{stem}.png", 1
    while dst.exists():
        dst, k = folder / f"{stem}_{k}.png", k + 1
    if k > 1:
        log.warning("two raw files are named %s in %s; writing %s", stem, folder, dst.name)
    return dst


def _place(src: Path, folder: Path, stem: str | None = None) -> Path:
    """Put one raw image into ``folder`` as PNG: a hard link when it already is an 8-bit one, else re-encoded."""
    dst = _free_name(folder, stem or src.stem)
    if src.suffix.lower() == ".png":
        _put_png(src, dst)
    else:
        _save_png(_read_image(src), dst)
    return dst


def _progress(items: Sequence[T], desc: str) -> Iterator[T]:
    """A tqdm bar on a terminal; silent (plain iteration) in tests, pipelines and logs."""
    if not sys.stderr.isatty():
        return iter(items)
    from tqdm import tqdm

    return iter(tqdm(items, desc=desc, leave=False))


def _split_normals(normals: list[T], seed: int, dataset: str) -> tuple[list[T], list[T]]:
    """3:1 train/test split of the (sorted) normals, exactly as the official scripts call it."""
    from sklearn.model_selection import train_test_split

    if len(normals) < 2:
        raise RawDataError(
            f"{dataset}: found {len(normals)} normal images; at least 2 are needed for the 3:1 split.", RAW_FIX
        )
    train, test = train_test_split(normals, test_size=TEST_SIZE, random_state=seed)
    return list(train), list(test)


def _log_counts(subset_dir: Path) -> dict[str, int]:
    """Log (and return) the images per folder of a converted subset; other files (a licence text) are not counted."""
    counts = {
        f"{split}/{cls.name}": sum(1 for p in cls.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        for split in ("train", "test")
        for cls in _subdirs(subset_dir / split)
    }
    anomalies = {k: v for k, v in counts.items() if k.startswith("test/") and k != "test/good"}
    log.info(
        "%s: train/good %d, test/good %d, anomalies %d in %d classes (%s)",
        subset_dir.name, counts.get("train/good", 0), counts.get("test/good", 0), sum(anomalies.values()),
        len(anomalies), ", ".join(f"{k[5:]} {v}" for k, v in anomalies.items()),
    )
    return counts


def _write_split(subset: Path, train: Iterable[Path], test: Iterable[Path]) -> None:
    for src in _progress(list(train), f"{subset.name} train/good"):
        _place(src, subset / "train" / "good")
    for src in _progress(list(test), f"{subset.name} test/good"):
        _place(src, subset / "test" / "good")


# ----------------------------------------------------------------------------------------- tiles (AITEX, SDD)
@dataclass(frozen=True)
class _Piece:
    """A rectangle of a raw image that becomes one sample: ``box`` = (left, top, right, bottom) in pixels."""

    src: Path
    box: tuple[int, int, int, int]
    name: str


def _write_pieces(pieces: Iterable[tuple[_Piece, Path]], desc: str) -> None:
    """Crop and save ``(piece, folder)`` pairs, decoding each raw image once."""
    by_src: dict[Path, list[tuple[_Piece, Path]]] = defaultdict(list)
    for piece, folder in pieces:
        by_src[piece.src].append((piece, folder))
    for src in _progress(sorted(by_src), desc):
        img = _read_image(src)
        for piece, folder in by_src[src]:
            _save_png(img.crop(piece.box), _free_name(folder, piece.name))


def _write_defect(img: Image.Image, mask: np.ndarray, piece: _Piece, subset: Path, cls: str) -> None:
    dst = _free_name(subset / "test" / cls, piece.name)
    _save_png(img.crop(piece.box), dst)
    left, top, right, bottom = piece.box
    gt = subset / "ground_truth" / cls
    gt.mkdir(parents=True, exist_ok=True)
    _save_mask(mask[top:bottom, left:right], gt / f"{dst.stem}_mask.png")


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as img:
            return img.size  # (W, H), read from the header only
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise _unreadable(path, err) from err


def _aitex_tiles(width: int, height: int) -> list[tuple[int, int, int, int]]:
    # Square tiles of the strip's height along its width: 4096x256 -> sixteen 256x256 tiles. The official script
    # hard-codes 256 px; taking it from the image is the same on the real data and lets tests use small strips.
    count = math.ceil(width / height)
    return [(i * height, 0, min((i + 1) * height, width), height) for i in range(count)]


# -------------------------------------------------------------------------------------------------- converters
def convert_mvtec(raw: Path, out: Path, *, seed: int = 42) -> None:
    """MVTec AD is already in the layout: hard-link every category folder (one holding ``train/good``) into ``out``.

    ``seed`` is unused: MVTec AD comes with its own train/test split.
    """
    raw = Path(raw)
    if not raw.is_dir():
        raise _layout_error("mvtec", raw, f"the raw folder {raw} does not exist")
    categories: list[Path] = []
    for folder, dirs, _ in os.walk(raw):
        here = Path(folder)
        if (here / "train" / "good").is_dir():
            categories.append(here)
            dirs.clear()  # a category does not hold further categories
        else:
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _JUNK_DIRS)
    categories.sort()
    if not categories:
        raise _layout_error("mvtec", raw, "no category folder (one holding train/good/) was found")
    names = [c.name for c in categories]
    if len(set(names)) != len(names):
        dups = sorted({n for n in names if names.count(n) > 1})
        raise RawDataError(
            f"mvtec: categories {dups} appear twice under {raw}: {categories}; keep one copy of each.", RAW_FIX
        )
    with atomic_dir(out) as tmp:
        for category in categories:
            if not (category / "test").is_dir():
                raise _layout_error("mvtec", raw, f"{category / 'test'} is missing")
            files = sorted(p for p in category.rglob("*") if p.is_file() and not p.name.startswith("."))
            for src in _progress(files, category.name):
                dst = tmp / category.name / src.relative_to(category)
                dst.parent.mkdir(parents=True, exist_ok=True)
                if src.suffix.lower() == ".png":
                    _put_png(src, dst, image=src.relative_to(category).parts[0] != "ground_truth")
                else:
                    link_or_copy(src, dst)
            _log_counts(tmp / category.name)


def _aitex_mask_paths(src: Path, masks: dict[str, Path], root: Path) -> list[Path]:
    """The official script reads <stem>_mask.png. A few strips are said to have several masks
    (<stem>_mask1.png, ...): their union is used then, so no defect pixel is lost."""
    paths = [p for n, p in sorted(masks.items()) if n == f"{src.stem}_mask.png"]
    paths = paths or [p for n, p in sorted(masks.items()) if n.startswith(f"{src.stem}_mask")]
    if not paths:
        raise _layout_error("aitex", root, f"the mask {src.stem}_mask.png of {src} is missing")
    return paths


def convert_aitex(raw: Path, out: Path, *, seed: int = 42) -> None:
    """AITEX: 4096x256 fabric strips cut into sixteen 256x256 tiles.

    Normal tiles: every tile of NODefect_images, split 3:1. Anomalies: the tiles of Defect_images whose mask tile
    is non-zero, classed by the defect code in the file name. The defect-free tiles of defective strips are
    discarded, as in the official DRA script (they sit next to a defect and are not used as normals).
    """
    root = _find_root(raw, "aitex", ("NODefect_images", "Defect_images", "Mask_images"))
    normal_files = _dedupe(_files(root / "NODefect_images", recursive=True), lambda p: (p.parent.name, p.name), "aitex")
    defect_files = _dedupe(_files(root / "Defect_images", recursive=True), lambda p: p.name, "aitex")
    masks: dict[str, Path] = {}
    for p in _files(root / "Mask_images", recursive=True):
        masks.setdefault(p.name, p)
    if not normal_files:
        raise _layout_error("aitex", root, "NODefect_images/ holds no images")
    if not defect_files:
        raise _layout_error("aitex", root, "Defect_images/ holds no images")

    with atomic_dir(out) as tmp:
        subset = tmp / "AITEX"
        for src in _progress(defect_files, "AITEX defects"):
            fields = src.stem.split("_")
            code = fields[1] if len(fields) > 1 else ""
            if code not in AITEX_DEFECT_CLASSES:
                raise RawDataError(
                    f"aitex: {src} has no known defect code (the second field of NNNN_CCC_NN.png; known: "
                    f"{', '.join(AITEX_DEFECT_CLASSES)}); leave that file out.",
                    RAW_FIX,
                )
            mask_paths = _aitex_mask_paths(src, masks, root)
            img = _read_image(src)
            mask = np.logical_or.reduce([_read_mask(p) for p in mask_paths])
            if mask.shape != (img.height, img.width):
                raise RawDataError(
                    f"aitex: mask {mask_paths[0]} is {mask.shape[1]}x{mask.shape[0]} but image {src} is "
                    f"{img.width}x{img.height}; they must match.",
                    RAW_FIX,
                )
            for i, box in enumerate(_aitex_tiles(img.width, img.height)):
                left, top, right, bottom = box
                if mask[top:bottom, left:right].any():
                    piece = _Piece(src, box, f"{src.stem}_{i}")
                    _write_defect(img, mask, piece, subset, AITEX_DEFECT_CLASSES[code])

        # Normal tiles in order: sorted fabric folders, sorted files, tiles left to right.
        normals = [
            _Piece(src, box, f"{src.parent.name}_{src.stem}_{i}")
            for src in normal_files
            for i, box in enumerate(_aitex_tiles(*_image_size(src)))
        ]
        train, test = _split_normals(normals, seed, "aitex")
        _write_pieces(
            [(p, subset / "train" / "good") for p in train] + [(p, subset / "test" / "good") for p in test],
            "AITEX normals",
        )
        _log_counts(subset)


def convert_sdd(raw: Path, out: Path, *, seed: int = 42) -> None:
    """KolektorSDD: each image cut into 3 pieces along its height; a piece with label pixels is a ``defect``.

    The defect-free pieces of every image (also of defective ones) are the normals, split 3:1, as in the official
    DRA script. Its one anomaly class is named ``defect``.
    """
    raw = Path(raw)
    if not raw.is_dir():
        raise _layout_error("sdd", raw, f"the raw folder {raw} does not exist")
    images = _dedupe(_files(raw, recursive=True, suffixes={".jpg"}), lambda p: (p.parent.name, p.name), "sdd")
    if not images:
        raise _layout_error("sdd", raw, "no kosNN/PartK.jpg image was found")

    with atomic_dir(out) as tmp:
        subset = tmp / "SDD"
        normals: list[_Piece] = []
        for src in _progress(images, "SDD"):
            label = src.with_name(f"{src.stem}_label.bmp")
            if not label.is_file():
                raise _layout_error("sdd", raw, f"the label {label} of {src} is missing")
            img = _read_image(src)
            mask = _read_mask(label)
            if mask.shape != (img.height, img.width):
                raise RawDataError(
                    f"sdd: label {label} is {mask.shape[1]}x{mask.shape[0]} but image {src} is "
                    f"{img.width}x{img.height}; they must match.",
                    RAW_FIX,
                )
            h = img.height
            cuts = [0, h // 3, h * 2 // 3, h]
            for i in range(3):
                piece = _Piece(src, (0, cuts[i], img.width, cuts[i + 1]), f"{src.parent.name}_{src.stem}_{i}")
                if mask[cuts[i] : cuts[i + 1]].any():
                    _write_defect(img, mask, piece, subset, "defect")
                else:
                    normals.append(piece)
        train, test = _split_normals(normals, seed, "sdd")
        _write_pieces(
            [(p, subset / "train" / "good") for p in train] + [(p, subset / "test" / "good") for p in test],
            "SDD normals",
        )
        _log_counts(subset)


def convert_elpv(raw: Path, out: Path, *, seed: int = 42) -> None:
    """ELPV: probability 0 -> normal (split 3:1), 1 -> anomaly of class ``mono``/``poly`` (the cell type).

    Cells rated 1/3 or 2/3 defective are left out, as in the official DRA script.
    """
    root = _find_root(raw, "elpv", ("labels.csv", "images"))
    labels = root / "labels.csv"
    normals: list[Path] = []
    anomalies: dict[str, list[Path]] = defaultdict(list)
    for lineno, line in enumerate(labels.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        try:
            rel, prob, cell_type = fields[0], float(fields[1]), fields[2]
            if len(fields) != 3:
                raise ValueError
        except (ValueError, IndexError):
            raise RawDataError(
                f"elpv: {labels}:{lineno} is {line!r}; expected 'images/cellNNNN.png <probability> <mono|poly>'.",
                RAW_FIX,
            ) from None
        src = root / rel
        if not src.is_file():
            raise _layout_error("elpv", raw, f"{src} (listed in {labels}:{lineno}) is missing")
        if prob == 0.0:
            normals.append(src)
        elif prob == 1.0:
            anomalies[cell_type].append(src)
    normals.sort()
    train, test = _split_normals(normals, seed, "elpv")
    with atomic_dir(out) as tmp:
        subset = tmp / "elpv"
        _write_split(subset, train, test)
        for cls in sorted(anomalies):
            for src in _progress(sorted(anomalies[cls]), f"elpv {cls}"):
                _place(src, subset / "test" / cls)
        _log_counts(subset)


def _dagm_labels(raw: Path) -> dict[tuple[int, str], Path]:
    """(class number, "Train"/"Test") -> its Labels.txt, found at any depth (``Class1/Class1/Train/Label/``)."""
    found: dict[tuple[int, str], Path] = {}
    for labels in sorted(raw.rglob("Labels.txt")):
        if labels.parent.name != "Label" or labels.parent.parent.name not in ("Train", "Test"):
            continue
        classes = [m for part in labels.parts if (m := re.fullmatch(r"Class(\d+)", part))]
        if not classes or _JUNK_DIRS.intersection(labels.parts):
            continue
        key = (int(classes[-1].group(1)), labels.parent.parent.name)
        if key in found:
            log.warning("optical: %s duplicates %s; keeping the first", labels, found[key])
        else:
            found[key] = labels
    return found


def convert_optical(raw: Path, out: Path, *, seed: int = 42) -> None:
    """Optical (DAGM 2007): the defect-free images of all ten classes are the normals (split 3:1); the defective
    images of DAGM class k become the anomaly class ``Class{k-1}`` (Class0 .. Class9), with their label masks.

    data.md and the official script name ten anomaly classes Class0..Class9, while the DRA paper's table counts
    one class; we follow the official script (ten classes). The general setting pools them anyway.
    """
    raw = Path(raw)
    if not raw.is_dir():
        raise _layout_error("optical", raw, f"the raw folder {raw} does not exist")
    label_files = _dagm_labels(raw)
    wanted = [(k, split) for k in range(1, 11) for split in ("Train", "Test")]
    missing = [f"Class{k}/{split}" for k, split in wanted if (k, split) not in label_files]
    if missing:
        raise _layout_error("optical", raw, f"no Label/Labels.txt for {', '.join(missing)}")

    # Order: class 1..10, Train before Test, rows in file order: the official script's order, so that the
    # split is the official one whenever its listing was this one.
    normals: list[tuple[Path, str]] = []
    anomalies: list[tuple[Path, Path, str, str]] = []  # (image, label image, out name, class)
    for k in range(1, 11):
        for split in ("Train", "Test"):
            labels = label_files[(k, split)]
            split_dir = labels.parent.parent
            for lineno, line in enumerate(labels.read_text().splitlines(), 1):
                fields = line.split()
                if len(fields) < 3:  # the header line (a single "1") and blank lines
                    continue
                flag, fname = fields[1], fields[2]
                src = split_dir / fname
                if not src.is_file():
                    raise _layout_error("optical", raw, f"{src} (listed in {labels}:{lineno}) is missing")
                name = f"Class{k}_{split}_{Path(fname).stem}"
                if flag == "0":
                    normals.append((src, name))
                    continue
                if len(fields) < 5 or not (split_dir / "Label" / fields[4]).is_file():
                    raise _layout_error(
                        "optical", raw, f"the label image of defective {src} ({labels}:{lineno}) is missing"
                    )
                anomalies.append((src, split_dir / "Label" / fields[4], name, f"Class{k - 1}"))

    train, test = _split_normals(normals, seed, "optical")
    with atomic_dir(out) as tmp:
        subset = tmp / "optical"
        for folder, items in ((subset / "train" / "good", train), (subset / "test" / "good", test)):
            for src, name in _progress(items, f"optical {folder.name}"):
                _place(src, folder, name)
        for src, label, name, cls in _progress(anomalies, "optical anomalies"):
            dst = _place(src, subset / "test" / cls, name)
            gt = subset / "ground_truth" / cls
            gt.mkdir(parents=True, exist_ok=True)
            _save_mask(_read_mask(label), gt / f"{dst.stem}_mask.png")
        _log_counts(subset)


def convert_mastcam(raw: Path, out: Path, *, seed: int = 42) -> None:
    """Mastcam comes split: train_typical -> train/good, test_typical -> test/good, test_novel/<class> -> test/<class>.

    ``seed`` is unused. Every folder of test_novel is a class, as in the official script.
    """
    root = _find_root(raw, "mastcam", ("train_typical", "test_typical", "test_novel"))
    train, test = _files(root / "train_typical"), _files(root / "test_typical")
    if not train or not test:
        raise _layout_error("mastcam", root, "train_typical/ or test_typical/ holds no images")
    classes = {d.name: _files(d) for d in _subdirs(root / "test_novel")}
    classes = {c: files for c, files in classes.items() if files}
    if not classes:
        raise _layout_error("mastcam", root, "test_novel/ holds no class folder with images")
    with atomic_dir(out) as tmp:
        subset = tmp / "mastcam"
        _write_split(subset, train, test)
        for cls, files in classes.items():
            for src in _progress(files, f"mastcam {cls}"):
                _place(src, subset / "test" / cls)
        _log_counts(subset)


def convert_brainmri(raw: Path, out: Path, *, seed: int = 42) -> None:
    """BrainMRI: ``no/`` normals (split 3:1), ``yes/`` the anomaly class ``tumor``."""
    root = _find_root(raw, "brainmri", ("no", "yes"))
    normals, tumours = _files(root / "no"), _files(root / "yes")
    if not tumours:
        raise _layout_error("brainmri", root, "yes/ holds no images")
    train, test = _split_normals(normals, seed, "brainmri")
    with atomic_dir(out) as tmp:
        subset = tmp / "brainmri"
        _write_split(subset, train, test)
        for src in _progress(tumours, "brainmri tumor"):
            _place(src, subset / "test" / "tumor")
        _log_counts(subset)


def convert_headct(raw: Path, out: Path, *, seed: int = 42) -> None:
    """HeadCT: ``labels.csv`` (id, hemorrhage): 0 -> normal (split 3:1), 1 -> the anomaly class ``hemorrhage``."""
    root = _find_root(raw, "headct", ("labels.csv", "head_ct"))
    images = root / "head_ct" / "head_ct" if (root / "head_ct" / "head_ct").is_dir() else root / "head_ct"
    labels = root / "labels.csv"
    with labels.open(newline="") as f:
        rows = [[c.strip() for c in row] for row in csv.reader(f) if row]
    if not rows:
        raise _layout_error("headct", raw, f"{labels} is empty")
    header = [c.lower() for c in rows[0]]
    id_col = header.index("id") if "id" in header else 0
    label_col = header.index("hemorrhage") if "hemorrhage" in header else 1
    samples: list[tuple[int, int]] = []
    for lineno, row in enumerate(rows[1:], 2):
        try:
            samples.append((int(row[id_col]), int(float(row[label_col]))))
        except (ValueError, IndexError):
            raise RawDataError(f"headct: {labels}:{lineno} is {row!r}; expected '<id>,<0 or 1>'.", RAW_FIX) from None
    samples.sort()  # by id: the official order (labels.csv is sorted by id)
    for i, _ in samples:
        if not (images / f"{i:03d}.png").is_file():
            raise _layout_error("headct", raw, f"{images / f'{i:03d}.png'} (listed in {labels}) is missing")
    normals = [images / f"{i:03d}.png" for i, y in samples if y == 0]
    bleeds = [images / f"{i:03d}.png" for i, y in samples if y != 0]
    train, test = _split_normals(normals, seed, "headct")
    with atomic_dir(out) as tmp:
        subset = tmp / "headct"
        _write_split(subset, train, test)
        for src in _progress(bleeds, "headct hemorrhage"):
            _place(src, subset / "test" / "hemorrhage")
        _log_counts(subset)


def convert_hyperkvasir(raw: Path, out: Path, *, seed: int = 42) -> None:
    """Hyper-Kvasir, upper GI tract: anatomical landmarks are the normals (split 3:1), each folder of
    pathological findings an anomaly class (barretts, barretts-short-segment, esophagitis-a, esophagitis-b-d)."""
    root = _find_root(
        raw, "hyperkvasir", ("upper-gi-tract/anatomical-landmarks", "upper-gi-tract/pathological-findings")
    )
    gi = root / "upper-gi-tract"
    normals = [f for d in _subdirs(gi / "anatomical-landmarks") for f in _files(d)]
    findings = {d.name: _files(d) for d in _subdirs(gi / "pathological-findings")}
    findings = {c: files for c, files in findings.items() if files}
    if not findings:
        raise _layout_error("hyperkvasir", root, "upper-gi-tract/pathological-findings/ holds no images")
    train, test = _split_normals(normals, seed, "hyperkvasir")
    with atomic_dir(out) as tmp:
        subset = tmp / "hyperkvasir"
        _write_split(subset, train, test)
        for cls, files in findings.items():
            for src in _progress(files, f"hyperkvasir {cls}"):
                _place(src, subset / "test" / cls)
        _log_counts(subset)
