"""Everything the parity harness uses of our library, in one place.

The library's module layout may change; when it does, this is the one file to update. The end-to-end harness
(run.py) does not import the library at all: it runs the stage scripts.
"""

from __future__ import annotations

from ahl.data.mvtec import load_images  # noqa: E402
from ahl.method import cdl, hadg  # noqa: E402
from ahl.method.cache import load_cache  # noqa: E402
from ahl.method.cdl import adapt, query_loss  # noqa: E402
from ahl.method.estimator import GeneralisationEstimator, rewards, weights_from_rewards  # noqa: E402
from ahl.core.runtime import plain  # noqa: E402
from ahl.evaluation.scorer import Scorer  # noqa: E402
from ahl.method.forward import forward  # noqa: E402
from ahl.method.hadg import HADGConfig, cluster_features, cluster_normals, pool_features  # noqa: E402
from ahl.models.backbones import build_backbone, multiscale  # noqa: E402
from ahl.models.base import AnomalyModel, BackboneConfig, Checkpoint, build_model, load_checkpoint  # noqa: E402
from ahl.models.devnet import DevNetHeads  # noqa: E402
from ahl.models.dra import DRAHeads  # noqa: E402
from ahl.models.labels import NORMAL, PSEUDO, SEEN  # noqa: E402
from ahl.models.losses import deviation_loss  # noqa: E402
from ahl.models.train_base import BaseConfig, BatchSampler, normal_mean_of, train_base, train_step  # noqa: E402
from ahl.pseudo import augment  # noqa: E402
from ahl.pseudo.maker import PseudoAnomalyMaker  # noqa: E402


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


def score_images(model, images, normal_mean, batch_size: int):
    """Final scores (N,) of uint8 images (N, S, S, 3) under a base model compared with ``normal_mean`` (its
    reference features), through our one scorer, float32 on the CPU."""
    scorer = Scorer(Checkpoint(model, normal_mean, {}), runtime=plain("cpu"))
    return scorer.score_images(images, batch_size).final["base"]


COLOR_JITTER = augment.COLOR_JITTER
cutpaste = augment.cutpaste
cutmix = augment.cutmix

__all__ = [
    "AnomalyModel", "BackboneConfig", "BaseConfig", "BatchSampler", "COLOR_JITTER", "DRAHeads", "DevNetHeads",
    "GeneralisationEstimator", "HADGConfig", "PseudoAnomalyMaker", "NORMAL", "PSEUDO", "SEEN", "adapt", "backbone_body", "build_backbone",
    "build_model", "cdl", "cluster_features", "cluster_normals", "cutmix", "cutpaste", "deviation_loss", "forward", "hadg", "load_cache", "load_checkpoint", "load_images",
    "multiscale", "patch_size", "pool_features", "query_loss", "normal_mean_of", "rewards", "rotate", "score_images", "train_base", "train_step",
    "weights_from_rewards",
]  # fmt: skip
