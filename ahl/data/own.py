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

from ahl.data import converters
from ahl.data.mvtec import GOOD, IMAGE_SUFFIXES, to_8bit
from ahl.data.registry import Dataset, Source
from ahl.errors import UserError
from ahl.io import atomic_dir

log = logging.getLogger(__name__)

OWN = "local"  # the dataset name data/selection.json records for your own data
NORMAL_FOLDERS = (GOOD, "normal")  # folder layout: the folder of one of these names holds the normal images
MASKS = "ground_truth"  # <defect>/<stem>_mask.png under it, in either layout
LAYOUT = (
    "NAME/train/good/, NAME/test/good/, NAME/test/<defect>/ (MVTec layout) or NAME/good/ (or NAME/normal/) and "
    "NAME/<defect>/ (folder layout), each optionally with NAME/ground_truth/<defect>/<stem>_mask.png"
)
README = "README, 'Your own data'"


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
                      f"({README})")  # fmt: skip
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


def own_dataset(classname: str) -> Dataset:
    """The (unregistered) dataset entry of your own data: its raw data is data.local, converted by convert_own."""
    return Dataset(
        name=OWN,
        title=f"your own dataset {classname!r} (data.local)",
        subsets=(classname,),
        licence="yours",
        homepage="data.local in params.yaml",
        raw_layout=LAYOUT.replace("NAME", classname),
        converter=partial(convert_own, classname=classname),
        sources={
            classname: Source(
                key=OWN, manual=True, filename=classname,
                instructions=f"give the folder holding {classname}/ as `data.local` in params.yaml ({README})",
            )
        },
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------- convert
def _target(files: list[Path]) -> tuple[tuple[int, int], str]:
    """The most common (width, height), ties to the largest; RGB unless every image is 8-bit grey (L)."""
    sizes, modes = Counter(), Counter()
    for f in files:
        with Image.open(f) as im:
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


def _write_image(src: Path, dst: Path, size: tuple[int, int], mode: str) -> None:
    with Image.open(src) as im:
        if src.suffix.lower() == ".png" and im.size == size and im.mode == mode:
            converters._put_png(src, dst)
            return
    img = to_8bit(converters._read_image(src))
    img = img.convert(mode) if img.mode != mode else img
    if img.size != size:
        img = img.resize(size, Image.Resampling.BILINEAR)
    img.save(dst, format="PNG")


def _write_mask(src: Path, dst: Path, size: tuple[int, int]) -> None:
    mask = converters._read_mask(src)
    if mask.shape[::-1] != size:
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 0
    converters._save_mask(mask, dst)


def _plan(layout: OwnLayout, seed: int, classname: str) -> list[tuple[Path, str]]:
    """(source image, destination folder relative to the subset) of every image."""
    if layout.kind == "mvtec":
        plan = [(f, f"{split}/{GOOD}") for split, files in layout.normals.items() for f in files]
    else:
        train, test = converters._split_normals(layout.normals["all"], seed, classname)
        plan = [(f, f"train/{GOOD}") for f in train] + [(f, f"test/{GOOD}") for f in test]
    return plan + [(f, f"test/{c}") for c, files in layout.anomalies.items() for f in files]


def convert_own(raw: Path, out: Path, *, seed: int = 42, classname: str) -> None:
    """data.local/NAME (copied into ``raw``) -> ``out/NAME`` in MVTec layout; see the module's docstring."""
    root = converters._find_root(Path(raw), OWN, [classname]) / classname
    layout = inspect_folder(root, "data.local", shown=Path("data.local") / classname)
    plan = _plan(layout, seed, classname)
    size, mode = _target([f for f, _ in plan])
    with atomic_dir(out) as tmp:
        subset = tmp / classname
        for src, folder in converters._progress(plan, classname):
            _write_image(src, converters._free_name(subset / folder, src.stem), size, mode)
        for defect in layout.anomalies:
            for mask in _images(root / MASKS / defect):
                (subset / MASKS / defect).mkdir(parents=True, exist_ok=True)
                _write_mask(mask, subset / MASKS / defect / f"{mask.stem}.png", size)
        converters._log_counts(subset)
