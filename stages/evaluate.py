"""Stage evaluate: score the test set with the base model and with AHL -> results/metrics.json (image metrics, and
pixel metrics where masks exist), results/scores.csv, ROC/PR curves and the report's figures (results/evaluation,
DVC plots), results/report.html."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
from PIL import Image
from common import ROOT, Params, run
from live import live

from ahl.data.mvtec import load_images
from ahl.data.protocol import Split
from ahl import provenance
from ahl.features import INDEX, load_cache
from ahl.io import atomic_path, read_json, write_text
from ahl.localize import feature_heatmaps, image_heatmaps
from ahl.metrics import EvaluateConfig, compute_metrics
from ahl.model import load_checkpoint, load_heads
from ahl.pixel_metrics import load_masks, pixel_metrics
from ahl.report_html import png_bytes, report_figures, report_html
from ahl.scoring import score_features, score_images
from ahl.threshold import load_thresholds, made_from, metrics_at_threshold

DATA, SPLIT, BASE = "data/mvtec", "data/split.json", "models/base.pt"
CACHE, AHL = "cache/features", "models/ahl.pt"
METRICS, SCORES, PLOTS = "results/metrics.json", "results/scores.csv", "results/evaluation"
REPORT = "results/report.html"
THRESHOLDS = "models/thresholds.json"  # the deployment thresholds (stage calibrate), chosen without the test set
FEATURES, TRAIN_AHL = "python stages/features.py", "python stages/train_ahl.py"  # what reruns a stale input


def score_test_set(params: Params, split: Split, batch_size: int):
    """Test-set scores of the base model (from images) and of AHL (from the cached features), their names, their
    heatmaps (ahl/localize.py, as `ahl predict` draws them) and the test images."""
    runtime = params.runtime()
    device = runtime.device
    ckpt = load_checkpoint(ROOT / BASE, device)
    provenance.check(BASE, ckpt.meta.get("inputs"), "python stages/train_base.py", split=ROOT / SPLIT)
    files = [s.file for s in split.test]
    images = load_images(ROOT / DATA / split.classname, files, ckpt.meta["backbone"]["image_size"])
    scores = {"base": score_images(ckpt.model, images, ckpt.reference, device, batch_size, runtime)[0]}
    names = {"base": ckpt.meta["model"]}
    heat = {"base": image_heatmaps(ckpt.model, images, ckpt.reference, device, batch_size)}
    if (ROOT / AHL).is_file():
        cache = load_cache(ROOT / CACHE)
        provenance.check(CACHE, cache.meta.get("inputs"), FEATURES, split=ROOT / SPLIT, base=ROOT / BASE)
        heads, meta = load_heads(ROOT / AHL)
        provenance.check(AHL, meta.get("inputs"), TRAIN_AHL, base=ROOT / BASE, cache=ROOT / CACHE / INDEX)
        scores["ahl"] = score_features(cache.test, heads.to(device), cache.reference, device, batch_size, runtime)
        names["ahl"] = f"AHL({meta['model']})"
        heat["ahl"] = feature_heatmaps(heads, cache.test.scales, cache.reference, images.shape[1], device, batch_size)
    return scores, names, heat, images


def main(params: Params) -> None:
    config = params.section("evaluate", EvaluateConfig)
    split = Split.from_dict(read_json(ROOT / SPLIT))
    labels = np.array([s.label for s in split.test])
    classes, seen = [s.cls for s in split.test], [s.seen for s in split.test]
    scores, names, heat, images = score_test_set(params, split, config.batch_size)
    masks = load_masks(ROOT / DATA / split.classname, [s.file for s in split.test], labels, images.shape[1])
    metrics = {
        "classname": split.classname,
        "setting": split.setting,
        "n_anomalies": split.config["n_anomalies"],
        "seen_classes": split.seen_classes,
    }
    inputs = made_from(ROOT / SPLIT, ROOT / BASE, ROOT / AHL)
    thresholds = load_thresholds(ROOT / THRESHOLDS, "python stages/calibrate.py", **inputs)
    for key, s in scores.items():
        metrics[key] = {"model": names[key], **compute_metrics(labels, s, classes, seen)}
        metrics[key].update(pixel_metrics(heat[key], masks) if masks is not None else {})
        if thresholds.get(key):  # null: no validation slice (protocol.validation_fraction = 0)
            metrics[key]["at_threshold"] = metrics_at_threshold(labels, s, thresholds[key])
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
        with atomic_path(ROOT / SCORES) as tmp:
            table.to_csv(tmp, index=False, float_format="%.6g")
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
