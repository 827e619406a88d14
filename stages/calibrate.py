"""Stage calibrate: the deployment threshold of the base model and of AHL, chosen on the validation slice (held-out
training normals and spare anomalies, never the test set) -> models/thresholds.json.

Without validation normals (protocol.validation_fraction = 0, the papers' training set) each model's entry is
null and evaluate reports no metrics at a threshold."""

from __future__ import annotations

import logging

import numpy as np
from common import ROOT, Params, run
from scoring import AHL, BASE, SPLIT, score_part

from ahl.core import provenance
from ahl.core.io import read_json, write_json
from ahl.core.layout import THRESHOLDS as OUT
from ahl.data.protocol import Split
from ahl.evaluation.threshold import ThresholdConfig, choose, made_from

log = logging.getLogger("stage")


def main(params: Params) -> None:
    config = params.section("threshold", ThresholdConfig)
    split = Split.from_dict(read_json(ROOT / SPLIT))
    labels = np.array([s.label for s in split.validation])
    out: dict = {"base": None, "ahl": None}
    if not (labels == 0).any():  # protocol.validation_fraction = 0 (the papers' training set): no threshold
        log.warning("no validation normals (protocol.validation_fraction = 0): no thresholds in %s", OUT)
    else:
        scorer, scored, _ = score_part(params, split, "validation", config.batch_size)
        out["runtime"] = scorer.runtime.describe()
        for key, s in scored.final.items():
            out[key] = choose(config, s[labels == 0], s[labels == 1], f"{key} on {SPLIT}")
            v, firm = out[key]["validation"], out[key]["firmness"]
            print(f"{key}: threshold {out[key]['threshold']:.6g} ({config.rule}); validation {v['normal']} normals, "
                  f"{v['anomaly']} anomalies, FPR {v['fpr']}")  # fmt: skip
            if firm["on_highest_normal"]:
                log.warning(
                    "%s: %d validation normals x threshold.target_fpr %g < 1, so the threshold is the highest "
                    "normal's own score (gaps to the nearest scores: %s below, %s above): a drift of that image's "
                    "score flips its decision; more validation normals (protocol.validation_fraction) make it firmer",
                    key, v["normal"], config.target_fpr, firm["gap_below"], firm["gap_above"],
                )  # fmt: skip
    out["inputs"] = provenance.inputs(**made_from(ROOT / SPLIT, ROOT / BASE, ROOT / AHL))
    write_json(ROOT / OUT, out)


if __name__ == "__main__":
    run(main, __doc__)
