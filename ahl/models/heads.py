"""What DevNet's and DRA's scoring heads share: top-k pooling, the patch head, the heads interface, the ensemble
of the "no CDL" ablation, and the model registry (a name -> its heads and how its base batches are made).

A set of heads maps the backbone's feature maps at every scale to one score per head and image; AHL trains
exactly these modules (on cached features), so the interface is the same for base training and for AHL. The
heads carry their top-k rate and deviation-loss margin, so AHL trains with the base model's values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn

from ahl.core.errors import UserError
from ahl.models.losses import deviation_loss

# What the heads derive from one scale's features alone (no weight enters it): the composite head's patches of
# (normal_mean - x), the holistic head's spatial mean. A caller that forwards the same batch again (AHL's update_step
# rounds over the same support batches) passes one Memo per scale and batch, and each is computed once. Only
# tensors that need no gradient are kept (cached features), so the values are the same as without a memo.
Memo = dict[tuple, torch.Tensor]


def memoised(memo: Memo | None, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``make()``, kept in ``memo`` under ``key`` (None: not kept); a result that needs a gradient is never kept."""
    if memo is None:
        return make()
    if key not in memo:
        value = make()
        if value.requires_grad:
            return value
        memo[key] = value
    return memo[key]


def topk_mean(x: torch.Tensor, rate: float) -> torch.Tensor:
    """Mean of the top ``rate`` fraction of |x| over positions: (B, 1, H, W) -> (B,)."""
    x = x.flatten(1).abs()  # (B, H*W)
    k = max(int(x.shape[1] * rate), 1)
    return torch.topk(x, k, dim=1).values.mean(dim=1)


def conv_as_matmul(
    x: torch.Tensor, conv: nn.Conv2d, normal_mean: torch.Tensor | None = None, memo: Memo | None = None
) -> torch.Tensor:
    """``conv(x)`` as one matrix product of x's patches with the kernel when the kernel's windows do not overlap
    (stride >= kernel size: the 1 x 1 patch heads, the official geometry's stride-3 composite conv); else
    ``conv(x)`` itself. Equal to the convolution within float rounding.

    Why (docs/performance.md, "AHL at the papers' shapes"): oneDNN runs a small strided convolution's backward at a
    fraction of the machine's matmul rate; as a matrix product the forward is one GEMM and, when x needs no gradient
    (AHL trains on cached features), the backward is one GEMM too (patches^T @ grad). Non-overlapping patches are a
    re-arrangement of x, not the k*k-fold copy an im2col of an overlapping (stride-1) conv needs; for those
    oneDNN's own kernels are faster than im2col + GEMM, so they stay convolutions. Scoring (no gradient) stays a
    convolution too: a matrix product's rounding depends on the number of rows, and a score must not depend on the
    batch it was scored in (evaluate.batch_size).
    With ``normal_mean`` (C, H, W), ``conv(normal_mean - x)``: the matrix product's path subtracts while it gathers
    the patches, so no (B, C, H, W) difference is made (DRA's composite head; the same values as subtracting first);
    ``memo``: x's patches of (normal_mean - x) are kept there for the next forward of the same batch (see Memo).
    -> (B, O, H', W') in channels_last memory format.
    """
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    plain = conv.groups == 1 and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
    if not plain or isinstance(conv.padding, str) or sh < kh or sw < kw or not torch.is_grad_enabled():
        return conv(x if normal_mean is None else normal_mean[None] - x)
    b, c, h, w = x.shape
    rows = x.permute(0, 2, 3, 1)  # (B, H, W, C): contiguous for channels_last x
    ref = None if normal_mean is None else normal_mean.permute(1, 2, 0)[None]  # (1, H, W, C)
    if ph or pw:
        rows = nn.functional.pad(rows, (0, 0, pw, pw, ph, ph))
        ref = None if ref is None else nn.functional.pad(ref, (0, 0, pw, pw, ph, ph))
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1

    def tiles(t: torch.Tensor) -> torch.Tensor:  # (B or 1, H, W, C) -> (B or 1, H', W', kh, kw, C): a view
        return t.unfold(1, kh, sh).unfold(2, kw, sw).permute(0, 1, 2, 4, 5, 3)

    if ref is None and kh * kw == 1:  # the 1x1 heads: every sh-th, sw-th row (slicing: unfold's backward is 3x slower)
        patches = rows[:, : sh * (ho - 1) + 1 : sh, : sw * (wo - 1) + 1 : sw]
    elif ref is None:
        patches = tiles(rows)
    elif rows.requires_grad or ref.requires_grad:  # (out= below has no autograd)
        patches = tiles(ref) - tiles(rows)
    else:  # AHL: cached features, so no gradient to x; one subtraction into the patch buffer, kept in ``memo``

        def gather() -> torch.Tensor:
            return torch.sub(tiles(ref), tiles(rows), out=rows.new_empty(b, ho, wo, kh, kw, c))

        patches = memoised(memo, ("residual patches", kh, kw, sh, sw, ph, pw), gather)
    kernel = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, kh * kw * c)  # (O, kh * kw * C)
    out = patches.reshape(b * ho * wo, kh * kw * c) @ kernel.t()
    if conv.bias is not None:
        out = out + conv.bias
    return out.view(b, ho, wo, conv.out_channels).permute(0, 3, 1, 2)


