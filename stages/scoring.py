"""What calibrate and evaluate share: one part of the split (its validation slice or its test set) scored by the
run through the one scorer (ahl/evaluation/scorer.py, as `ahl predict` loads it): the base model from one backbone
pass over the images, AHL from the cached features of the same images."""

from __future__ import annotations

from pathlib import Path

from common import ROOT, Params
from compute import stage_runtime

from ahl.core import provenance
from ahl.core.errors import UserError
from ahl.core.layout import AHL, BASE, CACHE, DATA, SPLIT
from ahl.data.mvtec import load_images
from ahl.data.protocol import Split
from ahl.evaluation.scorer import Scorer, Scores
from ahl.method.cache import INDEX, load_cache

FEATURES = "python stages/features.py"  # what reruns a stale cache


def score_part(params: Params, split: Split, part: str, batch_size: int, thresholds: Path | None = None):
    """(the scorer, its Scores of ``split.<part>`` ("validation" or "test"), the images (N, S, S, 3) uint8).
    Without models/ahl.pt (a plain stage run of the base model alone) only the base model is scored."""
    ahl = ROOT / AHL if (ROOT / AHL).is_file() else None
    files = [s.file for s in getattr(split, part)]
    scorer = Scorer.load(
        ROOT / BASE, ahl, thresholds=thresholds, runtime=stage_runtime(params), split=ROOT / SPLIT,
        cache=ROOT / CACHE / INDEX if ahl else None,
    )  # fmt: skip
    features = cache = None
    if ahl is not None:
        cache = load_cache(ROOT / CACHE)
        provenance.check(CACHE, cache.meta.get("inputs"), FEATURES, split=ROOT / SPLIT, base=ROOT / BASE)
        features = getattr(cache, part)
        if features is None or features.files != files:
            raise UserError(f"{CACHE} holds no features of this split's {part} images; rerun `{FEATURES}`")
    images = load_images(ROOT / DATA / split.classname, files, scorer.size)
    scores: Scores = scorer.score_images(images, batch_size, models=("base",))
    if features is not None:
        scores.update(scorer.score_features(features, cache.normal_mean, batch_size))
    return scorer, scores, images
