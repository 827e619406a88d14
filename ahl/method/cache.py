"""The feature cache AHL trains on: the frozen base model's features of train, test and pseudo-anomaly images.

Stored packed (one ``.npy`` per split, family and scale; memory-mappable; float32 by default, float16 on
request) with an ``index.json`` naming every row. A cache directory is written atomically: it exists only when complete.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ahl.core.config import run_bounds
from ahl.core.distributed import SINGLE, Group
from ahl.core.errors import UserError
from ahl.core.io import atomic_dir, preallocate, read_json, write_json
from ahl.core.runtime import Runtime, plain
from ahl.models.backbones import to_input
from ahl.pseudo.maker import FAMILIES, PseudoAnomalyMaker

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

    def batches(self, batch_size: int, device: torch.device | str) -> Iterator[list[torch.Tensor]]:
        """The features per scale, ``batch_size`` images at a time, as float32 on ``device`` (how the heads read
        the cache)."""
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            yield [torch.from_numpy(np.array(x[start:stop], dtype=np.float32)).to(device) for x in self.scales]


@dataclass
class FeatureCache:
    train_normal: FeatureSet
    train_anomaly: FeatureSet  # the M seen anomalies (label 1)
    # family -> pseudo anomalies made from the train normals, row i made from train_normal row i (label 2).
    pseudo: dict[str, FeatureSet]
    test: FeatureSet
    normal_mean: list[np.ndarray]  # per scale (C, H_s, W_s) float32: mean feature of DRA's reference normals
    meta: dict = field(default_factory=dict)
    validation: FeatureSet | None = None  # held-out normals and spare anomalies (labels 0/1), for the threshold

    @property
    def n_scales(self) -> int:
        return len(self.normal_mean)


def load_cache(path: str | Path, mmap: bool = True) -> FeatureCache:
    """Open a cache written by ``write_cache``; arrays are memory-mapped unless ``mmap`` is False."""
    path = Path(path)
    index_file = path / INDEX
    broken = "rebuild it with `dvc repro -f features` (or `python stages/features.py`)"
    if not index_file.is_file():
        raise UserError(f"{path} is not a complete feature cache (no {INDEX}); {broken}")
    try:
        index = read_json(index_file)
        n_scales = int(index["n_scales"])
        names = list(index["splits"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{index_file} is corrupt ({type(exc).__name__}: {exc}); {broken}") from None
    mode = "r" if mmap else None

    def array(file: Path) -> np.ndarray:
        try:
            return np.load(file, mmap_mode=mode)
        except (OSError, ValueError, EOFError) as exc:  # missing, truncated or not an .npy
            raise UserError(f"{file} is unreadable ({exc}); {broken}") from None

    def load(name: str) -> FeatureSet:
        entry = index["splits"][name]
        scales = [array(path / f"{name}.s{s}.npy") for s in range(n_scales)]
        if any(len(x) != len(entry["labels"]) for x in scales):
            rows = [len(x) for x in scales]
            raise UserError(f"{path}: {name} has {rows} rows for {len(entry['labels'])} labels; {broken}")
        for s, x in enumerate(scales):  # e.g. bytes overwritten: NaN would reach k-means as a traceback
            if not np.isfinite(x).all():
                raise UserError(f"{path / f'{name}.s{s}.npy'} holds non-finite values (NaN or inf); {broken}")
        return FeatureSet(
            scales=scales,
            labels=np.asarray(entry["labels"], dtype=np.int64),
            classes=list(entry["classes"]),
            files=list(entry["files"]),
        )

    families = [n.removeprefix("pseudo_") for n in names if n.startswith("pseudo_")]
    return FeatureCache(
        train_normal=load("train_normal"),
        train_anomaly=load("train_anomaly"),
        pseudo={f: load(f"pseudo_{f}") for f in families},
        test=load("test"),
        normal_mean=[np.asarray(array(path / f"reference.s{s}.npy"), dtype=np.float32) for s in range(n_scales)],
        meta=index.get("meta", {}),
        validation=load("validation") if "validation" in names else None,
    )


# --------------------------------------------------------------------------------------------------------
# Writing the cache


@dataclass(frozen=True)
class CacheConfig:
    families: tuple[str, ...] = ("draem", "cutpaste", "cutmix")  # pseudo-anomaly families to build
    dtype: str = "float32"  # storage dtype: float32 or float16 (half the disk; docs/deviations.md)
    batch_size: int = 32
    dtd_dir: str | None = None  # a folder of DTD textures for DRAEM; None = scikit-image's photographs
    variants: int = 1  # independent draws of every family ("family@k"), for ahl.redraw_augmentation
    # CutPaste and CutMix pseudo anomalies are rotated by up to this many degrees (nearest neighbour, black
    # corners), as the official AHL feature extraction does (RandomRotation(180)); 0 = not rotated
    pseudo_rotation: float = 180.0

    def __post_init__(self) -> None:
        run_bounds("features", self, epochs=(), steps=())
        for family in self.families:
            if family not in FAMILIES:
                raise UserError(f"params.yaml: features.families: unknown family {family!r}; known: {FAMILIES}")
        if len(set(self.families)) < 2:
            raise UserError("params.yaml: features.families needs at least 2 families (support and query differ)")
        if self.batch_size < 1:
            raise UserError(f"params.yaml: features.batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.pseudo_rotation <= 180:
            raise UserError(f"params.yaml: features.pseudo_rotation must be in [0, 180], got {self.pseudo_rotation}")
        if self.variants < 1:
            raise UserError(f"params.yaml: features.variants must be >= 1, got {self.variants}")
        if self.dtype not in ("float16", "float32"):
            raise UserError(f"params.yaml: features.dtype must be float16 or float32, got {self.dtype!r}")


def round_to_float16(x: torch.Tensor) -> torch.Tensor:
    """float32 ``x`` rounded to the nearest float16 value (ties to even), as float32: numpy's
    ``astype(float16).astype(float32)`` bit for bit, subnormals, overflow to +-inf and nan included.

    Computed in arithmetic that every runtime keeps (OpenVINO folds a float32 -> float16 -> float32 cast pair
    away): the float16 spacing ``ulp`` of |x| found by a binary search over its binade (powers of two only, so
    every product is exact), then ``round(x / ulp) * ulp`` with round-half-to-even (torch.round, ONNX Round)."""
    x = x.float()
    m = torch.clamp(x.abs(), min=2.0**-14) * 2.0**14  # >= 1: float16's subnormals share the spacing of 2**-14
    ulp, inv = torch.full_like(x, 2.0**-24), torch.full_like(x, 2.0**24)
    for bits in (16, 8, 4, 2, 1):  # m = 2**e' * f, f in [1, 2): ulp = 2**(e' - 24), e' = sum of the bits taken
        big = m >= 2.0**bits
        m = torch.where(big, m * 2.0**-bits, m)
        ulp = torch.where(big, ulp * 2.0**bits, ulp)
        inv = torch.where(big, inv * 2.0**-bits, inv)
    rounded = torch.round(x * inv) * ulp
    return torch.where(rounded.abs() > 65504.0, x.sign() * float("inf"), rounded)  # float16's largest finite value


def as_cached(features: list[torch.Tensor], dtype: str | None) -> list[torch.Tensor]:
    """Features as AHL's heads see them from the cache: rounded to the cache's ``dtype`` (as ``_extract`` stores
    them with numpy) and kept as float32 on the same device; ``dtype`` float32 or None: unchanged."""
    if dtype in (None, "float32"):
        return [f.float() for f in features]
    if dtype != "float16":
        raise UserError(f"feature dtype {dtype!r}: the cache stores float16 or float32")
    return [round_to_float16(f) for f in features]


def _open_array(path: Path, dtype: str, shape: tuple[int, ...]) -> np.memmap:
    """A writable ``.npy`` memmap whose blocks are reserved, so that a full disk is an error, not a SIGBUS."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    preallocate(path)  # the mapping stays valid; its pages now have blocks behind them
    return array