class PatchHead(nn.Module):
    """DevNet's head and DRA's seen/pseudo heads: a 1x1 conv scores each position; top-k mean of |.|."""

    def __init__(self, in_channels: int, topk: float):
        super().__init__()
        self.topk = topk
        self.conv = nn.Conv2d(in_channels, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B,)
        return topk_mean(conv_as_matmul(x, self.conv), self.topk)

    def patch_map(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, H, W): what top-k pools
        return conv_as_matmul(x, self.conv)[:, 0].abs()


class ScoringHeads(nn.Module):
    """Base class of a model's heads. Subclasses set ``head_names`` and implement ``score_scale``."""

    head_names: tuple[str, ...] = ()
    uses_normal_mean: bool = False

    def __init__(self, topk: float, margin: float):
        super().__init__()
        self.topk = topk  # fraction of positions the patch heads average
        self.margin = margin  # a of the deviation loss

    def score_scale(
        self, features: torch.Tensor, normal_mean: torch.Tensor | None, memo: Memo | None = None
    ) -> torch.Tensor:
        """Scores of every head at one scale: features (B, C, H, W) -> (B, n_heads). ``memo``: see Memo."""
        raise NotImplementedError

    def forward(
        self,
        features: Sequence[torch.Tensor],
        normal_mean: Sequence[torch.Tensor] | None = None,
        memo: Sequence[Memo] | None = None,
    ) -> torch.Tensor:
        """Per-head scores averaged over the scales: list of (B, C, H_s, W_s) -> (B, n_heads). ``memo``: one Memo
        per scale, for a batch that is forwarded again."""
        per_scale = [
            self.score_scale(f, None if normal_mean is None else normal_mean[s], None if memo is None else memo[s])
            for s, f in enumerate(features)
        ]
        return torch.stack(per_scale, dim=0).mean(dim=0)

    def targets(self, labels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """For each head: (mask of the samples it trains on, its binary target). labels: (B,) in {0, 1, 2}."""
        raise NotImplementedError

    def loss(
        self,
        scores: torch.Tensor,
        labels: torch.Tensor,
        counts: Sequence[int] | None = None,
        draws: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sum over heads of the deviation loss (margin ``self.margin``) on the samples each head trains on.
        ``counts``: when the rows are one rank's share of a larger batch, each head's samples in the whole batch
        (head_counts); each head's mean then becomes this rank's part of the whole batch's mean.
        ``draws``: (n_heads, R) draws of N(0, 1), one sample per head (the official loss); None = mean 0,
        std 1 exactly."""
        total = scores.new_zeros(())
        for h, (mask, target) in enumerate(self.targets(labels)):
            if mask.any():
                loss = deviation_loss(scores[mask, h], target[mask], self.margin, None if draws is None else draws[h])
                total = total + (loss if counts is None else loss * (int(mask.sum()) / counts[h]))
        return total

    def head_counts(self, labels: torch.Tensor) -> list[int]:
        """The number of samples each head trains on in a batch of ``labels``."""
        return [int(mask.sum()) for mask, _ in self.targets(labels)]

    def final_score(self, scores: torch.Tensor) -> torch.Tensor:
        """The anomaly score of each image from its per-head scores: (B, n_heads) -> (B,)."""
        raise NotImplementedError

    def patch_maps(self, features: torch.Tensor, normal_mean: torch.Tensor | None) -> list[torch.Tensor]:
        """Localisation at one scale: the |score| of every position of each spatial head, before top-k pooling:
        features (B, C, H, W) -> list of (B, h, w) (ahl/evaluation/localize.py upsamples, sums and averages them)."""
        raise NotImplementedError(f"{type(self).__name__} has no spatial heads to localise with")


class HeadsEnsemble(ScoringHeads):
    """Ablation "independent heads averaged": T copies of the heads; the final score is the mean of theirs."""

    def __init__(self, members: Sequence[ScoringHeads]):
        super().__init__(members[0].topk, members[0].margin)
        self.members = nn.ModuleList(members)
        names = members[0].head_names
        self.head_names = tuple(f"{name}.{k}" for k in range(len(members)) for name in names)
        self.uses_normal_mean = members[0].uses_normal_mean

    def forward(self, features, normal_mean=None, memo=None) -> torch.Tensor:  # -> (B, T * n_heads)
        return torch.cat([m(features, normal_mean, memo) for m in self.members], dim=1)

    def final_score(self, scores: torch.Tensor) -> torch.Tensor:
        per_member = scores.view(scores.shape[0], len(self.members), -1)  # (B, T, n_heads)
        return torch.stack([m.final_score(per_member[:, k]) for k, m in enumerate(self.members)], 1).mean(1)

    def patch_maps(self, features: torch.Tensor, normal_mean: torch.Tensor | None) -> list[torch.Tensor]:
        # The final score averages the members, so the map does too: each member's maps divided by T.
        return [m / len(self.members) for member in self.members for m in member.patch_maps(features, normal_mean)]


# --------------------------------------------------------------------------------------------------------------
# The model registry: ahl/models/dra.py and ahl/models/devnet.py register themselves; ahl/models/base.py imports both.


@dataclass(frozen=True)
class ModelSpec:
    """Everything the pipeline knows about a base model besides its heads' code.

    heads: (in_channels, *, topk, margin, official_geometry) -> the model's ScoringHeads.
    anomaly_share: fraction of a base-training batch filled with seen anomalies (the rest are normal slots).
    pseudo_anomalies: base training turns each normal slot into a CutPaste pseudo anomaly with probability
        base.pseudo_prob (DRA's pseudo head needs them).
    uses_normal_mean: the heads compare each image with the mean feature of base.n_ref reference normals.
    lr_step_at_epoch_start: base training steps its StepLR before each epoch (official DRA) instead of after
        (official DevNet).
    """

    name: str
    heads: Callable[..., ScoringHeads]
    anomaly_share: Fraction
    pseudo_anomalies: bool
    uses_normal_mean: bool
    lr_step_at_epoch_start: bool


MODELS: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    if spec.name in MODELS:
        raise ValueError(f"model {spec.name!r} registered twice")
    MODELS[spec.name] = spec
    return spec


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise UserError(f"params.yaml: base.model = {name!r} is not a model; known: {', '.join(sorted(MODELS))}")
    return MODELS[name]
