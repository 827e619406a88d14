"""The heads AHL starts from: the base model's (``ahl.init: base``), the official code's geometry carrying them, or a
fresh initialisation (``ahl.init: random``)."""

from __future__ import annotations

from ahl.core.errors import UserError
from ahl.core.runtime import seeded
from ahl.models.base import build_heads
from ahl.models.heads import ScoringHeads


def initial_heads(base_heads: ScoringHeads, model: str, official_geometry: bool, feature_sizes) -> ScoringHeads:
    """The heads AHL starts from: the base model's, or, with ``official_geometry``, the official code's
    composite geometry carrying the base model's weights (same shapes)."""
    if not official_geometry:
        return base_heads
    if min(min(size) for size in feature_sizes) < 3:
        raise UserError(
            f"params.yaml: ahl.official_geometry (composite conv 3x3, stride 3, no padding) needs feature maps of "
            f"at least 3x3, but the cached ones are {list(feature_sizes)}; raise backbone.image_size (papers: 448 "
            f"-> 14x14 and 7x7)"
        )
    in_channels = base_heads.seen_head.conv.in_channels
    heads = build_heads(model, in_channels, topk=base_heads.topk, margin=base_heads.margin, official_geometry=True)
    heads.load_state_dict(base_heads.state_dict())
    return heads


def reinitialise(heads: ScoringHeads, seed: int) -> None:
    """Fresh default initialisation of every layer, from ``seed`` and without touching the global RNG."""
    with seeded(seed):
        for module in heads.modules():
            if module is not heads and hasattr(module, "reset_parameters"):
                module.reset_parameters()