def _extract(
    model, images_of, n: int, out, name: str, config: CacheConfig, runtime: Runtime, progress: bool, group
) -> None:
    """Features of ``n`` images (``images_of(i)`` -> (S, S, 3) uint8) into ``out/<name>.s<scale>.npy``.

    Several ranks: batch k is rank k % world's (the same batches as one process, so the same features); rank 0
    gathers each round of batches and writes them (``out`` is None on the others)."""
    arrays = None
    starts = list(range(0, n, config.batch_size))
    bar = tqdm(total=n, desc=f"features {name}", disable=not progress)
    for first in range(0, len(starts), group.world):
        round_starts = starts[first : first + group.world]
        feats = None
        if group.rank < len(round_starts):
            start = round_starts[group.rank]
            batch = np.stack([images_of(i) for i in range(start, min(n, start + config.batch_size))])
            with runtime.autocast():
                maps = model.features(runtime.input(to_input(batch, runtime.device)))
            feats = [f.float().cpu().numpy().astype(config.dtype) for f in maps]
        parts = group.gather(feats)
        if out is None:
            continue
        for start, part in zip(round_starts, parts):
            if arrays is None:
                arrays = [
                    _open_array(out / f"{name}.s{s}.npy", config.dtype, (n, *f.shape[1:])) for s, f in enumerate(part)
                ]
            for s, f in enumerate(part):
                arrays[s][start : start + len(f)] = f
            bar.update(len(part[0]))
    bar.close()
    for a in arrays or []:
        a.flush()


