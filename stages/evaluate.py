"""Stage evaluate: score the test set with the base model and with AHL -> results/metrics.json (image metrics, and
pixel metrics where masks exist), results/scores.csv, ROC/PR curves and the report's figures (results/evaluation,
DVC plots), results/report.html."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
from common import ROOT, Params, run
from live import live
from PIL import Image
from scoring import DATA, SPLIT, score_part

from ahl.core.io import read_json, write_text
from ahl.core.layout import METRICS, PLOTS, REPORT, SCORES, THRESHOLDS
from ahl.core.spreadsheet import write_csv
from ahl.data.protocol import Split
from ahl.evaluation.image_metrics import EvaluateConfig, compute_metrics
from ahl.evaluation.pixel_metrics import load_masks, pixel_metrics
from ahl.evaluation.report import png_bytes, report_figures, report_html
from ahl.evaluation.threshold import metrics_at_threshold


def main(params: Params) -> None:
    config = params.section("evaluate", EvaluateConfig)
    split = Split.from_dict(read_json(ROOT / SPLIT))
    labels = np.array([s.label for s in split.test])
    classes, seen = [s.cls for s in split.test], [s.seen for s in split.test]
    scorer, run, images = score_part(params, split, "test", config.batch_size, thresholds=ROOT / THRESHOLDS)
    scores, names = run.final, scorer.names
    heat = {key: run.heatmaps(key, images.shape[1:3]) for key in scores}
    masks = load_masks(ROOT / DATA / split.classname, [s.file for s in split.test], labels, images.shape[1])
    metrics = {
        "classname": split.classname,
        "setting": split.setting,
        "n_anomalies": split.config["n_anomalies"],
        "seen_classes": split.seen_classes,
    }
    for key, s in scores.items():
        metrics[key] = {"model": names[key], **compute_metrics(labels, s, classes, seen)}
        metrics[key].update(pixel_metrics(heat[key], masks) if masks is not None else {})
        if scorer.thresholds.get(key):  # null: no validation slice (protocol.validation_fraction = 0)
            metrics[key]["at_threshold"] = metrics_at_threshold(labels, s, scorer.thresholds[key])
    table = pd.DataFrame({"file": [s.file for s in split.test], "label": labels, "class": classes, "seen": seen})
    for key, s in scores.items():
        table[f"score_{key}"] = s
    with live(ROOT / PLOTS, metrics=ROOT / METRICS) as logger:
        logger.summary.update(metrics)
        for key, s in scores.items():
            s = s.astype(np.float64)  # dvclive writes float32 thresholds as JSON only as float64
            logger.log_sklearn_plot("roc", labels, s, name=f"roc/{key}", drop_intermediate=True)
            logger.log_sklearn_plot("precision_recall", labels, s, name=f"pr/{key}", drop_intermediate=True)
        test = {"labels": labels, "seen": seen, "files": table["file"], "images": images, "classname": split.classname}
        figures = report_figures(test, scores, heat, metrics, names, masks)
        pngs = {name: png_bytes(figure) for name, figure in figures.items()}  # (closes the figures)
        for name, png in pngs.items():  # rendered once: for the report and for `dvc plots`
            logger.log_image(f"{name}.png", Image.open(io.BytesIO(png)))
        write_csv(ROOT / SCORES, table, float_format="%.6g")  # names from folders: spreadsheet-safe
    write_text(ROOT / REPORT, report_html(f"{split.classname}: evaluation", metrics, names, pngs))
    for key in scores:
        m = metrics[key]
        print(
            f"{split.classname} {key} ({m['model']}): AUC-ROC {m['auc_roc']:.4f}  AUC-PR {m['auc_pr']:.4f}  "
            f"seen {m.get('seen_auc_roc', float('nan')):.4f}  unseen {m.get('unseen_auc_roc', float('nan')):.4f}"
            + (f"  pixel AUC-ROC {m['pixel_auc_roc']:.4f}  AUPRO {m['pixel_aupro']:.4f}" if "pixel_aupro" in m else "")
        )


if __name__ == "__main__":
    run(main, __doc__)
