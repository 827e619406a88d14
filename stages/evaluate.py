"""Stage evaluate: score the test set with the base model and with AHL -> results/metrics.json, results/scores.csv,
ROC/PR curves and a PNG of them (results/evaluation, DVC plots)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from common import ROOT, Params, run
from live import live

from ahl.data.mvtec import load_images
from ahl.data.protocol import Split
from ahl import provenance
from ahl.features import INDEX, load_cache
from ahl.io import atomic_path, read_json
from ahl.metrics import EvaluateConfig, compute_metrics
from ahl.model import load_checkpoint, load_heads
from ahl.scoring import score_features, score_images

DATA, SPLIT, BASE = "data/mvtec", "data/split.json", "models/base.pt"
CACHE, AHL = "cache/features", "models/ahl.pt"
METRICS, SCORES, PLOTS = "results/metrics.json", "results/scores.csv", "results/evaluation"
FEATURES, TRAIN_AHL = "python stages/features.py", "python stages/train_ahl.py"  # what reruns a stale input


def curves_figure(labels: np.ndarray, scores: dict[str, np.ndarray], title: str):
    """ROC and PR of every model side by side (a picture for offline viewing; `dvc plots show` needs a CDN)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import PrecisionRecallDisplay, RocCurveDisplay

    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(9, 4))
    for name, s in scores.items():
        RocCurveDisplay.from_predictions(labels, s, name=name, ax=roc_ax)
        PrecisionRecallDisplay.from_predictions(labels, s, name=name, ax=pr_ax)
    roc_ax.set_title(f"ROC {title}")
    pr_ax.set_title(f"PR {title}")
    fig.tight_layout()
    return fig


def score_test_set(params: Params, split: Split, batch_size: int) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Test-set scores of the base model (from images) and of AHL (from the cached features), and their names."""
    runtime = params.runtime()
    device = runtime.device
    ckpt = load_checkpoint(ROOT / BASE, device)
    provenance.check(BASE, ckpt.meta.get("inputs"), "python stages/train_base.py", split=ROOT / SPLIT)
    files = [s.file for s in split.test]
    images = load_images(ROOT / DATA / split.classname, files, ckpt.meta["backbone"]["image_size"])
    scores = {"base": score_images(ckpt.model, images, ckpt.reference, device, batch_size, runtime)[0]}
    names = {"base": ckpt.meta["model"]}
    if (ROOT / AHL).is_file():
        cache = load_cache(ROOT / CACHE)
        provenance.check(CACHE, cache.meta.get("inputs"), FEATURES, split=ROOT / SPLIT, base=ROOT / BASE)
        heads, meta = load_heads(ROOT / AHL)
        provenance.check(AHL, meta.get("inputs"), TRAIN_AHL, base=ROOT / BASE, cache=ROOT / CACHE / INDEX)
        scores["ahl"] = score_features(cache.test, heads.to(device), cache.reference, device, batch_size, runtime)
        names["ahl"] = f"AHL({meta['model']})"
    return scores, names


def main(params: Params) -> None:
    config = params.section("evaluate", EvaluateConfig)
    split = Split.from_dict(read_json(ROOT / SPLIT))
    labels = np.array([s.label for s in split.test])
    classes, seen = [s.cls for s in split.test], [s.seen for s in split.test]
    scores, names = score_test_set(params, split, config.batch_size)
    metrics = {
        "classname": split.classname,
        "setting": split.setting,
        "n_anomalies": split.config["n_anomalies"],
        "seen_classes": split.seen_classes,
    }
    for key, s in scores.items():
        metrics[key] = {"model": names[key], **compute_metrics(labels, s, classes, seen)}
    table = pd.DataFrame({"file": [s.file for s in split.test], "label": labels, "class": classes, "seen": seen})
    for key, s in scores.items():
        table[f"score_{key}"] = s
    with live(ROOT / PLOTS, metrics=ROOT / METRICS) as logger:
        logger.summary.update(metrics)
        for key, s in scores.items():
            s = s.astype(np.float64)  # dvclive writes float32 thresholds as JSON only as float64
            logger.log_sklearn_plot("roc", labels, s, name=f"roc/{key}", drop_intermediate=True)
            logger.log_sklearn_plot("precision_recall", labels, s, name=f"pr/{key}", drop_intermediate=True)
        figure = curves_figure(labels, scores, split.classname)
        logger.log_image("curves.png", figure)
        figure.clf()
        with atomic_path(ROOT / SCORES) as tmp:
            table.to_csv(tmp, index=False, float_format="%.6g")
    for key in scores:
        m = metrics[key]
        print(
            f"{split.classname} {key} ({m['model']}): AUC-ROC {m['auc_roc']:.4f}  AUC-PR {m['auc_pr']:.4f}  "
            f"seen {m.get('seen_auc_roc', float('nan')):.4f}  unseen {m.get('unseen_auc_roc', float('nan')):.4f}"
        )


if __name__ == "__main__":
    run(main, __doc__)
