"""The feature cache AHL trains on: the frozen base model's features of train, test and pseudo-anomaly images.

Stored packed (one ``.npy`` per split, family and scale; memory-mappable; float16 by default) with an
``index.json`` naming every row. A cache directory is written atomically: it exists only when complete.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ahl.errors import UserError
from ahl.io import read_json

INDEX = "index.json"


@dataclass
class FeatureSet:
    """Features of a list of images at every scale, with their labels (0 normal, 1 seen, 2 pseudo)."""

    scales: list[np.ndarray]  # per scale s: (N, C, H_s, W_s), float16/float32, possibly memory-mapped
    labels: np.ndarray  # (N,) int64
    classes: list[str]  # (N,) "good", the anomaly class, or the pseudo-anomaly family
    files: list[str]  # (N,) image path relative to the dataset root ("" for generated images)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> "FeatureSet":
        index = np.asarray(index, dtype=np.int64)
        return FeatureSet(
            scales=[np.asarray(x[index]) for x in self.scales],
            labels=self.labels[index],
            classes=[self.classes[i] for i in index],
            files=[self.files[i] for i in index],
        )


@dataclass
class FeatureCache:
    train_normal: FeatureSet
    train_anomaly: FeatureSet  # the M seen anomalies (label 1)
    # family -> pseudo anomalies made from the train normals, row i made from train_normal row i (label 2).
    pseudo: dict[str, FeatureSet]
    test: FeatureSet
    reference: list[np.ndarray]  # per scale (C, H_s, W_s) float32: mean feature of DRA's reference normals
    meta: dict = field(default_factory=dict)

    @property
    def n_scales(self) -> int:
        return len(self.reference)


def _split_names(index: dict) -> list[str]:
    return list(index["splits"].keys())


def load_cache(path: str | Path, mmap: bool = True) -> FeatureCache:
    """Open a cache written by ``write_cache``; arrays are memory-mapped unless ``mmap`` is False."""
    path = Path(path)
    index_file = path / INDEX
    if not index_file.is_file():
        raise UserError(f"{path} is not a complete feature cache (no {INDEX}); rerun the features stage")
    index = read_json(index_file)
    n_scales = index["n_scales"]
    mode = "r" if mmap else None

    def load(name: str) -> FeatureSet:
        entry = index["splits"][name]
        return FeatureSet(
            scales=[np.load(path / f"{name}.s{s}.npy", mmap_mode=mode) for s in range(n_scales)],
            labels=np.asarray(entry["labels"], dtype=np.int64),
            classes=list(entry["classes"]),
            files=list(entry["files"]),
        )

    families = [n.removeprefix("pseudo_") for n in _split_names(index) if n.startswith("pseudo_")]
    return FeatureCache(
        train_normal=load("train_normal"),
        train_anomaly=load("train_anomaly"),
        pseudo={f: load(f"pseudo_{f}") for f in families},
        test=load("test"),
        reference=[np.load(path / f"reference.s{s}.npy").astype(np.float32) for s in range(n_scales)],
        meta=index.get("meta", {}),
    )
