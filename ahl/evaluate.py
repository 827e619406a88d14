"""Scoring and metrics: image AUC-ROC and AUC-PR overall, per anomaly class, and for seen vs unseen classes."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from ahl.backbones import to_input
from ahl.model import AnomalyModel


@torch.no_grad()
def score_images(
    model: AnomalyModel,
    images: np.ndarray,
    reference: Sequence[torch.Tensor] | None,
    device: torch.device,
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """(final scores (N,), per-head scores (N, n_heads)) of uint8 images (N, S, S, 3), model in eval mode."""
    model.eval()
    heads = []
    for start in range(0, len(images), batch_size):
        x = to_input(images[start : start + batch_size], device)
        heads.append(model(x, reference).float().cpu())
    per_head = torch.cat(heads)
    return model.heads.final_score(per_head).numpy(), per_head.numpy()


def auc_roc_pr(labels: np.ndarray, scores: np.ndarray) -> dict[str, float] | None:
    """Image AUC-ROC and AUC-PR (any non-zero label is anomalous); None when only one class is present."""
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
        str(c): float(roc_auc_score(labels[normal | (classes == c)], scores[normal | (classes == c)]))
        for c in sorted(set(classes[labels == 1]))
    }
    out["n_test"] = {"normal": int(normal.sum()), "seen": int((~normal & seen).sum()), "unseen": int((~normal & ~seen).sum())}
    return out


def curves(labels: np.ndarray, scores: np.ndarray, max_points: int = 200) -> dict[str, list[dict]]:
    """ROC and PR curves as lists of points (the JSON that ``dvc plots`` reads), thinned to ``max_points``."""
    fpr, tpr, _ = roc_curve(labels, scores)
    precision, recall, _ = precision_recall_curve(labels, scores)

    def thin(n: int) -> np.ndarray:
        return np.unique(np.linspace(0, n - 1, min(n, max_points)).round().astype(int))

    roc = [{"fpr": float(fpr[i]), "tpr": float(tpr[i])} for i in thin(len(fpr))]
    pr = [{"recall": float(recall[i]), "precision": float(precision[i])} for i in thin(len(recall))]
    return {"roc": roc, "pr": pr}
