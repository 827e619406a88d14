"""AHL's training features on the device: normals, seen anomalies and the pseudo-anomaly splits in use."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from ahl.features import FeatureCache
from ahl.hadg import BatchIndex


class FeatureStore:
    """The training features as tensors on ``device``, gathered into batches by row index.

    Kept in the cache's dtype (float16 halves the memory); a batch is gathered by indexing and converted to
    float32 in channels_last layout (one copy), which the convolutions run faster on (see
    benchmarks/bench_ahl.py; the heads' conv weights are made channels_last too).
    """

    def __init__(self, cache: FeatureCache, pseudo_splits: Iterable[str], device: torch.device):
        self.device = device
        sets = {"normal": cache.train_normal, "seen": cache.train_anomaly}
        sets.update({name: cache.pseudo[name] for name in sorted(set(pseudo_splits))})
        self.sets = {name: [_to_tensor(x, device) for x in fs.scales] for name, fs in sets.items()}
        # (C, H, W) stored channels-last (strides of (H, W, C)) so that the composite head's (reference - x) is
        # channels_last like x
        self.reference = [
            torch.as_tensor(np.asarray(r, dtype=np.float32)).to(device).permute(1, 2, 0).contiguous().permute(2, 0, 1)
            for r in cache.reference
        ]

    def rows(self, split: str, index: np.ndarray) -> list[torch.Tensor]:
        """float32 (len(index), C, H_s, W_s) per scale."""
        idx = torch.as_tensor(np.asarray(index, dtype=np.int64)).to(self.device)
        # x[idx], not index_select: on CPU (torch 2.14) index_select of (300, 512, 14, 14) rows is ~35x slower
        return [x[idx].to(torch.float32, memory_format=torch.channels_last) for x in self.sets[split]]

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
    # np.array copies a (read-only) memory map into memory: torch does not take read-only arrays.
    return torch.from_numpy(np.array(x)).to(device)
