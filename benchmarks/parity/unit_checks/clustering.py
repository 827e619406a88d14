"""HADG's k-means against the official AHL dataloader's clustering, on a real feature cache."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from benchmarks.parity import ours
from benchmarks.parity.shims import Patches, kmeans_n_init_10
from benchmarks.parity.unit_checks.helpers import Row, ahl_modules


def kmeans(ahl_root: Path, cache_dir: Path | None, seed: int = 0) -> list[Row]:
    """The official get_cluster (AHL dataloaders/dataloader.py) and ours on the cache's normals: adjusted Rand index."""
    if cache_dir is None:
        return [Row("k-means: official flattened scale-0 map vs ours", None, "info",
                    "skipped: pass --cache DIR (a features stage output, e.g. from run.py --keep)")]  # fmt: skip
    from sklearn.metrics import adjusted_rand_score

    cache = ours.load_cache(cache_dir)
    x0 = np.asarray(cache.train_normal.scales[0], dtype=np.float32)
    with Patches() as p:
        _main, _dra, _plain, _aux, _layers, _utlis, dl = ahl_modules(ahl_root, p)
        fake = SimpleNamespace(args=SimpleNamespace(auxiliary=False, extract=True, cluster_num=3, ramdn_seed=seed))
        train_set = [{"label": 0, "image": f} for f in x0]
        official, _ = dl.initDataloader.get_cluster(fake, train_set, [])
        kmeans_n_init_10(p, dl)  # the same call under scikit-learn's default of its time (a version shim)
        official10, _ = dl.initDataloader.get_cluster(fake, train_set, [])
    rows = []
    for off, note, how, what in (
        (official, "", "flattened", "flattened scale-0 map, the default"),
        (official10, ", KMeans n_init=10 as in scikit-learn < 1.4", "flattened", "flattened scale-0 map, the default"),
        (official10, ", KMeans n_init=10 as in scikit-learn < 1.4", "pooled", "pooled, both scales"),
    ):
        a = np.zeros(len(x0), int)
        for k, members in enumerate(off):
            a[members] = k
        vectors = ours.cluster_features(cache.train_normal.scales, how)
        mine = ours.cluster_normals(vectors, ours.HADGConfig(min_cluster_size=1, features=how), seed)
        b = np.zeros(len(x0), int)
        for k, members in enumerate(mine):
            b[members] = k
        rows.append(Row(f"k-means clusters: official (flattened scale-0 map{note}) vs ours ({what})",
                        adjusted_rand_score(a, b), "info",
                        f"{cache_dir}: {len(x0)} normals, map {tuple(x0.shape[1:])}; official sizes "
                        f"{sorted(len(c) for c in off)}, ours {sorted(len(c) for c in mine)}; diff = adjusted "
                        "Rand index (1 = the same partition)"))  # fmt: skip
    return rows
