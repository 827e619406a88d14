"""The one way a trained run scores: ``Scorer`` holds models/base.pt, models/ahl.pt when present, the thresholds and
the runtime, loaded once, and scores images in one backbone pass or cached features in none.

calibrate, evaluate, ``ahl predict`` and the Python API all score through it, so under one runtime (float32 or
bfloat16 autocast, channels_last or not) a test image gets the same score, head scores and heatmap from each of them.
The backbone runs once per image and scale; each model's heads then run through ``score_heads``
(ahl/method/forward.py), which the export and train_ahl use too:

- the base model's heads run on the backbone's features of the images, under the runtime's autocast;
- AHL's heads run on the same features rounded to the feature cache's dtype (as the features stage stores them),
  or on the cached features themselves, under the same autocast;
- each model's heads run twice per batch: once for the per-head scores, once more for the spatial heads' maps of
  the full-size scale (``patch_maps``).

Each file it reads is checked against the files it was made from (``ahl.core.provenance``): a base model against
the split, AHL's heads against the base model (and the feature cache), the thresholds against both.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ahl.core import provenance
from ahl.core.errors import UserError
from ahl.core.layout import AHL, BASE, THRESHOLDS
from ahl.core.runtime import Runtime, plain
from ahl.evaluation.decision import checked_threshold
from ahl.evaluation.localize import upsample
from ahl.evaluation.threshold import load_thresholds
from ahl.method.cache import FeatureSet
from ahl.method.forward import score_heads
from ahl.models.backbones import to_input
from ahl.models.base import Checkpoint, load_checkpoint, load_heads
from ahl.models.heads import ScoringHeads

log = logging.getLogger(__name__)

TRAIN_BASE, TRAIN_AHL, CALIBRATE = (f"python stages/{s}.py" for s in ("train_base", "train_ahl", "calibrate"))


@dataclass
class Scores:
    """Scores of N images under each model ("base", "ahl"): the final score (N,), every head's score (N, n_heads)
    and every spatial head's map of the full-size scale (N, h, w), at feature resolution."""

    final: dict[str, np.ndarray] = field(default_factory=dict)
    heads: dict[str, np.ndarray] = field(default_factory=dict)
    maps: dict[str, list[np.ndarray]] = field(default_factory=dict)
    head_names: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def columns(self) -> dict[str, np.ndarray]:
        """``score_<model>`` then ``<model>_<head>`` for every model: the columns of predictions.csv."""
        out = {f"score_{k}": v for k, v in self.final.items()}
        for key, per_head in self.heads.items():
            out.update({f"{key}_{name}": per_head[:, j] for j, name in enumerate(self.head_names[key])})
        return out

    def heatmaps(self, key: str, size: tuple[int, int], batch_size: int = 64) -> np.ndarray:
        """Model ``key``'s heatmaps (N, H, W) float32 at ``size``: each head's map upsampled bilinearly, summed."""
        n = len(self.final[key])
        out = [
            upsample([torch.from_numpy(m[i : i + batch_size]) for m in self.maps[key]], size).numpy()
            for i in range(0, n, batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, *size), np.float32)

    def update(self, other: Scores) -> Scores:
        """These scores with ``other``'s models added (the same images)."""
        for part in ("final", "heads", "maps", "head_names"):
            getattr(self, part).update(getattr(other, part))
        return self


def _concat(parts: list[Scores]) -> Scores:
    if not parts:
        return Scores()
    first = parts[0]
    return Scores(
        {k: np.concatenate([p.final[k] for p in parts]) for k in first.final},
        {k: np.concatenate([p.heads[k] for p in parts]) for k in first.heads},
        {k: [np.concatenate([p.maps[k][j] for p in parts]) for j in range(len(v))] for k, v in first.maps.items()},
        dict(first.head_names),
    )  # fmt: skip


