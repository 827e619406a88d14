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
from ahl.data.protocol import Split
from ahl.evaluation.threshold import ThresholdConfig, choose, made_from

OUT = "models/thresholds.json"
log = logging.getLogger("stage")


def main(params: Params) -> None:
    config = params.section("threshold", ThresholdConfig)
    split = Split.from_dict(read_json(ROOT / SPLIT))
    labels = np.array([s.label for s in split.validation])
    out: dict = {"base": None, "ahl": None}
    if not (labels == 0).any():  # protocol.validation_fraction = 0 (the papers' training set): no threshold
        log.warning("no validation normals (protocol.validation_fraction = 0): no thresholds in %s", OUT)
    else:
        scores = score_part(params, split, "validation", config.batch_size)[1].final
        for key, s in scores.items():
            out[key] = choose(config, s[labels == 0], s[labels == 1], f"{key} on {SPLIT}")
            v = out[key]["validation"]
            print(f"{key}: threshold {out[key]['threshold']:.6g} ({config.rule}); validation {v['normal']} normals, "
                  f"{v['anomaly']} anomalies, FPR {v['fpr']}")  # fmt: skip
    out["inputs"] = provenance.inputs(**made_from(ROOT / SPLIT, ROOT / BASE, ROOT / AHL))
    write_json(ROOT / OUT, out)


if __name__ == "__main__":
    run(main, __doc__)
