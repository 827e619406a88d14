"""The decision at a threshold, shared by the lab (``ahl predict``, ``load_run``) and the line (``ahl infer``,
``load_exported``): ``score > threshold``, and ``borderline`` where the score lies within the export's tolerance of
the threshold (a lab/line difference of that size could flip it). numpy only: the line imports it without torch."""

from __future__ import annotations

import math

import numpy as np

from ahl.core.errors import UserError

DECISION = "score > threshold"
# The largest |lab - line| score difference the export promises (tests/test_export.py holds both runtimes to it);
# `ahl export` records max(this, twice the difference it measures) as the export's tolerance. AHL's heads on a
# float16 cache: a 1e-6 difference of a feature can carry it across a float16 rounding step, which moves a score by
# up to ~1e-3 (docs/deployment.md), so their tolerance is that.
TOLERANCE = 2.5e-4
TOLERANCE_FLOAT16 = 1e-3


def tolerance_for(feature_dtype: str | None) -> float:
    """The lab/line tolerance of a model whose heads read features of ``feature_dtype`` (None: a base model)."""
    return TOLERANCE_FLOAT16 if feature_dtype == "float16" else TOLERANCE


def checked_threshold(value, where: str, fix: str) -> float | None:
    """``value`` as a threshold: a finite number or None; anything else is one line naming ``where`` and ``fix``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{where} = {value!r} is not a finite number; {fix}")
    return float(value)


def decide(scores, threshold: float | None) -> np.ndarray | None:
    """``score > threshold`` per image, compared in float64 as calibrate and evaluate compare (a float32 array
    against a Python float would compare in float32); None without a threshold."""
    return None if threshold is None else np.asarray(scores, dtype=np.float64) > threshold


def borderline(scores, threshold: float | None, tolerance: float = TOLERANCE) -> np.ndarray | None:
    """Per image: is its score within ``tolerance`` of the threshold (its decision not firm)? None without one."""
    return None if threshold is None else np.abs(np.asarray(scores, dtype=np.float64) - threshold) <= tolerance