@dataclass
class Scorer:
    """A trained run: the base model (backbone + heads), AHL's heads when trained, the thresholds chosen by
    calibrate (empty before it ran), and the runtime they compute under."""

    base: Checkpoint
    ahl: ScoringHeads | None = None
    ahl_meta: dict = field(default_factory=dict)
    thresholds: dict = field(default_factory=dict)
    runtime: Runtime = field(default_factory=lambda: plain("cpu"))

    def __post_init__(self) -> None:
        self.base.model.eval()
        self.runtime.prepare(self.base.model.backbone)
        if self.ahl is not None:
            self.ahl.to(self.runtime.device).eval()

    @classmethod
    def load(
        cls,
        base: str | Path = BASE,
        ahl: str | Path | None = None,
        *,
        thresholds: str | Path | None = None,
        runtime: Runtime | None = None,
        split: str | Path | None = None,
        cache: str | Path | None = None,
    ) -> Scorer:
        """Load a run, each file checked against what it was made from: ``base`` against ``split``, ``ahl``
        against ``base`` (and ``cache``, the feature cache's index), ``thresholds`` against all of them."""
        runtime = runtime or plain("cpu")
        ckpt = load_checkpoint(base, runtime.device)
        if split is not None:
            provenance.check(_shown(base), ckpt.meta.get("inputs"), TRAIN_BASE, split=split)
        heads, meta = None, {}
        if ahl is not None:
            heads, meta = load_heads(ahl)
            extra = {"cache": cache} if cache else {}
            provenance.check(_shown(ahl), meta.get("inputs"), TRAIN_AHL, base=base, **extra)
            if "feature_dtype" not in meta:
                log.warning("%s does not record its feature dtype (an older run): assuming float16", ahl)
        chosen = {}
        if thresholds is not None:
            made = {"split": split, "base": base, "ahl": ahl}  # what calibrate recorded (ahl: when it was trained)
            chosen = load_thresholds(Path(thresholds), CALIBRATE, **{k: v for k, v in made.items() if v is not None})
        return cls(ckpt, heads, meta, chosen, runtime)

    @property
    def models(self) -> tuple[str, ...]:
        return ("base", "ahl") if self.ahl is not None else ("base",)

    @property
    def names(self) -> dict[str, str]:
        """Each model's name in reports: the base model's (dra, devnet) and AHL(...) of it."""
        base = self.base.meta["model"]
        return {"base": base} | ({"ahl": f"AHL({self.ahl_meta.get('model', base)})"} if self.ahl is not None else {})

    @property
    def size(self) -> int:
        """The image size the run was trained at (images are scored at it)."""
        return self.base.meta["backbone"]["image_size"]

    @property
    def feature_dtype(self) -> str:
        """The feature cache's dtype, which AHL's heads saw in training."""
        return self.ahl_meta.get("feature_dtype", "float16")

    def threshold(self, model: str) -> float | None:
        """Model ``model``'s decision threshold (score > threshold), None when none was chosen."""
        entry = self.thresholds.get(model)
        if entry is None:
            return None
        value = entry.get("threshold") if isinstance(entry, dict) else "(no entry)"
        return checked_threshold(value, f"thresholds: {model}.threshold", f"rerun `{CALIBRATE}`")

    def columns(self) -> list[str]:
        """The names of ``Scores.columns()`` for this run: each model's score, then each model's heads."""
        return [f"score_{k}" for k in self.models] + [
            f"{k}_{name}" for k in self.models for name in self._heads(k).head_names
        ]

    def feature_dtype_of(self, model: str) -> str | None:
        """The dtype ``model``'s heads see their features rounded to: the feature cache's for AHL (it trained on
        the cache), none for the base model (it trained on the backbone's float32 features)."""
        return self.feature_dtype if model == "ahl" else None

    def _heads(self, model: str) -> ScoringHeads:
        return self.base.model.heads if model == "base" else self.ahl

    def _score(self, model: str, features: list[torch.Tensor], normal_mean, out: Scores) -> None:
        """Model ``model``'s heads on one batch of features into ``out``: ``score_heads`` (ahl/method/forward.py),
        the one scoring the export and train_ahl use too, under the runtime's autocast; AHL's heads on features
        rounded to the feature cache's dtype."""
        heads = self._heads(model)
        scored = score_heads(heads, features, normal_mean, feature_dtype=self.feature_dtype_of(model), autocast=self.runtime.autocast)
        out.final[model] = scored.final.cpu().numpy()
        out.heads[model] = scored.per_head.cpu().numpy()
        out.maps[model] = [m.cpu().numpy() for m in scored.maps]
        out.head_names[model] = tuple(heads.head_names)

    @torch.no_grad()
    def score_images(self, images: np.ndarray, batch_size: int, models: Sequence[str] | None = None) -> Scores:
        """Scores of uint8 images (N, S, S, 3) at the run's size under ``models`` (default: all), the backbone run
        once per image and scale."""
        models = tuple(models or self.models)
        parts = []
        for start in range(0, len(images), batch_size):
            x = self.runtime.input(to_input(images[start : start + batch_size], self.runtime.device))
            with self.runtime.autocast():
                features = self.base.model.features(x)
            out = Scores()
            for model in models:
                self._score(model, features, self.base.normal_mean, out)
            parts.append(out)
        return _concat(parts)

    @torch.no_grad()
    def score_features(self, features: FeatureSet, normal_mean: Sequence[np.ndarray], batch_size: int) -> Scores:
        """AHL's scores of cached features (no backbone): ``normal_mean`` is the cache's mean normal feature."""
        if self.ahl is None:
            raise UserError("this run has no AHL heads (models/ahl.pt) to score cached features with")
        device = self.runtime.device
        mean = [torch.from_numpy(np.array(m, dtype=np.float32)).to(device) for m in normal_mean]
        parts = []
        for batch in features.batches(batch_size, device):
            out = Scores()
            self._score("ahl", batch, mean, out)
            parts.append(out)
        return _concat(parts)


def _shown(path: str | Path) -> str:
    """``path`` as errors name it: relative to the working directory when it lies below it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
