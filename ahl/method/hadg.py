"""Heterogeneous anomaly distribution generation (HADG, AHL section 1): k-means clusters of the normal training
features, the T = C(C-1) support/query tasks built from them, and the 16/16/16 batches each task is trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ahl.core.errors import UserError
from ahl.models.labels import NORMAL, PSEUDO, SEEN

# A pseudo-anomaly split named "<family>@<k>" in the cache is variant k of <family> (the same generator re-drawn);
# a plain "<family>" is its only variant. Tasks are built over families; variants only matter for
# AHLConfig.redraw_augmentation.
VARIANT_SEP = "@"


@dataclass(frozen=True)
class HADGConfig:
    n_clusters: int = 3  # C of k-means on the normal training features
    min_cluster_size: int = 3  # clusters with fewer members (the paper: <= 2) are dropped
    random_clusters: bool = False  # ablation: random splits of the normals, of the k-means cluster sizes
    # what k-means sees: "flattened" = the scale-0 feature map flattened (C*H*W values, the official code);
    # "pooled" = global-average-pooled features of every scale, concatenated
    features: str = "flattened"

    def __post_init__(self) -> None:
        if self.n_clusters < 2:
            raise UserError(f"ahl.hadg.n_clusters = {self.n_clusters}: AHL needs at least 2 clusters (paper: 3)")
        if self.features not in ("flattened", "pooled"):
            raise UserError(f"params.yaml: ahl.hadg.features = {self.features!r}: expected flattened or pooled")
        if self.min_cluster_size < 1:
            raise UserError(f"ahl.hadg.min_cluster_size = {self.min_cluster_size}: must be >= 1 (paper: 3)")


@dataclass
class Task:
    """One heterogeneous anomaly distribution: a support set to adapt on and a query set to evaluate on.

    Index arrays point into cache.train_normal (normals; also the rows of the pseudo arrays) and
    cache.train_anomaly (seen anomalies).
    """

    support_normals: np.ndarray  # members of cluster ``support_cluster``
    query_normals: np.ndarray  # members of cluster ``query_cluster``
    support_anomalies: np.ndarray  # one half of the seen anomalies ...
    query_anomalies: np.ndarray  # ... and the other half (both = the single one when M = 1)
    support_family: str  # pseudo-anomaly generator of the support set ...
    query_family: str  # ... and a different one for the query set
    support_cluster: int
    query_cluster: int


def cluster_features(scales: Sequence[np.ndarray], how: str) -> np.ndarray:
    """The vectors k-means clusters: ``flattened`` scale-0 maps (N, C*H*W) or ``pooled`` ones (N, sum C)."""
    if how == "pooled":
        return pool_features(scales)
    x = scales[0]
    return np.asarray(x, dtype=np.float64).reshape(len(x), -1)


def pool_features(scales: Sequence[np.ndarray], chunk: int = 256) -> np.ndarray:
    """Global-average-pooled features concatenated over scales: per scale (N, C, H, W) -> (N, sum C), float64."""
    n = len(scales[0])
    out = np.empty((n, sum(x.shape[1] for x in scales)), dtype=np.float64)
    for start in range(0, n, chunk):  # chunked: the arrays may be memory-mapped float16
        stop = min(start + chunk, n)
        out[start:stop] = np.concatenate(
            [np.asarray(x[start:stop], dtype=np.float32).mean(axis=(2, 3)) for x in scales], axis=1
        )
    return out


def cluster_normals(train_normal_features: np.ndarray, config: HADGConfig, seed: int) -> list[np.ndarray]:
    """Member indices (sorted) of each k-means cluster of the normals (N, D) that has >= min_cluster_size members.

    The official code kept the first n files of the list for a cluster of n members; we keep the members.
    """
    x = np.asarray(train_normal_features, dtype=np.float64)
    if len(x) < config.n_clusters:
        raise UserError(
            f"HADG: {len(x)} train normals cannot form ahl.hadg.n_clusters = {config.n_clusters} clusters; "
            "lower n_clusters"
        )
    from sklearn.cluster import KMeans  # on first use: scipy takes seconds to load

    assignment = KMeans(n_clusters=config.n_clusters, n_init=10, random_state=seed).fit_predict(x)
    clusters = [np.flatnonzero(assignment == c) for c in range(config.n_clusters)]
    if config.random_clusters:
        # Same sizes, random members: tests whether the clustering itself matters.
        perm = np.random.default_rng(seed).permutation(len(x))
        bounds = np.cumsum([0] + [len(c) for c in clusters])
        clusters = [np.sort(perm[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    kept = [c for c in clusters if len(c) >= config.min_cluster_size]
    if len(kept) < 2:
        sizes = sorted((len(c) for c in clusters), reverse=True)
        raise UserError(
            f"HADG: only {len(kept)} of the {config.n_clusters} k-means clusters of the {len(x)} train normals "
            f"(sizes {sizes}) have >= ahl.hadg.min_cluster_size = {config.min_cluster_size} members; AHL needs "
            "2 or more: change ahl.hadg.n_clusters or lower min_cluster_size"
        )
    return kept


def family_variants(pseudo_names: Sequence[str]) -> dict[str, list[str]]:
    """Pseudo-anomaly families and their variants: {"cutpaste": ["cutpaste@0", "cutpaste@1"], "draem": ["draem"]}."""
    out: dict[str, list[str]] = {}
    for name in sorted(pseudo_names):
        out.setdefault(name.split(VARIANT_SEP, 1)[0], []).append(name)
    return out


def make_tasks(
    clusters: Sequence[np.ndarray], n_seen: int, families: Sequence[str], rng: np.random.Generator
) -> list[Task]:
    """The T = C(C-1) tasks: ordered pairs (i, j) of distinct clusters, support normals from i, query from j.

    Each task splits the M seen anomalies into two disjoint random halves (support gets ceil(M/2)); with M = 1 both
    sets get the one. Support and query get two different pseudo-anomaly families: the F(F-1) ordered pairs of
    distinct families are shuffled and dealt to the tasks in turn, so that tasks differ as much as possible.
    """
    families = sorted(families)
    if len(families) < 2:
        raise UserError(
            f"AHL needs >= 2 pseudo-anomaly families so that support and query differ; the feature cache has "
            f"{len(families)} ({families}): build the features with two or more pseudo-anomaly generators"
        )
    if len(clusters) < 2:
        raise UserError(f"AHL needs >= 2 normal clusters, got {len(clusters)}: change ahl.hadg.n_clusters")
    family_pairs = [(a, b) for a in families for b in families if a != b]
    family_pairs = [family_pairs[k] for k in rng.permutation(len(family_pairs))]
    tasks = []
    for i in range(len(clusters)):
        for j in range(len(clusters)):
            if i == j:
                continue
            if n_seen == 1:
                support_anomalies = query_anomalies = np.array([0], dtype=np.int64)
            else:
                perm = rng.permutation(n_seen)
                half = (n_seen + 1) // 2
                support_anomalies, query_anomalies = np.sort(perm[:half]), np.sort(perm[half:])
            support_family, query_family = family_pairs[len(tasks) % len(family_pairs)]
            tasks.append(
                Task(
                    support_normals=np.asarray(clusters[i], dtype=np.int64),
                    query_normals=np.asarray(clusters[j], dtype=np.int64),
                    support_anomalies=np.asarray(support_anomalies, dtype=np.int64),
                    query_anomalies=np.asarray(query_anomalies, dtype=np.int64),
                    support_family=support_family,
                    query_family=query_family,
                    support_cluster=i,
                    query_cluster=j,
                )
            )
    return tasks


@dataclass
class BatchIndex:
    """Which rows make a batch: normals and pseudo rows index train_normal / the family's array (same rows)."""

    normals: np.ndarray
    anomalies: np.ndarray
    pseudo: np.ndarray
    family: str | None

    @property
    def labels(self) -> np.ndarray:
        return np.concatenate(
            [
                np.full(len(self.normals), NORMAL),
                np.full(len(self.anomalies), SEEN),
                np.full(len(self.pseudo), PSEUDO),
            ]
        ).astype(np.int64)


