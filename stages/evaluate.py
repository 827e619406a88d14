"""Stage evaluate: score the test set -> results/metrics.json, results/scores.csv, ROC/PR curves (JSON + PNG)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from common import ROOT, run, section

from ahl.data.mvtec import load_images
from ahl.data.protocol import Split
from ahl.errors import UserError
from ahl.evaluate import compute_metrics, curves, score_images
from ahl.io import atomic_path, read_json, write_json
from ahl.features import load_cache
from ahl.model import load_checkpoint, load_heads
from ahl.runtime import resolve_device

DATA, SPLIT, BASE = "data/mvtec", "data/split.json", "models/base.pt"
CACHE, AHL = "cache/features", "models/ahl.pt"
METRICS, SCORES, PLOTS = "results/metrics.json", "results/scores.csv", "results/plots"


def plot_png(path, curve_sets: dict[str, dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(9, 4))
    for name, c in curve_sets.items():
        roc_ax.plot([p["fpr"] for p in c["roc"]], [p["tpr"] for p in c["roc"]], label=name)
        pr_ax.plot([p["recall"] for p in c["pr"]], [p["precision"] for p in c["pr"]], label=name)
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC {title}")
    pr_ax.set(xlabel="recall", ylabel="precision", title=f"PR {title}")
    for ax in (roc_ax, pr_ax):
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def main(params: dict) -> None:
    cfg = section(params, "evaluate")
    device = resolve_device(str(params.get("device", "auto")))
    split = Split.from_dict(read_json(ROOT / SPLIT))
    labels = np.array([s.label for s in split.test])
    classes = [s.cls for s in split.test]
    seen = [s.seen for s in split.test]

    ckpt = load_checkpoint(ROOT / BASE, device)
    images = load_images(ROOT / DATA / split.classname, [s.file for s in split.test], ckpt.meta["backbone"]["image_size"])
    batch_size = int(cfg.get("batch_size", 32))
    scores = {"base": score_images(ckpt.model, images, ckpt.reference, device, batch_size)[0]}
    names = {"base": ckpt.meta["model"]}
    if (ROOT / AHL).is_file():
        from ahl.cdl import score

        cache = load_cache(ROOT / CACHE)
        if cache.test.files != [s.file for s in split.test]:
            raise UserError(f"{CACHE} was built for another split; rerun the features stage (dvc repro)")
        heads, meta = load_heads(ROOT / AHL)
        scores["ahl"] = score(cache.test, heads.to(device), cache.reference, device, batch_size)
        names["ahl"] = f"AHL({meta['model']})"

    metrics = {
        "classname": split.classname,
        "setting": split.setting,
        "n_anomalies": split.config["n_anomalies"],
        "seen_classes": split.seen_classes,
    }
    curve_sets = {}
    for key, s in scores.items():
        metrics[key] = {"model": names[key], **compute_metrics(labels, s, classes, seen)}
        curve_sets[key] = curves(labels, s, int(cfg.get("curve_points", 200)))
        write_json(ROOT / PLOTS / "roc" / f"{key}.json", curve_sets[key]["roc"])
        write_json(ROOT / PLOTS / "pr" / f"{key}.json", curve_sets[key]["pr"])
    plot_png(ROOT / PLOTS / "curves.png", curve_sets, split.classname)

    table = pd.DataFrame({"file": [s.file for s in split.test], "label": labels, "class": classes, "seen": seen})
    for key, s in scores.items():
        table[f"score_{key}"] = s
    with atomic_path(ROOT / SCORES) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    write_json(ROOT / METRICS, metrics)
    for key in scores:
        m = metrics[key]
        print(
            f"{split.classname} {key} ({m['model']}): AUC-ROC {m['auc_roc']:.4f}  AUC-PR {m['auc_pr']:.4f}  "
            f"seen {m.get('seen_auc_roc', float('nan')):.4f}  unseen {m.get('unseen_auc_roc', float('nan')):.4f}"
        )


if __name__ == "__main__":
    run(main, __doc__)