def _make_pseudo(pool: ThreadPoolExecutor, maker: PseudoAnomalyMaker, n: int, config: CacheConfig, seed: int) -> dict:
    """{(family, variant): future of its n pseudo anomalies (uint8 images)}, made by ``pool``'s one worker thread,
    family after family, while the caller runs the backbone over the real images and the families made before
    (NumPy and the backbone release the GIL). Each family has its own generator and only the worker touches the
    maker, so the images do not depend on the thread."""

    def make(family: str, k: int, v: int) -> list[np.ndarray]:
        rng = np.random.default_rng([seed, k, v])  # one stream per family and variant
        return [maker.make(family, i, rng) for i in range(n)]

    return {(f, v): pool.submit(make, f, k, v) for k, f in enumerate(config.families) for v in range(config.variants)}


def write_cache(
    out: str | Path,
    model,  # ahl.models.base.AnomalyModel, frozen (eval mode)
    normal_mean: list,  # per scale (C, H, W) tensors
    splits: dict[str, tuple[np.ndarray, list[int], list[str], list[str]]],  # name -> (images, labels, classes, files)
    config: CacheConfig,
    *,
    seed: int,
    device,
    progress: bool = False,
    meta: dict | None = None,
    group: Group = SINGLE,
    runtime: Runtime | None = None,
) -> None:
    """Extract features of every split and of the pseudo anomalies of ``splits["train_normal"]`` into ``out``.

    The model runs in eval mode under no_grad with the normalisation inside its backbone, exactly as when
    scoring. Pseudo anomalies are made with one seeded generator per family, so each family is reproducible
    on its own. Under torchrun (``group``) the ranks share the batches and rank 0 alone writes. ``runtime``
    (None: float32, eager) prepares the backbone in place (channels_last, compile).
    """
    runtime = runtime or plain(device)
    model.eval()
    runtime.prepare(model.backbone)
    normals = splits["train_normal"][0]
    from ahl.pseudo.draem import anomaly_sources

    sources = anomaly_sources(Path(config.dtd_dir) if config.dtd_dir else None) if "draem" in config.families else []
    maker = PseudoAnomalyMaker(list(normals), sources, rotation=config.pseudo_rotation)
    index: dict = {"n_scales": len(normal_mean), "dtype": config.dtype, "splits": {}, "meta": dict(meta or {})}
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pseudo")  # _make_pseudo's worker
    stack = contextlib.ExitStack()
    stack.callback(pool.shutdown, cancel_futures=True)  # an error stops the families not yet begun
    with stack, atomic_dir(out) if group.is_main else contextlib.nullcontext() as tmp, torch.no_grad():
        jobs = _make_pseudo(pool, maker, len(normals), config, seed)

        def extract(name: str, images_of, labels, classes, files) -> None:
            _extract(model, images_of, len(labels), tmp, name, config, runtime, progress and group.is_main, group)
            index["splits"][name] = {"labels": [int(v) for v in labels], "classes": list(classes), "files": list(files)}

        for name, (images, labels, classes, files) in splits.items():
            extract(name, lambda i, images=images: images[i], labels, classes, files)
        n = len(normals)
        for (family, v), made in jobs.items():
            name = f"pseudo_{family}" if config.variants == 1 else f"pseudo_{family}@{v}"
            made = made.result()  # (N, S, S, 3) uint8
            extract(name, lambda i, made=made: made[i], [2] * n, [family] * n, [""] * n)
        if tmp is None:  # not rank 0
            return
        for s, r in enumerate(normal_mean):
            np.save(tmp / f"reference.s{s}.npy", r.float().cpu().numpy())
        write_json(tmp / INDEX, index)
