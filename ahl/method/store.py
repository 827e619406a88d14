"""AHL's training features on the device: normals, seen anomalies and the pseudo-anomaly splits in use."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from ahl.method.cache import FeatureCache
from ahl.method.hadg import BatchIndex


class FeatureStore:
    """The training features as tensors on ``device``, gathered into batches by row index.

    Kept in the cache's dtype (float16 halves the memory) and in channels_last order (N, H, W, C) rows, so that
    a batch is gathered with one row copy (index_select) and converted to float32 with one contiguous cast; the
    heads run on channels_last features (their conv weights are channels_last too). The gather's cost against
    (N, C, H, W) storage: docs/performance.md, "AHL at the papers' shapes" (benchmarks/bench_ahl.py).
    """

    def __init__(self, cache: FeatureCache, pseudo_splits: Iterable[str], device: torch.device):
        self.device = device
        sets = {"normal": cache.train_normal, "seen": cache.train_anomaly}
        sets.update({name: cache.pseudo[name] for name in sorted(set(pseudo_splits))})
        self.sets = {name: [_to_tensor(x, device) for x in fs.scales] for name, fs in sets.items()}
        # (C, H, W) stored channels-last (strides of (H, W, C)) so that the composite head's (normal_mean - x) is
        # channels_last like x
        self.normal_mean = [
            torch.from_numpy(np.array(r, dtype=np.float32)).to(device).permute(1, 2, 0).contiguous().permute(2, 0, 1)
            for r in cache.normal_mean
        ]

    def rows(self, split: str, index: np.ndarray) -> list[torch.Tensor]:
        """float32 (len(index), C, H_s, W_s) per scale."""
        idx = torch.as_tensor(np.asarray(index, dtype=np.int64)).to(self.device)
        # (N, H, W, C) rows -> (B, H, W, C) float32 -> the (B, C, H, W) view with channels_last strides
        return [x.index_select(0, idx).to(torch.float32).permute(0, 3, 1, 2) for x in self.sets[split]]

    def batch(self, batch: BatchIndex, split_of: dict[str, str]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(features per scale (B, C, H_s, W_s) float32, labels (B,)) in the order normals, seen, pseudo."""
        parts = [self.rows("normal", batch.normals)]
        if len(batch.anomalies):
            parts.append(self.rows("seen", batch.anomalies))
        if len(batch.pseudo):
            parts.append(self.rows(split_of[batch.family], batch.pseudo))
        features = [torch.cat([p[s] for p in parts]) if len(parts) > 1 else parts[0][s] for s in range(len(parts[0]))]
        return features, torch.as_tensor(batch.labels).to(self.device)


def _to_tensor(x: np.ndarray, device: torch.device) -> torch.Tensor:
    """(N, C, H, W) array (e.g. a read-only memory map) -> (N, H, W, C) contiguous tensor on ``device``. Always
    a copy: where the moved axes are already contiguous (1 x 1 maps) a view of a read-only map would be one, and
    torch warns about every non-writable array it wraps."""
    return torch.from_numpy(np.array(np.moveaxis(x, 1, -1), order="C")).to(device)
