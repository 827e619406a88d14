"""Stage calibrate: the deployment threshold of the base model and of AHL, chosen on the validation slice (held-out
training normals and spare anomalies, never the test set) -> models/thresholds.json.

Without validation normals (protocol.validation_fraction = 0, the papers' training set) each model's entry is
null and evaluate reports no metrics at a threshold."""

from __future__ import annotations

import logging

import numpy as np
from common import ROOT, Params, run

from ahl import provenance
from ahl.data.mvtec import load_images
from ahl.data.protocol import Split
from ahl.errors import UserError
from ahl.features import INDEX, load_cache
from ahl.io import read_json, write_json
from ahl.model import load_checkpoint, load_heads
from ahl.scoring import score_features, score_images
from ahl.threshold import ThresholdConfig, choose, made_from

DATA, SPLIT, BASE = "data/mvtec", "data/split.json", "models/base.pt"
CACHE, AHL, OUT = "cache/features", "models/ahl.pt", "models/thresholds.json"
FEATURES, TRAIN_AHL = "python stages/features.py", "python stages/train_ahl.py"  # what reruns a stale input
log = logging.getLogger("stage")


def validation_scores(params: Params, split: Split, batch_size: int) -> dict[str, np.ndarray]:
    """Validation-slice scores of the base model (from images) and of AHL (from the cached features), as
    evaluate scores the test set."""
    runtime = params.runtime()
    device = runtime.device
    ckpt = load_checkpoint(ROOT / BASE, device)
    provenance.check(BASE, ckpt.meta.get("inputs"), "python stages/train_base.py", split=ROOT / SPLIT)
    files = [s.file for s in split.validation]
    images = load_images(ROOT / DATA / split.classname, files, ckpt.meta["backbone"]["image_size"])
    scores = {"base": score_images(ckpt.model, images, ckpt.reference, device, batch_size, runtime)[0]}
    if not (ROOT / AHL).is_file():  # the base model alone (plain `python stages/...` runs without AHL's stages)
        return scores
    cache = load_cache(ROOT / CACHE)
    provenance.check(CACHE, cache.meta.get("inputs"), FEATURES, split=ROOT / SPLIT, base=ROOT / BASE)
    heads, meta = load_heads(ROOT / AHL)
    provenance.check(AHL, meta.get("inputs"), TRAIN_AHL, base=ROOT / BASE, cache=ROOT / CACHE / INDEX)
    if cache.validation is None or cache.validation.files != files:
        raise UserError(f"{CACHE} holds no features of this split's validation slice; rerun `{FEATURES}`")
    scores["ahl"] = score_features(cache.validation, heads.to(device), cache.reference, device, batch_size, runtime)
    return scores


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
