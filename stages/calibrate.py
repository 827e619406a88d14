"""Stage calibrate: the deployment threshold of the base model and of AHL, chosen on the validation slice (held-out
training normals and spare anomalies, never the test set) -> models/thresholds.json.

Without validation normals (protocol.validation_fraction = 0, the papers' training set) each model's entry is
null and evaluate reports no metrics at a threshold."""

from __future__ import annotations

import logging

import numpy as np
from common import ROOT, Params, run
from compute import stage_runtime

from ahl.core import provenance
from ahl.core.errors import UserError
from ahl.core.io import read_json, write_json
from ahl.data.mvtec import load_images
from ahl.data.protocol import Split
from ahl.evaluation.scorer import Scorer
from ahl.evaluation.threshold import ThresholdConfig, choose, made_from
from ahl.method.cache import INDEX, load_cache

DATA, SPLIT, BASE = "data/mvtec", "data/split.json", "models/base.pt"
CACHE, AHL, OUT = "cache/features", "models/ahl.pt", "models/thresholds.json"
FEATURES = "python stages/features.py"  # what reruns a stale cache
log = logging.getLogger("stage")


def validation_scores(params: Params, split: Split, batch_size: int) -> dict[str, np.ndarray]:
    """Validation-slice scores of the base model (from images) and of AHL (from the cached features), through the
    scorer evaluate and `ahl predict` use (ahl/evaluation/scorer.py)."""
    ahl = ROOT / AHL if (ROOT / AHL).is_file() else None  # None: the base model alone (plain stage runs)
    files = [s.file for s in split.validation]
    scorer = Scorer.load(
        ROOT / BASE, ahl, runtime=stage_runtime(params), split=ROOT / SPLIT, cache=ROOT / CACHE / INDEX if ahl else None
    )
    cache = None
    if ahl is not None:
        cache = load_cache(ROOT / CACHE)
        provenance.check(CACHE, cache.meta.get("inputs"), FEATURES, split=ROOT / SPLIT, base=ROOT / BASE)
        if cache.validation is None or cache.validation.files != files:
            raise UserError(f"{CACHE} holds no features of this split's validation slice; rerun `{FEATURES}`")
    images = load_images(ROOT / DATA / split.classname, files, scorer.size)
    scores = scorer.score_images(images, batch_size, models=("base",))
    if cache is not None:
        scores.update(scorer.score_features(cache.validation, cache.normal_mean, batch_size))
    return scores.final


def main(params: Params) -> None:
    config = params.section("threshold", ThresholdConfig)
    split = Split.from_dict(read_json(ROOT / SPLIT))
    labels = np.array([s.label for s in split.validation])
    out: dict = {"base": None, "ahl": None}
    if not (labels == 0).any():  # protocol.validation_fraction = 0 (the papers' training set): no threshold
        log.warning("no validation normals (protocol.validation_fraction = 0): no thresholds in %s", OUT)
    else:
        scores = validation_scores(params, split, config.batch_size)
        for key, s in scores.items():
            out[key] = choose(config, s[labels == 0], s[labels == 1], f"{key} on {SPLIT}")
            v = out[key]["validation"]
            print(f"{key}: threshold {out[key]['threshold']:.6g} ({config.rule}); validation {v['normal']} normals, "
                  f"{v['anomaly']} anomalies, FPR {v['fpr']}")  # fmt: skip
    out["inputs"] = provenance.inputs(**made_from(ROOT / SPLIT, ROOT / BASE, ROOT / AHL))
    write_json(ROOT / OUT, out)


if __name__ == "__main__":
    run(main, __doc__)
