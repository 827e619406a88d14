"""AHL's pseudo anomalies of the normal training images, one family at a time (DRAEM, CutPaste, CutMix): what the
feature cache stores next to the real images' features."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ahl.core.errors import UserError

FAMILIES = ("draem", "cutpaste", "cutmix")  # AHL's pseudo-anomaly families


@dataclass
class PseudoAnomalyMaker:
    """Makes pseudo anomalies of the normal training images in each of the AHL families.

    ahl.pseudo.augment and ahl.pseudo.draem (torchvision, which takes seconds to import) are imported by the methods
    that make images, so the stages that only read the cache (train_ahl, calibrate, evaluate) do not pay for them.
    """

    normals: Sequence[np.ndarray]  # N images (H, W, 3) uint8, or an (N, H, W, 3) array
    sources: Sequence[np.ndarray] | None = None  # DRAEM texture pool; None -> anomaly_sources(None)
    rotation: float = 0.0  # CutPaste and CutMix images are rotated by up to this many degrees (nearest)

    def __post_init__(self) -> None:
        if self.sources is None:
            from ahl.pseudo.draem import anomaly_sources

            self.sources = anomaly_sources(None)
        self._stretched: dict[tuple[int, int, int], np.ndarray] = {}

    def _source(self, k: int, height: int, width: int) -> np.ndarray:
        """DRAEM texture k stretched to the image size, as draem() would stretch it: kept when the pool is in
        memory (a few photographs; a PIL resize costs about half of a DRAEM image), read anew from a folder pool."""
        key = (k, height, width)
        if key in self._stretched:
            return self._stretched[key]
        from ahl.pseudo.augment import _as_rgb, _resize

        stretched = _resize(_as_rgb(self.sources[k]), height, width)
        if isinstance(self.sources, list):
            self._stretched[key] = stretched
        return stretched

    def make(self, family: str, index: int, rng: np.random.Generator) -> np.ndarray:
        """Pseudo anomaly of normal ``index`` in ``family`` (one of FAMILIES), as (H, W, 3) uint8."""
        from ahl.pseudo.augment import cutmix, cutpaste, rotate
        from ahl.pseudo.draem import draem

        n = len(self.normals)
        if not 0 <= index < n:
            raise IndexError(f"normal index {index} out of range for {n} normal images")
        image = np.asarray(self.normals[index])
        if family == "cutpaste":
            return rotate(cutpaste(image, rng)[None], self.rotation, "nearest", rng)[0]
        if family == "cutmix":
            if n < 2:
                raise UserError("the cutmix pseudo anomalies need at least 2 normal training images, got 1")
            other = int(rng.integers(n - 1))
            other += other >= index  # uniform over the normals other than `index`
            return rotate(cutmix(image, np.asarray(self.normals[other]), rng)[None], self.rotation, "nearest", rng)[0]
        if family == "draem":
            assert self.sources is not None  # set in __post_init__
            if len(self.sources) == 0:
                raise UserError("the draem pseudo anomalies need at least one anomaly-source image, got none")
            return draem(image, self._source(int(rng.integers(len(self.sources))), *image.shape[:2]), rng)
        raise UserError(f"unknown pseudo-anomaly family {family!r}; choose one of {', '.join(FAMILIES)}")
