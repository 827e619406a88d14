"""Everything the parity harness uses of our library, in one place.

The library's module layout may change; when it does, this is the one file to update. The end-to-end harness
(run.py) does not import the library at all: it runs the stage scripts.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ahl import augment, cdl, hadg  # noqa: E402
from ahl.backbones import build_backbone, multiscale  # noqa: E402
from ahl.cdl import adapt, query_loss  # noqa: E402
from ahl.devnet import DevNetHeads  # noqa: E402
from ahl.dra import DRAHeads  # noqa: E402
from ahl.estimator import GeneralisationEstimator, rewards, weights_from_rewards  # noqa: E402
from ahl.features import PseudoAnomalyMaker, load_cache  # noqa: E402
from ahl.hadg import HADGConfig, cluster_features, cluster_normals, pool_features  # noqa: E402
from ahl.heads import NORMAL, PSEUDO, SEEN  # noqa: E402
from ahl.losses import deviation_loss  # noqa: E402
from ahl.data.mvtec import load_images  # noqa: E402
from ahl.model import AnomalyModel, BackboneConfig, build_model, load_checkpoint  # noqa: E402
from ahl.scoring import forward, score_images  # noqa: E402
from ahl.train import BaseConfig, BatchSampler, reference_features, train_base, train_step  # noqa: E402


def backbone_body(name: str, pretrained: str):
    """(the backbone's layers without our input normalisation, out_channels): what the official models get."""
    net = build_backbone(name, pretrained, warn=False)
    return net.body, net.out_channels


def patch_size(height: int, width: int, rng):
    """(cut_h, cut_w) of one CutPaste/CutMix patch as our generators draw it."""
    return augment._patch_size(height, width, rng)


def rotate(images, max_degrees: float, rng, interpolation: str = "nearest"):
    """Our base-training rotation of a batch (N, H, W, 3) uint8 (base.rotation_interpolation, default nearest)."""
    return augment.rotate(images, max_degrees, interpolation, rng)


COLOR_JITTER = augment.COLOR_JITTER
cutpaste = augment.cutpaste
cutmix = augment.cutmix

__all__ = [
    "AnomalyModel", "BackboneConfig", "BaseConfig", "BatchSampler", "COLOR_JITTER", "DRAHeads", "DevNetHeads",
    "GeneralisationEstimator", "HADGConfig", "PseudoAnomalyMaker", "NORMAL", "PSEUDO", "SEEN", "adapt", "backbone_body", "build_backbone",
    "build_model", "cdl", "cluster_features", "cluster_normals", "cutmix", "cutpaste", "deviation_loss", "forward", "hadg", "load_cache", "load_checkpoint", "load_images",
    "multiscale", "patch_size", "pool_features", "query_loss", "reference_features", "rewards", "rotate", "score_images", "train_base", "train_step",
    "weights_from_rewards",
]  # fmt: skip
