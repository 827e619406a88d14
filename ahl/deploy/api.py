"""The Python API: a trained run (``load_run``, with the training stack) and its export (``load_exported``, numpy
and a runtime only) behind one interface, so that code written in the lab runs unchanged on the line.

    from ahl import load_run, load_exported
    run = load_run(".")                      # models/base.pt, models/ahl.pt, models/thresholds.json
    out = run.score(images)                  # uint8 (N, S, S, 3) RGB at run.size, or image files
    out["score"], out["head_scores"], out["anomaly_map"], run.decide(out["score"]), run.borderline(out["score"])
    run.export("deploy", format="openvino")  # -> deploy/model.xml, model.bin, metadata.json
    line = load_exported("deploy")           # the same .score, .decide, .threshold, .size, .model, .head_names
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ahl.core.errors import UserError
from ahl.core.layout import AHL, BASE, THRESHOLDS
from ahl.core.runtime import Runtime
from ahl.deploy.export import export
from ahl.deploy.images import as_images
from ahl.evaluation.decision import borderline, decide, tolerance_for
from ahl.evaluation.scorer import Scorer


@dataclass
class Run:
    """A trained run and the model that decides (``model``: ahl when trained, else base)."""

    scorer: Scorer
    model: str
    root: Path

    @property
    def size(self) -> int:
        return self.scorer.size

    @property
    def head_names(self) -> tuple[str, ...]:
        return tuple(self._heads().head_names)

    @property
    def threshold(self) -> float | None:
        return self.scorer.threshold(self.model)

    def _heads(self):
        return self.scorer.base.model.heads if self.model == "base" else self.scorer.ahl

    @property
    def tolerance(self) -> float:
        """The lab/line score difference an export of this run allows for (ahl.evaluation.decision)."""
        return tolerance_for(self.scorer.feature_dtype_of(self.model))

    def decide(self, scores: np.ndarray) -> np.ndarray | None:
        """``score > threshold`` per image, as calibrate chose it; None when the run has no threshold."""
        return decide(scores, self.threshold)

    def borderline(self, scores: np.ndarray) -> np.ndarray | None:
        """Per image: its score lies within ``tolerance`` of the threshold (None without one)."""
        return borderline(scores, self.threshold, self.tolerance)

    def score(self, images: np.ndarray | Sequence[str | Path], batch_size: int = 32) -> dict[str, np.ndarray]:
        """{score (N,), head_scores (N, heads), anomaly_map (N, S, S)} of the deciding model, for RGB images
        (N, S, S, 3) (uint8, or floats in [0, 1]) or image files; the scorer's one backbone pass per image."""
        scores = self.scorer.score_images(as_images(images, self.size), batch_size, [self.model])
        return {
            "score": scores.final[self.model], "head_scores": scores.heads[self.model],
            "anomaly_map": scores.heatmaps(self.model, (self.size, self.size)),
        }  # fmt: skip

    def export(self, out: str | Path = "deploy", format: str = "onnx") -> Path:  # noqa: A002 (as `ahl export`)
        """Write the deciding model as ``out/model.onnx`` (format onnx) or ``out/model.xml`` + ``model.bin``
        (openvino), with ``out/metadata.json``; returns the model file."""
        files = {"base": self.root / BASE} | ({"ahl": self.root / AHL} if self.scorer.ahl is not None else {})
        if self.scorer.thresholds:
            files["thresholds"] = self.root / THRESHOLDS
        return export(self.scorer, out, fmt=format, model=self.model, checkpoints=files)


def load_run(path: str | Path = ".", model: str = "auto", runtime: Runtime | None = None) -> Run:
    """The trained run of the project at ``path``: models/base.pt, models/ahl.pt (``model``: auto = when it exists,
    ahl = required, base = not loaded) and models/thresholds.json when it exists, each file checked against what
    it was made from."""
    if model not in ("auto", "ahl", "base"):
        raise UserError(f"model must be auto, ahl or base, got {model!r}")
    root = Path(path)
    ahl = root / AHL
    if model == "ahl" and not ahl.is_file():
        raise UserError(f"{ahl} is missing; train AHL first (`dvc repro train_ahl`) or use model='base'")
    use_ahl = model == "ahl" or (model == "auto" and ahl.is_file())
    chosen = root / THRESHOLDS if (root / THRESHOLDS).is_file() else None
    scorer = Scorer.load(root / BASE, ahl if use_ahl else None, thresholds=chosen, runtime=runtime)
    return Run(scorer, scorer.models[-1], root)
