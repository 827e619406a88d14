"""The decision at a threshold, shared by the lab (``ahl predict``, ``load_run``) and the line (``ahl infer``,
``load_exported``): ``score > threshold``, and ``borderline`` where the score lies within the export's tolerance of
the threshold (a lab/line difference of that size could flip it). numpy only: the line imports it without torch."""

from __future__ import annotations

import math

import numpy as np

from ahl.core.errors import UserError

DECISION = "score > threshold"
# The largest |lab - line| score difference the export promises (tests/test_export.py holds both runtimes to it);
# `ahl export` records max(this, twice the difference it measures) as the export's tolerance.
TOLERANCE = 2.5e-4


def checked_threshold(value, where: str, fix: str) -> float | None:
    """``value`` as a threshold: a finite number or None; anything else is one line naming ``where`` and ``fix``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{where} = {value!r} is not a finite number; {fix}")
    return float(value)


def decide(scores, threshold: float | None) -> np.ndarray | None:
    """``score > threshold`` per image; None without a threshold."""
    return None if threshold is None else np.asarray(scores) > threshold


def borderline(scores, threshold: float | None, tolerance: float = TOLERANCE) -> np.ndarray | None:
    """Per image: is its score within ``tolerance`` of the threshold (its decision not firm)? None without one."""
    return None if threshold is None else np.abs(np.asarray(scores, dtype=np.float64) - threshold) <= tolerance
