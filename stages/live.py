"""Metrics and plots of a stage, written by dvclive into a directory that is published atomically.

dvclive writes files in the formats `dvc metrics` and `dvc plots` read. A stage also runs as a plain script on a
machine without dvc (and so without dvclive): there the same files are written by the few lines of ``_Plain``.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from ahl.core.io import atomic_dir, atomic_path

try:
    from dvclive import Live
except ImportError:  # a machine without dvc
    Live = None


class _Plain:
    """The part of dvclive's Live the stages use, writing the same files (metrics.json, plots/metrics/*.tsv,
    plots/sklearn/*.json, plots/images/*)."""

    def __init__(self, dir: str, **_):
        self.dir, self.summary, self.step, self._series = Path(dir), {}, None, {}

    def log_metric(self, name: str, value: float, plot: bool = True) -> None:
        node = self.summary
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
        if plot:
            self._series.setdefault(name, []).append((self.step or 0, value))

    def next_step(self) -> None:
        self.step = (self.step or 0) + 1

    def log_sklearn_plot(self, kind: str, labels, scores, name: str, drop_intermediate: bool = True) -> None:
        from sklearn.metrics import precision_recall_curve, roc_curve

        if kind == "roc":
            x, y, t = roc_curve(labels, scores, drop_intermediate=drop_intermediate)
            points = [{"fpr": a, "tpr": b, "threshold": c} for a, b, c in zip(x, y, t)]
        else:
            p, r, t = precision_recall_curve(labels, scores, drop_intermediate=drop_intermediate)
            points = [{"precision": a, "recall": b, "threshold": c} for a, b, c in zip(p, r, t)]
        path = self.dir / "plots" / "sklearn" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({kind: [{k: float(v) for k, v in q.items()} for q in points]}, indent=4) + "\n")

    def log_image(self, name: str, image) -> None:  # a PIL image
        path = self.dir / "plots" / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)

    def end(self) -> None:
        for name, rows in self._series.items():
            path = self.dir / "plots" / "metrics" / f"{name}.tsv"
            path.parent.mkdir(parents=True, exist_ok=True)
            leaf = name.split("/")[-1]
            path.write_text(f"step\t{leaf}\n" + "".join(f"{s}\t{v}\n" for s, v in rows))
        if self.step is not None:
            self.summary["step"] = self.step
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "metrics.json").write_text(json.dumps(self.summary, indent=4, cls=_Encoder) + "\n")


class _Encoder(json.JSONEncoder):
    def default(self, o):
        return o.item() if isinstance(o, np.generic) else super().default(o)


@contextlib.contextmanager
def live(out: Path, metrics: Path | None = None) -> Iterator:
    """A dvclive Live (or its plain stand-in) writing into a temporary directory that replaces ``out`` as a
    whole when the block completes, so an interrupted stage leaves the previous output or nothing. With
    ``metrics``, the summary (metrics.json) is moved there instead (`dvc metrics` reads it from git)."""
    with atomic_dir(out) as tmp:
        logger = (Live or _Plain)(dir=str(tmp), dvcyaml=False, save_dvc_exp=False, report=None)
        yield logger
        logger.end()
        if metrics is not None:
            with atomic_path(metrics) as dst:
                os.replace(tmp / "metrics.json", dst)
