"""Image-level metrics: AUC-ROC and AUC-PR overall, per anomaly class, and for seen vs unseen classes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ahl.core.config import at_least, run_bounds


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int  # scoring batch size (does not change results)

    def __post_init__(self) -> None:
        at_least("evaluate.batch_size", self.batch_size, 1)
        run_bounds("evaluate", self, epochs=(), steps=())


def auc_roc_pr(labels: np.ndarray, scores: np.ndarray) -> dict[str, float] | None:
    """Image AUC-ROC and AUC-PR (any non-zero label is anomalous); None when only one class is present."""
    from sklearn.metrics import average_precision_score, roc_auc_score  # on first use: scipy takes seconds to load

    labels = (np.asarray(labels) != 0).astype(int)
    if labels.min() == labels.max():
        return None
    return {
        "auc_roc": float(roc_auc_score(labels, scores)),
        "auc_pr": float(average_precision_score(labels, scores)),
    }


def compute_metrics(
    labels: np.ndarray, scores: np.ndarray, classes: Sequence[str], seen: Sequence[bool]
) -> dict:
    """Metrics of one model's test scores. ``classes``: "good" or the anomaly class; ``seen``: class seen?"""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    classes, seen = np.asarray(classes), np.asarray(seen, dtype=bool)
    if not np.isfinite(scores).all():
        raise ValueError("non-finite anomaly scores: training diverged")
    normal = labels == 0
    out: dict = dict(auc_roc_pr(labels, scores) or {})
    for name, part in (("seen", seen), ("unseen", ~seen)):
        keep = normal | ((labels == 1) & part)
        res = auc_roc_pr(labels[keep], scores[keep])
        # No unseen classes (e.g. M covers every class) -> the entry is absent rather than a fake number.
        if res:
            out[f"{name}_auc_roc"] = res["auc_roc"]
            out[f"{name}_auc_pr"] = res["auc_pr"]
    out["per_class_auc_roc"] = {
        str(c): auc_roc_pr(labels[normal | (classes == c)], scores[normal | (classes == c)])["auc_roc"]
        for c in sorted(set(classes[labels == 1]))
    }
    out["n_test"] = {"normal": int(normal.sum()), "seen": int((~normal & seen).sum()), "unseen": int((~normal & ~seen).sum())}
    return out
