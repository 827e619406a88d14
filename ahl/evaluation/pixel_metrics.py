"""Pixel-level metrics where ground-truth masks exist: pixel AUC-ROC and AUPRO, MVTec AD's per-region overlap.

AUPRO (Bergmann et al., MVTec AD, IJCV 2021): for every threshold on the anomaly maps, the false-positive rate
over all defect-free pixels of the test set, and the per-region overlap, the mean over every connected defect
region (8-connected, over all images) of the fraction of its pixels above the threshold. The area under PRO(FPR)
from FPR 0 to 0.3, divided by 0.3. Computed exactly (one sort of all pixels, ties as one step) as the MVTec AD
evaluation code does; anomalib's version interpolates per-region ROC curves on a grid and needs torchmetrics.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.measure import label
from sklearn.metrics import roc_auc_score

from ahl.core.errors import UserError

log = logging.getLogger(__name__)
FPR_LIMIT = 0.3  # MVTec AD integrates the PRO curve up to 30 % false-positive rate


def mask_file(root: Path, file: str) -> Path:
    """The MVTec mask of a test image: test/<defect>/<stem>.<ext> -> ground_truth/<defect>/<stem>_mask.png."""
    path = Path(file)
    return Path(root) / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"


def load_masks(root: Path, files: Sequence[str], labels: Sequence[int], size: int) -> np.ndarray | None:
    """Binary masks (N, size, size) of the test images (normals: all zero; resized with nearest neighbours to the
    model's input size, where the heatmaps are). None when an anomalous image has no mask (then no pixel metrics)."""
    masks = np.zeros((len(files), size, size), dtype=bool)
    missing = [mask_file(root, f) for f, y in zip(files, labels) if y and not mask_file(root, f).is_file()]
    if missing:
        log.info("no pixel metrics: %d of %d anomalies have no mask (e.g. %s)", len(missing), sum(labels), missing[0])
        return None
    for i, (f, y) in enumerate(zip(files, labels)):
        if y:
            try:
                with Image.open(mask_file(root, f)) as im:
                    mask = im.convert("L").resize((size, size), Image.Resampling.NEAREST)
            except OSError as exc:
                raise UserError(f"cannot read mask {mask_file(root, f)}: {exc}; replace it in your raw data") from None
            masks[i] = np.asarray(mask) > 0
    return masks


def pro_curve(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every distinct threshold, from the highest down, starting at (0, 0). maps, masks: (N, H, W)."""
    maps, masks = np.asarray(maps, np.float64), np.asarray(masks, bool)
    fp_step = (~masks).astype(np.float64)  # each defect-free pixel adds 1 / (their number) to the FPR
    pro_step = np.zeros(maps.shape, np.float64)  # each region pixel adds 1 / (region size * number of regions)
    n_regions = 0
    for i, mask in enumerate(masks):
        regions, n = label(mask, connectivity=2, return_num=True)
        n_regions += n
        for k in range(1, n + 1):
            region = regions == k
            pro_step[i][region] = 1.0 / region.sum()
    n_ok = fp_step.sum()
    if n_regions == 0 or n_ok == 0:
        raise ValueError("the PRO curve needs at least one defect region and one defect-free pixel")
    order = np.argsort(-maps.ravel(), kind="stable")
    scores = maps.ravel()[order]
    fpr = np.cumsum(fp_step.ravel()[order]) / n_ok
    pro = np.cumsum(pro_step.ravel()[order]) / n_regions
    last_of_tie = np.append(np.diff(scores) != 0, True)  # pixels of equal score pass the threshold together
    fpr = np.concatenate([[0.0], np.clip(fpr[last_of_tie], 0, 1)])
    pro = np.concatenate([[0.0], np.clip(pro[last_of_tie], 0, 1)])
    return fpr, pro


def aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = FPR_LIMIT) -> float:
    """Area under the PRO curve up to ``fpr_limit`` (linear between its points), normalised to [0, 1]."""
    fpr, pro = pro_curve(maps, masks)
    keep = fpr <= fpr_limit
    x, y = fpr[keep], pro[keep]
    if x[-1] < fpr_limit and keep.sum() < len(fpr):  # the segment that crosses the limit, cut at the limit
        j = keep.sum()
        y_at = pro[j - 1] + (pro[j] - pro[j - 1]) * (fpr_limit - fpr[j - 1]) / (fpr[j] - fpr[j - 1])
        x, y = np.append(x, fpr_limit), np.append(y, y_at)
    return float(np.trapezoid(y, x) / fpr_limit)


def pixel_metrics(maps: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """Pixel AUC-ROC over every pixel of the test set and AUPRO (FPR <= 0.3); {} when no pixel is a defect."""
    masks = np.asarray(masks, bool)
    if not masks.any() or masks.all():
        return {}
    if not np.isfinite(maps).all():
        raise ValueError("non-finite heatmaps: training diverged")
    return {
        "pixel_auc_roc": float(roc_auc_score(masks.ravel(), np.asarray(maps, np.float64).ravel())),
        "pixel_aupro": aupro(maps, masks),
    }
