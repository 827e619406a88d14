"""The dataset registry: a ``classname`` (a subset, as the papers name it) -> its dataset, source and converter.

Like timm's model registry: ``DATASETS["elpv"]`` knows where the raw data lives, how to check it, its licence
and how to turn it into the MVTec layout; ``resolve("carpet")`` says which dataset and source a subset needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ahl.errors import UserError

# A converter turns a raw download (a directory) into MVTec-layout subsets under ``out`` (out/<subset>/...).
Converter = Callable[..., None]


@dataclass(frozen=True)
class Source:
    """One unit of raw data that the download stage obtains: an archive, a file, a package or a generator.

    ``key`` names the unit; two classnames with the same key share one download.
    """

    key: str
    url: str | None = None  # where to download from; None when built locally or only placed by hand
    sha256: str | None = None  # pinned once verified; None = not yet pinned (a warning, not an error)
    filename: str | None = None  # the file name the user places by hand / the download is saved as
    manual: bool = False  # behind a login or a licence form: the user places the file, we verify it
    instructions: str = ""  # where to get it by hand, shown when it is missing
    package: str | None = None  # a Python package that carries the raw data offline (e.g. elpv-dataset)


@dataclass(frozen=True)
class Dataset:
    name: str
    subsets: tuple[str, ...]
    licence: str
    homepage: str
    converter: Converter | None  # None: the raw data is already in MVTec layout
    sources: dict[str, Source] = field(default_factory=dict)  # subset -> the source it needs
    build: Callable[..., None] | None = None  # datasets generated locally (the embedded demo)


DATASETS: dict[str, Dataset] = {}


def register(dataset: Dataset) -> Dataset:
    if dataset.name in DATASETS:
        raise ValueError(f"dataset {dataset.name!r} registered twice")
    for other in DATASETS.values():
        clash = set(other.subsets) & set(dataset.subsets)
        if clash:
            raise ValueError(f"subsets {sorted(clash)} belong to both {other.name!r} and {dataset.name!r}")
    DATASETS[dataset.name] = dataset
    return dataset


def known_classnames() -> list[str]:
    _load_builtin()
    return sorted(s for d in DATASETS.values() for s in d.subsets)


@dataclass(frozen=True)
class Selection:
    """What a classname resolves to: the dataset, the subset and the source the download stage obtains."""

    dataset: str
    classname: str
    source: str

    def as_dict(self) -> dict[str, str]:
        return {"dataset": self.dataset, "classname": self.classname, "source": self.source}


def resolve(classname: str) -> Selection:
    """Map a classname to its dataset and source; an unknown name is an error listing the known ones."""
    _load_builtin()
    for dataset in DATASETS.values():
        if classname in dataset.subsets:
            source = dataset.sources.get(classname)
            return Selection(dataset.name, classname, source.key if source else dataset.name)
    raise UserError(
        f"unknown classname {classname!r}; known classnames: {', '.join(known_classnames())}. "
        "Set one of them as `classname` in params.yaml (or `dvc exp run -S classname=NAME`)."
    )


def get_dataset(name: str) -> Dataset:
    _load_builtin()
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def get_source(dataset: Dataset, key: str) -> Source:
    for source in dataset.sources.values():
        if source.key == key:
            return source
    raise UserError(f"dataset {dataset.name!r} has no source {key!r}; rerun the resolve stage")


def _load_builtin() -> None:
    # Imported lazily so that the registry module itself stays import-light and free of cycles.
    from ahl.data import datasets  # noqa: F401  (registers the built-in datasets)


def dataset_dir(root: Path, classname: str) -> Path:
    return Path(root) / classname


def source_of(selection: Selection) -> Source | None:
    """The registered source of a resolved classname (None for built datasets such as the embedded demo)."""
    dataset = get_dataset(selection.dataset)
    return get_source(dataset, selection.source) if dataset.sources else None
