"""A decision threshold for deployment, chosen on the validation slice (never on the test set), and the test metrics
at it.

The decision is ``score > threshold``. Rule ``fpr``: with N validation normals, at most k = floor(target_fpr * N)
of them may score above the threshold, so the threshold is the (k+1)-th highest normal score; normals tied with it
are not flagged, so ties can only lower the false-positive rate. Rule ``f1``: the threshold that maximises F1 on
the validation normals and the spare anomalies (held out of training and testing); ties go to the highest one.
models/thresholds.json holds ``{"base": {...}, "ahl": {...}, "runtime": {...}, "inputs": {...}}`` (``runtime``: what
the validation images were scored under, when there were any), each model's
entry with ``threshold``, ``rule``, ``target_fpr``, ``decision``, ``validation`` (counts and the rates achieved
there) and ``firmness`` (whether it sits on the highest normal's score, the gaps to the nearest scores).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ahl.core import provenance
from ahl.core.config import at_least, run_bounds
from ahl.core.errors import UserError
from ahl.core.io import read_json
from ahl.evaluation.decision import DECISION

RULES = ("fpr", "f1")


@dataclass(frozen=True)
class ThresholdConfig:
    rule: str  # fpr (a target false-positive rate on validation normals) | f1 (F1-max on validation)
    target_fpr: float  # rule fpr: the largest fraction of validation normals flagged
    batch_size: int  # scoring batch size (does not change results)

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise UserError(f"params.yaml: threshold.rule = {self.rule!r} must be one of {', '.join(RULES)}")
        if not 0.0 <= self.target_fpr < 1.0:
            raise UserError(f"params.yaml: threshold.target_fpr must be in [0, 1), got {self.target_fpr}")
        at_least("threshold.batch_size", self.batch_size, 1)
        run_bounds("threshold", self, epochs=(), steps=())


def fpr_threshold(normal: np.ndarray, target_fpr: float) -> float:
    """The (k+1)-th highest normal score, k = floor(target_fpr * N): at most k normals score above it."""
    s = np.sort(np.asarray(normal, dtype=np.float64))[::-1]
    k = math.floor(target_fpr * len(s) + 1e-9)
    return float(s[k])


def f1_threshold(normal: np.ndarray, anomaly: np.ndarray) -> float:
    """The threshold of highest F1 (decision score > threshold) on ``normal`` and ``anomaly``; ties: the highest."""
    scores = np.concatenate([normal, anomaly]).astype(np.float64)
    labels = np.r_[np.zeros(len(normal)), np.ones(len(anomaly))].astype(bool)
    candidates = np.r_[np.nextafter(scores.min(), -np.inf), np.unique(scores)]
    flagged = scores[None, :] > candidates[:, None]
    tp = (flagged & labels).sum(1)
    fp = (flagged & ~labels).sum(1)
    f1 = 2 * tp / np.maximum(2 * tp + fp + (len(anomaly) - tp), 1)
    return float(candidates[np.flatnonzero(f1 == f1.max())[-1]])


def at_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """Counts, precision, recall, F1 and FPR of ``score > threshold`` (None where a rate has no denominator)."""
    labels = np.asarray(labels) != 0
    predicted = np.asarray(scores, dtype=np.float64) > threshold
    tp, fp = int((predicted & labels).sum()), int((predicted & ~labels).sum())
    fn, tn = int(labels.sum()) - tp, int((~labels).sum()) - fp

    def rate(num: int, den: int) -> float | None:
        return num / den if den else None

    precision, recall = rate(tp, tp + fp), rate(tp, tp + fn)
    f1 = 2 * precision * recall / (precision + recall) if precision and recall else (0.0 if tp + fn else None)
    return {"precision": precision, "recall": recall, "f1": f1, "fpr": rate(fp, fp + tn),
            "tp": tp, "fp": fp, "tn": tn, "fn": fn}  # fmt: skip


def choose(config: ThresholdConfig, normal: np.ndarray, anomaly: np.ndarray, what: str) -> dict:
    """One model's entry of thresholds.json from its validation scores (``what`` names the model in errors)."""
    if len(normal) == 0:
        raise UserError(
            f"{what}: no validation normals to choose a threshold on; set protocol.validation_fraction > 0 "
            "(params.yaml; e.g. 0.1)"
        )
    if config.rule == "fpr":
        threshold = fpr_threshold(normal, config.target_fpr)
    elif len(anomaly) == 0:
        raise UserError(
            f"{what}: threshold.rule=f1 needs anomalies that are neither seen in training nor tested, and this "
            "split has none (there are max(M, test_set_m) - M of them: protocol.test_set_m > protocol.n_anomalies, "
            "e.g. M=1 with test_set_m=10); use threshold.rule=fpr or raise protocol.test_set_m"
        )
    else:
        threshold = f1_threshold(normal, anomaly)
    labels = np.r_[np.zeros(len(normal)), np.ones(len(anomaly))]
    validation = at_threshold(labels, np.r_[normal, anomaly], threshold)
    validation.update(normal=len(normal), anomaly=len(anomaly))
    return {"threshold": threshold, "rule": config.rule, "target_fpr": config.target_fpr, "decision": DECISION,
            "validation": validation, "firmness": firmness(config, normal, anomaly, threshold)}  # fmt: skip


def firmness(config: ThresholdConfig, normal: np.ndarray, anomaly: np.ndarray, threshold: float) -> dict:
    """How firm a threshold is: ``on_highest_normal`` when rule fpr allows no normal above it (N * target_fpr
    < 1: the threshold is then the highest validation normal's own score, and any drift of that image's score
    flips its decision), and the gaps to the nearest validation score below and above it (None: none there)."""
    scores = np.r_[normal, anomaly].astype(np.float64)
    below, above = scores[scores < threshold], scores[scores > threshold]
    return {
        "on_highest_normal": config.rule == "fpr" and math.floor(config.target_fpr * len(normal) + 1e-9) == 0,
        "gap_below": float(threshold - below.max()) if len(below) else None,
        "gap_above": float(above.min() - threshold) if len(above) else None,
    }


def made_from(split: Path, base: Path, ahl: Path) -> dict[str, Path]:
    """The files thresholds are made from (calibrate records them, evaluate checks them): the split, the base
    model and AHL's heads when they exist (without them, e.g. a base model trained by a plain
    `python stages/train_base.py`, the thresholds are the base model's only)."""
    return {"split": split, "base": base} | ({"ahl": ahl} if ahl.is_file() else {})


def load_thresholds(path: Path, rerun: str, **inputs: Path) -> dict:
    """models/thresholds.json, refused when it was made from other ``inputs`` (files) than those on disk."""
    if not path.is_file():
        raise UserError(f"{path} is missing; make it with `dvc repro` (or `{rerun}`)")
    thresholds = read_json(path)
    provenance.check(path.name, thresholds.get("inputs"), rerun, **inputs)
    return thresholds


def metrics_at_threshold(labels: np.ndarray, scores: np.ndarray, entry: dict) -> dict:
    """What evaluate reports at a model's threshold: the rule, the threshold and the test-set rates."""
    out = {"rule": entry["rule"], "value": entry["threshold"]}
    out.update(at_threshold(labels, scores, entry["threshold"]))
    return out
