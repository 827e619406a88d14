"""The dataset registry: what a dataset entry holds, and ``classname`` (a subset, as the papers name it) -> entry.

Like timm's model registry, one ``Dataset`` entry holds every fact about a dataset: its sources (where the raw
data comes from, its checksum, how it is packed), the raw layout its converter reads, the converter itself, its
licence and homepage. This module only defines the entries and looks them up; ``ahl.data.datasets`` registers the
built-in ones, so callers that need them import that module (it re-exports the look-up functions).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ahl.core.errors import RawDataError, UserError


class Converter(Protocol):
    """Turns a raw folder into MVTec-layout subsets under ``out`` (out/<subset>/...), written atomically."""

    def __call__(self, raw: Path, out: Path, *, seed: int) -> None: ...


@dataclass(frozen=True)
class Source:
    """One unit of raw data that the download stage obtains: an archive, a file, a folder or a package.

    ``key`` names the unit; two classnames with the same key share one download.
    """

    key: str
    url: str | None = None  # where to download from; None when only placed by hand
    sha256: str | None = None  # pinned once verified; None = not yet pinned (a warning, not an error)
    filename: str | None = None  # the file (or folder) name the user places by hand / the download is saved as
    manual: bool = False  # behind a login or a licence form: the user places the file, we verify it
    instructions: str = ""  # where to get it by hand, shown when it is missing
    package: str | None = None  # a Python package that carries the raw data offline (e.g. elpv-dataset)
    # A file or folder name at the raw root the converter expects: the shallowest folder holding it becomes the
    # raw root, so that every route (package, archive, folder) gives one layout.
    marker: str | None = None
    members_under: str | None = None  # extract only this folder of an archive (one category of MVTec AD)
    # Other archives a user may give as `data.local` (file name -> sha256), e.g. the full MVTec AD archive.
    other_archives: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, digest in {"": self.sha256, **self.other_archives}.items():
            if digest is not None and (len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest)):
                what = f"other archive {name!r}" if name else "sha256"
                raise ValueError(f"source {self.key!r}: {what} {digest!r} is not a lower-case hex sha256")
        if not (self.url or self.package or self.manual):
            raise ValueError(f"source {self.key!r}: no url, no package and not manual: nothing can obtain it")
        if self.manual and not (self.filename and self.instructions):
            raise ValueError(f"source {self.key!r}: a manual source needs a filename and instructions")


@dataclass(frozen=True)
class Dataset:
    """Everything about one dataset. Invalid entries (a converter that is not one, subsets without a source)
    fail when the entry is made, that is when ``ahl.data.datasets`` is imported, not when a user runs it."""

    name: str
    title: str  # the dataset's own name, for messages ("KolektorSDD")
    subsets: tuple[str, ...]
    licence: str
    homepage: str
    raw_layout: str  # what the converter reads, shown when the raw data does not match it
    converter: Converter  # raw folder -> MVTec layout (convert_mvtec for data already in that layout)
    sources: dict[str, Source] = field(default_factory=dict)  # subset -> the source it needs
    build: Callable[..., None] | None = None  # generates the raw data locally (the embedded demo); no sources

    def __post_init__(self) -> None:
        _check_converter(self.name, self.converter)
        if self.build is not None and self.sources:
            raise ValueError(f"dataset {self.name!r}: a built dataset has no sources")
        if self.build is None and set(self.sources) != set(self.subsets):
            raise ValueError(
                f"dataset {self.name!r}: subsets {sorted(self.subsets)} and sources {sorted(self.sources)} differ"
            )

    def source(self, key: str) -> Source:
        for source in self.sources.values():
            if source.key == key:
                return source
        raise UserError(f"dataset {self.name!r} has no source {key!r}; rerun the resolve stage (dvc repro resolve)")

    def convert(self, raw: Path, out: Path, *, seed: int) -> None:
        """Run the converter; a raw layout it cannot read is reported with the layout this dataset expects."""
        try:
            self.converter(raw, out, seed=seed)
        except RawDataError as err:
            # Built raw data is not the user's to fix: it is rebuilt.
            fix = "Rebuild it with `dvc repro -f download convert`." if self.build is not None else err.fix
            raise UserError(
                f"{err.problem} Expected raw layout: {self.raw_layout}. The data comes from {self.title}, "
                f"{self.homepage}. {fix}"
            ) from None


def _check_converter(dataset: str, converter: object) -> None:
    if not callable(converter):
        raise TypeError(f"dataset {dataset!r}: converter {converter!r} is not a function")
    try:
        inspect.signature(converter).bind(Path("raw"), Path("out"), seed=0)
    except TypeError as err:
        raise TypeError(
            f"dataset {dataset!r}: converter {converter!r} cannot be called as (raw, out, *, seed)"
        ) from err
    except ValueError:  # no signature to inspect (a builtin): nothing more to check
        pass


DATASETS: dict[str, Dataset] = {}


def register(dataset: Dataset) -> Dataset:
    if dataset.name in DATASETS:
        raise ValueError(f"dataset {dataset.name!r} registered twice")
    for other in DATASETS.values():
        clash = set(other.subsets) & set(dataset.subsets)
        if clash:
            raise ValueError(f"subsets {sorted(clash)} belong to both {other.name!r} and {dataset.name!r}")
        shared = {s.key for s in other.sources.values()} & {s.key for s in dataset.sources.values()}
        if shared:
            raise ValueError(f"source keys {sorted(shared)} belong to both {other.name!r} and {dataset.name!r}")
    DATASETS[dataset.name] = dataset
    return dataset


def _registered() -> dict[str, Dataset]:
    if not DATASETS:  # a caller looked up before anything was registered: say so rather than "unknown classname"
        raise RuntimeError("no dataset is registered: import ahl.data.datasets, which registers the built-in ones")
    return DATASETS


def known_classnames() -> list[str]:
    return sorted(s for d in _registered().values() for s in d.subsets)


@dataclass(frozen=True)
class Selection:
    """What a classname resolves to: the dataset, the subset and the source the download stage obtains."""

    dataset: str
    classname: str
    source: str


def resolve(classname: str) -> Selection:
    """Map a classname to its dataset and source; an unknown name is an error listing the known ones."""
    for dataset in _registered().values():
        if classname in dataset.subsets:
            source = dataset.sources.get(classname)
            return Selection(dataset.name, classname, source.key if source else dataset.name)
    raise UserError(
        f"unknown classname {classname!r}; known classnames: {', '.join(known_classnames())}. "
        "Set one of them as `classname` in params.yaml (or `dvc exp run -S classname=NAME`)."
    )


def get_dataset(name: str) -> Dataset:
    datasets = _registered()
    if name not in datasets:
        raise UserError(
            f"unknown dataset {name!r}; known datasets: {', '.join(sorted(datasets))}. "
            "Rerun the resolve stage (dvc repro resolve)."
        )
    return datasets[name]


def get_source(dataset: Dataset, key: str) -> Source:
    return dataset.source(key)