def _draw(pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n rows of pool, without replacement when the pool is large enough (then with)."""
    return rng.choice(pool, size=n, replace=len(pool) < n)


def check_batch(batch_size: int, n_normals: int, n_seen: int) -> None:
    """A task's batch is drawn from the training normals, their pseudo versions and the seen anomalies: one larger
    than all of them only repeats rows (and costs their memory), so it is refused in one line."""
    n = 2 * n_normals + n_seen
    if batch_size > n:
        raise UserError(
            f"params.yaml: ahl.batch_size = {batch_size} is more than the {n} rows a task can draw ({n_normals} "
            f"normals, as many pseudo anomalies, {n_seen} seen anomalies); set it to at most {n} (the paper: 48)"
        )


def draw_batch(
    normals_idx: np.ndarray,
    anomalies_idx: np.ndarray,
    family: str | None,
    batch_size: int,
    rng: np.random.Generator,
) -> BatchIndex:
    """Rows of one batch: batch_size/3 each of normals, seen anomalies and pseudo anomalies (1/2 each if one kind
    is absent; the remainder goes to normals).

    The pseudo anomalies are the pseudo versions of the task's own normals: 2/3 of the batch's normal slots are
    drawn from the task's normals (distinct when possible) and half of them are replaced by their pseudo row.
    """
    has_seen, has_pseudo = len(anomalies_idx) > 0, family is not None
    kinds = 1 + has_seen + has_pseudo
    share = batch_size // kinds
    n_seen = share if has_seen else 0
    n_pseudo = share if has_pseudo else 0
    n_normal = batch_size - n_seen - n_pseudo
    slots = _draw(np.asarray(normals_idx), n_normal + n_pseudo, rng)
    return BatchIndex(
        normals=slots[:n_normal],
        anomalies=_draw(np.asarray(anomalies_idx), n_seen, rng) if has_seen else np.zeros(0, np.int64),
        pseudo=slots[n_normal:],
        family=family if has_pseudo else None,
    )


__all__ = [
    "BatchIndex",
    "HADGConfig",
    "Task",
    "check_batch",
    "cluster_normals",
    "draw_batch",
    "family_variants",
    "make_tasks",
    "cluster_features",
    "pool_features",
]
