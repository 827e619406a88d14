"""The visual report evaluate writes: figures (ROC/PR, score histograms, per-class AUC, worst-ranked images with
their heatmaps) and a static results/report.html holding them inline (base64 PNGs: no CDN, opens offline).

Figures are matplotlib (Agg, no display); the stage also saves each as a PNG declared as a DVC plot.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence

import numpy as np

from ahl.evaluation.overlay import overlay

N_WORST = 8  # images per row of the worst-ranked figure


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves_figure(labels: np.ndarray, scores: dict[str, np.ndarray], title: str):
    """ROC and PR of every model side by side."""
    from sklearn.metrics import PrecisionRecallDisplay, RocCurveDisplay

    fig, (roc_ax, pr_ax) = _pyplot().subplots(1, 2, figsize=(9, 4))
    for name, s in scores.items():
        RocCurveDisplay.from_predictions(labels, s, name=name, ax=roc_ax)
        PrecisionRecallDisplay.from_predictions(labels, s, name=name, ax=pr_ax)
    roc_ax.set_title(f"ROC {title}")
    pr_ax.set_title(f"PR {title}")
    fig.tight_layout()
    return fig


def histogram_figure(labels: np.ndarray, seen: np.ndarray, scores: dict[str, np.ndarray]):
    """Score histograms of normals, seen-class and unseen-class anomalies, one panel per model."""
    fig, axes = _pyplot().subplots(1, len(scores), figsize=(4.5 * len(scores), 3.5), squeeze=False)
    groups = {"normal": labels == 0, "seen anomalies": (labels == 1) & seen, "unseen anomalies": (labels == 1) & ~seen}
    for ax, (name, s) in zip(axes[0], scores.items()):
        bins = np.histogram_bin_edges(s, bins=20)
        for group, keep in groups.items():
            if keep.any():
                ax.hist(s[keep], bins=bins, alpha=0.5, label=f"{group} ({keep.sum()})")
        ax.set_title(name)
        ax.set_xlabel("anomaly score")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def per_class_figure(metrics: dict, names: dict[str, str], seen_classes: Sequence[str]):
    """AUC-ROC of each anomaly class (normals vs that class), models side by side; seen classes marked."""
    classes = sorted({c for key in names for c in metrics[key]["per_class_auc_roc"]})
    fig, ax = _pyplot().subplots(figsize=(max(4.0, 1.2 * len(classes) + 1.5), 3.5))
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(classes))
    for k, (key, name) in enumerate(names.items()):
        values = [metrics[key]["per_class_auc_roc"].get(c, np.nan) for c in classes]
        ax.bar(x + (k - (len(names) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(x, [f"{c}\n(seen)" if c in seen_classes else c for c in classes], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("AUC-ROC")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def worst_figure(images: np.ndarray, heat: np.ndarray, scores: np.ndarray, labels: np.ndarray, files, masks, name):
    """The N_WORST highest-scoring normals (top row) and lowest-scoring anomalies (bottom row) with their heatmaps
    (each on its own colour scale) and, where masks exist, the defect's outline."""
    normals = [i for i in np.argsort(-scores, kind="stable") if labels[i] == 0][:N_WORST]
    anomalies = [i for i in np.argsort(scores, kind="stable") if labels[i] == 1][:N_WORST]
    fig, axes = _pyplot().subplots(2, N_WORST, figsize=(1.9 * N_WORST, 4.4), squeeze=False)
    for row, picked, what in ((0, normals, "normal"), (1, anomalies, "anomaly")):
        for col in range(N_WORST):
            ax = axes[row][col]
            ax.axis("off")
            if col < len(picked):
                i = picked[col]
                ax.imshow(overlay(images[i], heat[i]))
                if masks is not None and masks[i].any():
                    ax.contour(masks[i], levels=[0.5], colors="white", linewidths=0.8)
                ax.set_title(f"{files[i]}\n{what} {scores[i]:.3g}", fontsize=6)
    fig.suptitle(f"{name}: highest-scoring normals (top), lowest-scoring anomalies (bottom)", fontsize=9)
    fig.tight_layout()
    return fig


def png_bytes(figure) -> bytes:
    """The figure as PNG bytes; the figure is closed (pyplot keeps every open figure in memory)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    _pyplot().close(figure)
    return buffer.getvalue()


def _metrics_table(metrics: dict, names: dict[str, str]) -> str:
    keys = sorted({k for key in names for k, v in metrics[key].items() if isinstance(v, (int, float))})
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names.values())
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td>"
        + "".join(f"<td>{metrics[key][k]:.4f}</td>" if k in metrics[key] else "<td></td>" for key in names)
        + "</tr>"
        for k in keys
    )
    return f"<table><tr><th>metric</th>{head}</tr>{rows}</table>"


def report_html(title: str, metrics: dict, names: dict[str, str], figures: dict[str, bytes]) -> str:
    """A static page: the headline metrics, every figure inline (data: URIs), the full metrics.json at the end."""
    images = "".join(
        f'<h2>{html.escape(name)}</h2><img alt="{html.escape(name)}" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        for name, png in figures.items()
    )
    style = "body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;text-align:right}img{max-width:100%}"
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{_metrics_table(metrics, names)}"
        f"{images}<h2>metrics.json</h2><pre>{html.escape(json.dumps(metrics, indent=2))}</pre></body></html>\n"
    )


def report_figures(test: dict, scores: dict[str, np.ndarray], heat: dict[str, np.ndarray], metrics: dict,
                   names: dict[str, str], masks) -> dict:  # fmt: skip
    """Every figure of the report by file stem. ``test``: labels, seen, files, images (N, S, S, 3), classname."""
    labels, seen = np.asarray(test["labels"]), np.asarray(test["seen"], bool)
    shown = {names[k]: s for k, s in scores.items()}
    figures = {
        "curves": curves_figure(labels, shown, test["classname"]),
        "histograms": histogram_figure(labels, seen, shown),
        "per_class_auc": per_class_figure(metrics, names, metrics.get("seen_classes", [])),
    }
    for key, s in scores.items():
        figures[f"worst_{key}"] = worst_figure(test["images"], heat[key], s, labels, test["files"], masks, names[key])
    return figures
