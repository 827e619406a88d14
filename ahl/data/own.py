"""Your own dataset: ``classname: NAME`` with ``data.local: FOLDER`` where FOLDER holds ``NAME/`` in one of two layouts.

MVTec layout: ``NAME/train/good/``, ``NAME/test/good/``, ``NAME/test/<defect>/`` and optionally
``NAME/ground_truth/<defect>/<stem>_mask.png``; its own train/test split is kept.

Folder layout (anomalib's ``Folder``): ``NAME/good/`` (or ``NAME/normal/``: the folder of that name holds the normal
images) and one folder per defect class ``NAME/<defect>/``, optionally ``NAME/ground_truth/<defect>/``; the normals
are split 3:1 train/test by ``data.split_seed``, as for the other non-MVTec datasets.

Images of mixed sizes or modes are converted to the most common size (masks with nearest-neighbour) and to RGB,
with a warning. Every problem is a one-line UserError naming the folder under ``data.local`` and the fix.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from ahl.core.errors import UserError
from ahl.core.io import atomic_dir
from ahl.data import converters
from ahl.data.mvtec import GOOD, IMAGE_SUFFIXES, MAX_PIXELS, to_8bit, too_large
from ahl.data.registry import Dataset, Source

log = logging.getLogger(__name__)

OWN = "local"  # the dataset name data/selection.json records for your own data
NORMAL_FOLDERS = (GOOD, "normal")  # folder layout: the folder of one of these names holds the normal images
MASKS = "ground_truth"  # <defect>/<stem>_mask.png under it, in either layout
LAYOUT = (
    "NAME/train/good/, NAME/test/good/, NAME/test/<defect>/ (MVTec layout) or NAME/good/ (or NAME/normal/) and "
    "NAME/<defect>/ (folder layout), each optionally with NAME/ground_truth/<defect>/<stem>_mask.png"
)
GUIDE = "docs/data.md, 'Your own data'"


@dataclass(frozen=True)
class OwnLayout:
    """What a NAME folder holds: its layout, normal images ("train"/"test", or "all" in the folder layout), and the
    anomaly images per defect class; every list sorted."""

    kind: str  # "mvtec" | "folder"
    root: Path
    normals: dict[str, list[Path]]
    anomalies: dict[str, list[Path]]

    @property
    def n_anomalies(self) -> int:
        return sum(len(v) for v in self.anomalies.values())


def _images(folder: Path) -> list[Path]:
    return [p for p in converters._files(folder) if p.suffix.lower() in IMAGE_SUFFIXES] if folder.is_dir() else []


def _classes(folder: Path, skip: set[str]) -> dict[str, list[Path]]:
    return {d.name: _images(d) for d in converters._subdirs(folder) if d.name not in skip}


def inspect_folder(root: Path, local: Path | str, shown: Path | None = None) -> OwnLayout:
    """The layout of ``root`` (= data.local/NAME), or a UserError naming the folder and the fix. Messages name
    ``shown`` instead of ``root`` when given (the converter reads a copy inside the pipeline's outputs)."""
    layout = _inspect(root, shown or root, f"fix it in data.local ({local}) and run again; expected layout: {LAYOUT} "
                      f"({GUIDE})")  # fmt: skip
    return OwnLayout(layout.kind, root, layout.normals, layout.anomalies)


def _inspect(real: Path, root: Path, fix: str) -> OwnLayout:
    def at(*parts: str) -> Path:  # a path under the real folder; ``root / parts`` is what messages show
        return real.joinpath(*parts)

    if at("train").is_dir() or at("test").is_dir():
        normals = {split: _images(at(split, GOOD)) for split in ("train", "test")}
        for split, files in normals.items():
            if not files:
                raise UserError(f"your dataset {root} (MVTec layout) has no images in {root / split / GOOD}; {fix}")
        anomalies = _classes(at("test"), {GOOD})
        kind, where = "mvtec", f"{root / 'test'}/<defect>/"
    else:
        present = [n for n in NORMAL_FOLDERS if at(n).is_dir()]
        if len(present) != 1:
            what = "both good/ and normal/" if present else "no train/good/, good/ or normal/ folder"
            raise UserError(f"your dataset {root} has {what}: say which images are normal; {fix}")
        normals = {"all": _images(at(present[0]))}
        if len(normals["all"]) < 2:
            raise UserError(f"{root / present[0]} holds {len(normals['all'])} normal images, at least 2 are needed "
                            f"for the 3:1 train/test split; {fix}")  # fmt: skip
        anomalies = _classes(real, {*NORMAL_FOLDERS, MASKS})
        kind, where = "folder", f"{root}/<defect>/"
    anomalies = {c: files for c, files in anomalies.items() if files}
    if not anomalies:
        raise UserError(f"your dataset {root} has no anomalies: put each defect class's images in {where}; {fix}")
    return OwnLayout(kind, root, normals, anomalies)


def check_enough(layout: OwnLayout, n_anomalies: int, test_set_m: int, local: Path | str) -> None:
    """The general setting trains on M anomalies and tests on those after the first max(M, test_set_m)."""
    held_out = max(n_anomalies, test_set_m)
    if layout.n_anomalies <= held_out:
        raise UserError(
            f"your dataset {layout.root} holds {layout.n_anomalies} anomalies but protocol.n_anomalies={n_anomalies} "
            f"(test set of M=protocol.test_set_m={test_set_m}) needs more than {held_out}; add anomalies in "
            f"data.local ({local}) or lower them, e.g. `dvc exp run -S protocol.n_anomalies=N -S protocol.test_set_m=N`"
            f" with N < {layout.n_anomalies}"
        )


def own_dataset(classname: str, max_pixels: int = MAX_PIXELS) -> Dataset:
    """The (unregistered) dataset entry of your own data: its raw data is data.local, converted by convert_own
    (which skips images and masks above ``max_pixels``, data.max_pixels, with a warning)."""
    return Dataset(
        name=OWN,
        title=f"your own dataset {classname!r} (data.local)",
        subsets=(classname,),
        licence="yours",
        homepage="data.local in params.yaml",
        raw_layout=LAYOUT.replace("NAME", classname),
        converter=partial(convert_own, classname=classname, max_pixels=max_pixels),
        sources={
            classname: Source(
                key=OWN, manual=True, filename=classname,
                instructions=f"give the folder holding {classname}/ as `data.local` in params.yaml ({GUIDE})",
            )
        },
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------- convert
def _unreadable(path: Path, err: BaseException, copy: Path | None = None) -> UserError:
    """One of the user's images that PIL cannot read: named, with the fix in their folder (not a raw download).
    ``copy``: the file PIL read, when ``path`` is the user's name for it (its path is taken out of PIL's text)."""
    detail = str(err) if copy is None else str(err).replace(str(copy), str(path))
    return UserError(
        f"cannot read {path} of your data ({type(err).__name__}: {detail}); replace it with a readable "
        f"image or move it out of the folder data.local names ({GUIDE})"
    )


def _read(path: Path, header_only: bool = False, unreadable=_unreadable) -> Image.Image:
    return converters._read_image(path, header_only, unreadable)


def _target(files: list[Path], unreadable=_unreadable) -> tuple[tuple[int, int], str]:
    """The most common (width, height), ties to the largest; RGB unless every image is 8-bit grey (L)."""
    sizes, modes = Counter(), Counter()
    for f in files:
        with _read(f, header_only=True, unreadable=unreadable) as im:
            sizes[im.size] += 1
            modes[im.mode] += 1
    size = max(sizes, key=lambda s: (sizes[s], s))
    mode = "L" if set(modes) == {"L"} else "RGB"
    odd = sum(n for s, n in sizes.items() if s != size)
    if odd:
        log.warning("%d of %d images are not %dx%d (sizes %s); they are resized to it", odd, len(files), *size,
                    dict(sizes))  # fmt: skip
    if len(modes) > 1:
        log.warning("images of mixed modes %s; all are converted to %s", dict(modes), mode)
    return size, mode


def _write_image(src: Path, dst: Path, size: tuple[int, int], mode: str, unreadable=_unreadable) -> None:
    img = _read(src, unreadable=unreadable)
    if src.suffix.lower() == ".png" and img.size == size and img.mode == mode:
        img.close()
        converters._put_png(src, dst)
        return
    img = to_8bit(img)
    img = img.convert(mode) if img.mode != mode else img
    if img.size != size:
        img = img.resize(size, Image.Resampling.BILINEAR)
    img.save(dst, format="PNG")


def _write_mask(src: Path, dst: Path, size: tuple[int, int], unreadable=_unreadable) -> None:
    mask = converters._read_mask(src, unreadable)
    if mask.shape[::-1] != size:
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 0
    converters._save_mask(mask, dst)


def _check_masks(masks: list[Path], plan: list[tuple[Path, str]], root: Path, shown: Path, unreadable) -> None:
    """Every mask has its image's size (both are resized together to the subset's size afterwards); a mask of
    another size is one line naming both files, never stretched to fit."""
    images = {(folder.rsplit("/", 1)[-1], f.stem): f for f, folder in plan if folder != f"train/{GOOD}"}
    for mask in masks:
        image = images.get((mask.parent.name, mask.stem.removesuffix("_mask")))
        if image is None:
            continue
        with _read(mask, header_only=True, unreadable=unreadable) as m, _read(image, True, unreadable) as im:
            if m.size != im.size:
                raise UserError(
                    f"{shown / mask.relative_to(root)} is {m.width}x{m.height} but its image "
                    f"{shown / image.relative_to(root)} is {im.width}x{im.height}; a mask has its image's size: save "
                    f"it at {im.width}x{im.height} (or move it out of {shown / MASKS})"
                )


def _plan(layout: OwnLayout, seed: int, classname: str) -> list[tuple[Path, str]]:
    """(source image, destination folder relative to the subset) of every image."""
    if layout.kind == "mvtec":
        plan = [(f, f"{split}/{GOOD}") for split, files in layout.normals.items() for f in files]
    else:
        train, test = converters._split_normals(layout.normals["all"], seed, classname)
        plan = [(f, f"train/{GOOD}") for f in train] + [(f, f"test/{GOOD}") for f in test]
    return plan + [(f, f"test/{c}") for c, files in layout.anomalies.items() for f in files]


def _within(files: list[Path], max_pixels: int, shown: Path, root: Path, unreadable) -> set[Path]:
    """The files of at most ``max_pixels`` (read from their headers); the others are named in a warning each."""
    kept = set()
    for f in files:
        with _read(f, header_only=True, unreadable=unreadable) as im:
            if im.width * im.height > max_pixels:
                why = too_large(shown / f.relative_to(root), *im.size, max_pixels, "data.max_pixels")
                log.warning("skipped: %s", why)
            else:
                kept.add(f)
    return kept


def convert_own(raw: Path, out: Path, *, seed: int = 42, classname: str, max_pixels: int = MAX_PIXELS) -> None:
    """data.local/NAME (copied into ``raw``) -> ``out/NAME`` in MVTec layout; see the module's docstring."""
    root = converters._find_root(Path(raw), OWN, [classname]) / classname
    shown = Path("data.local") / classname
    layout = inspect_folder(root, "data.local", shown=shown)

    def unreadable(path: Path, err: BaseException) -> UserError:  # your file, not its copy under data/raw
        return _unreadable(shown / path.relative_to(root), err, copy=path)

    plan = _plan(layout, seed, classname)
    masks = [m for defect in layout.anomalies for m in _images(root / MASKS / defect)]
    kept = _within([f for f, _ in plan] + masks, max_pixels, shown, root, unreadable)
    skipped = {(folder.rsplit("/", 1)[-1], f.stem) for f, folder in plan if f not in kept}  # and their masks
    kept -= {m for m in masks if (m.parent.name, m.stem.removesuffix("_mask")) in skipped}
    plan = [(f, folder) for f, folder in plan if f in kept]
    _check_masks([m for m in masks if m in kept], plan, root, shown, unreadable)
    size, mode = _target([f for f, _ in plan], unreadable)
    with atomic_dir(out) as tmp:
        subset = tmp / classname
        for src, folder in converters._progress(plan, classname):
            _write_image(src, converters._free_name(subset / folder, src.stem), size, mode, unreadable)
        for mask in (m for m in masks if m in kept):
            (subset / MASKS / mask.parent.name).mkdir(parents=True, exist_ok=True)
            _write_mask(mask, subset / MASKS / mask.parent.name / f"{mask.stem}.png", size, unreadable)
        converters._log_counts(subset)
