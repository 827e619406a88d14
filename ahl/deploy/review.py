"""The review page of `ahl serve` (server-rendered HTML: no script, no build step, nothing fetched from elsewhere).
Every string from a user or a file (image names, class names, messages) goes through ``html.escape``."""

from __future__ import annotations

import time
from html import escape
from pathlib import Path

from ahl.deploy.station import Labels, Record

FILTERS = {"all": "all", "flagged": "flagged", "borderline": "borderline"}
SORTS = {"recent": "most recent first", "score": "highest score first"}
STYLE = """
body{font-family:sans-serif;margin:1.5em;color:#222}header{margin-bottom:1em}
.cards{display:flex;flex-wrap:wrap;gap:1em}.card{border:1px solid #ccc;padding:.5em;width:260px}
.card img{width:256px;height:auto;display:block}.anomaly{border-color:#c00;border-width:3px}
.badge{font-weight:bold}.anomaly .badge{color:#c00}.borderline{background:#fff6d5}
.msg{padding:.5em;border:1px solid #c00;background:#fee;margin:1em 0}.ok{border-color:#080;background:#efe}
pre{background:#f4f4f4;padding:.5em}nav a{margin-right:1em}label{display:block;margin-top:.3em}
"""


def _decision(record: Record) -> str:
    if record.is_anomaly is None:
        return "no threshold"
    return "anomaly" if record.is_anomaly else "normal"


def _label_form(record: Record, labels: Labels, token_required: bool) -> str:
    options = "".join(f'<option value="{escape(c)}">{escape(c)}</option>' for c in ["good", *labels.classes()])
    token = '<label>token <input type="password" name="token" required></label>' if token_required else ""
    return (
        f'<form method="post" action="/review/label"><input type="hidden" name="id" value="{escape(record.id)}">'
        f'<label>label <select name="label">{options}</select></label>'
        '<label>or a new defect class <input type="text" name="new_label" maxlength="64"></label>'
        f'{token}<button type="submit">label</button></form>'
    )


def _card(record: Record, labels: Labels | None, token_required: bool) -> str:
    classes = ["card", "anomaly" if record.is_anomaly else "", "borderline" if record.borderline else ""]
    labelled = f"<div>labelled: <b>{escape(record.label)}</b></div>" if record.label else ""
    form = _label_form(record, labels, token_required) if labels is not None and not record.label else ""
    when = time.strftime("%H:%M:%S", time.localtime(record.time))
    return (
        f'<div class="{" ".join(c for c in classes if c)}" id="r-{escape(record.id)}" data-score="{record.score:.6g}">'
        f'<img src="/v1/heatmaps/{escape(record.id)}.png" alt="heatmap of {escape(record.name)}" loading="lazy">'
        f'<div class="name">{escape(record.name)}</div>'
        f'<div>score <span class="score">{record.score:.4f}</span> '
        f'<span class="badge">{_decision(record)}</span>{" (borderline)" if record.borderline else ""}</div>'
        f"<div>{when}, sha256 {record.sha256[:12]}...</div>{labelled}{form}</div>"
    )


def _retrain(labels: Labels) -> str:
    return (
        "<h2>Retrain on the labels</h2><p>The labelled images are in "
        f"<code>{escape(str(labels.root))}</code> (audit: <code>{escape(str(labels.audit))}</code>). In the project "
        f"that trained this model, with <code>data.local: {escape(str(labels.folder))}</code> and "
        f"<code>classname: {escape(labels.root.name)}</code> in params.yaml:</p>"
        "<pre>dvc repro\ndvc metrics diff</pre>"
    )


def page(
    records: list[Record], *, metadata: dict, threshold: float | None, labels: Labels | None, token_required: bool,
    show: str = "all", sort: str = "recent", message: str = "", ok: bool = False,
) -> str:  # fmt: skip
    """The whole page: the model, the upload form, the recent results (filtered, sorted) and the retrain commands."""
    if show == "flagged":
        records = [r for r in records if r.is_anomaly]
    elif show == "borderline":
        records = [r for r in records if r.borderline]
    records = sorted(records, key=lambda r: -r.score) if sort == "score" else list(reversed(records))
    nav = " ".join(
        f'<a href="/?show={s}&amp;sort={o}">{escape(FILTERS[s])}, {escape(SORTS[o])}</a>' for s in FILTERS for o in SORTS
    )
    note = f'<div class="msg{" ok" if ok else ""}" role="status">{escape(message)}</div>' if message else ""
    cards = "".join(_card(r, labels, token_required) for r in records) or "<p>No images yet: upload one.</p>"
    rule = "no threshold" if threshold is None else f"{metadata.get('decision', 'score > threshold')}, threshold {threshold:.6g}"
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>AHL inspection</title>'
        f"<style>{STYLE}</style></head><body><header><h1>AHL inspection</h1>"
        f"<div>model <b>{escape(str(metadata.get('model_name')))}</b> ({escape(str(metadata.get('classname')))}, "
        f"{escape(rule)})</div></header>{note}"
        '<form method="post" action="/review/upload" enctype="multipart/form-data">'
        '<input type="file" name="image" accept="image/*" multiple required> <button type="submit">score</button>'
        f"</form><nav>{nav}</nav><h2>Recent ({len(records)})</h2><div class=\"cards\">{cards}</div>"
        f"{_retrain(labels) if labels is not None else ''}</body></html>"
    )


def shown_path(path: Path, labels: Labels) -> str:
    """A written label's path as the page shows it (relative to the labels folder)."""
    return str(path.relative_to(labels.folder))
