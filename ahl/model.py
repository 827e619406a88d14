"""A base model = backbone + scoring heads (DRA's four or DevNet's one) at several scales; checkpoints of it and of
AHL's heads. Importing this module registers the built-in models (ahl.dra, ahl.devnet) in ``ahl.heads.MODELS``.

Checkpoints hold tensors and plain data only and are loaded with ``torch.load(weights_only=True)``: a checkpoint
can arrive from a shared DVC cache or remote, and a pickled object in it must never run code.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ahl import devnet, dra  # noqa: F401  (register the built-in models)
from ahl.backbones import RESIZE, build_backbone, multiscale
from ahl.config import one_of, positive
from ahl.errors import UserError
from ahl.heads import HeadsEnsemble, ScoringHeads, get_model
from ahl.io import atomic_path
from ahl.runtime import seeded


@dataclass(frozen=True)
class BackboneConfig:
    name: str = "resnet18"
    pretrained: str = "imagenet"  # "imagenet" or "none" (random weights, only when asked for)
    image_size: int = 448  # the first scale; scale s is image_size // 2**s
    n_scales: int = 2
    resize: str = "bilinear"  # how scales 2+ are made: bilinear (antialiased) | nearest (official code)

    def __post_init__(self) -> None:
        positive("backbone.image_size", self.image_size)
        one_of("backbone.resize", self.resize, RESIZE)
        if self.n_scales < 1 or self.image_size // 2 ** (self.n_scales - 1) < 32:
            raise UserError(f"params.yaml: backbone.n_scales={self.n_scales} is too many for {self.image_size} px")


class AnomalyModel(nn.Module):
    def __init__(self, backbone: nn.Module, heads: ScoringHeads, n_scales: int, resize: str = "bilinear"):
        super().__init__()
        self.backbone = backbone
        self.heads = heads
        self.n_scales = n_scales
        self.resize = resize

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images in [0, 1] (B, 3, S, S) -> per scale s: (B, C, S/2^s/32, ...)."""
        return multiscale(self.backbone, images, self.n_scales, self.resize)

    def forward(self, images: torch.Tensor, reference: Sequence[torch.Tensor] | None) -> torch.Tensor:
        return self.heads(self.features(images), reference)  # (B, n_heads)


def build_heads(
    model: str, in_channels: int, *, topk: float, margin: float, official_geometry: bool = False
) -> ScoringHeads:
    """The heads of the registered ``model`` for a backbone with ``in_channels`` output channels."""
    return get_model(model).heads(in_channels, topk=topk, margin=margin, official_geometry=official_geometry)


def build_model(model: str, backbone: BackboneConfig, *, topk: float, margin: float, warn: bool = True) -> AnomalyModel:
    get_model(model)  # an unknown name fails before the backbone is built
    net = build_backbone(backbone.name, backbone.pretrained, warn=warn)
    return AnomalyModel(
        net, build_heads(model, net.out_channels, topk=topk, margin=margin), backbone.n_scales, backbone.resize
    )


@dataclass
class Checkpoint:
    model: AnomalyModel
    reference: list[torch.Tensor]  # per scale (C, H_s, W_s): mean feature of the reference normals (eval mode)
    meta: dict  # model name, backbone config, topk, margin, reference files, training history ...


def _save(obj: dict, path: str | Path) -> None:
    """torch.save through a file object: a path would put the (random) temporary file name into the archive,
    and the same weights would not give the same bytes, so DVC would rerun every stage after this one."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> None:
    blob = {
        "format": 1,
        "state_dict": ckpt.model.state_dict(),
        "reference": [r.cpu() for r in ckpt.reference],
        "meta": ckpt.meta,
    }
    _save(blob, path)


def _load(path: Path, stage: str) -> dict:
    """A checkpoint's contents, unpickled safely (tensors and plain data only); clear errors otherwise."""
    if not path.is_file():
        raise UserError(f"missing checkpoint {path}; run the {stage} stage first (dvc repro {stage})")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch names the refused global ("... unsupported GLOBAL posix.system ..."); junk bytes say otherwise
        found = [line.strip() for line in str(exc).splitlines() if "unsupported global" in line.lower()]
        if found:
            raise UserError(
                f"{path} holds something other than tensors and plain data ({found[0]}) and is not loaded (it "
                f"could run code); rebuild it with `dvc repro -f {stage}`"
            ) from None
        raise UserError(f"{path} is not a readable checkpoint; rebuild it with `dvc repro -f {stage}`") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise UserError(f"{path} is not a readable checkpoint ({exc}); rebuild it: `dvc repro -f {stage}`") from None
    if not isinstance(blob, dict) or blob.get("format") != 1 or not {"state_dict", "meta"} <= set(blob):
        raise UserError(f"{path} is not a checkpoint of this project; rebuild it with `dvc repro -f {stage}`")
    return blob


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> Checkpoint:
    blob = _load(Path(path), "train_base")
    meta = blob["meta"]
    cfg = BackboneConfig(**{**meta["backbone"], "pretrained": "none"})  # weights come from the checkpoint
    model = build_model(meta["model"], cfg, topk=meta["topk"], margin=meta["margin"], warn=False)
    model.load_state_dict(blob["state_dict"])
    model.to(device).eval()
    return Checkpoint(model, [r.to(device) for r in blob["reference"]], meta)


def load_base_heads(path: str | Path) -> tuple[ScoringHeads, dict]:
    """The base model's scoring heads and meta without its backbone (so without timm or torchvision, which take
    seconds to import): what AHL, which trains on cached features, starts from. Same weights as
    ``load_checkpoint(path).model.heads``."""
    blob = _load(Path(path), "train_base")
    meta = blob["meta"]
    in_channels = int(blob["reference"][0].shape[0])  # the reference is (C, H, W) per scale
    heads = build_heads(meta["model"], in_channels, topk=meta["topk"], margin=meta["margin"])
    heads.load_state_dict({k.removeprefix("heads."): v for k, v in blob["state_dict"].items() if k.startswith("heads.")})
    return heads.eval(), meta


# AHL's output: scoring heads only (they run on the base model's cached features).
def save_heads(path: str | Path, heads: ScoringHeads, meta: dict) -> None:
    """Save trained heads with what is needed to rebuild them: model, in_channels, topk, margin, members."""
    _save({"format": 1, "state_dict": heads.state_dict(), "meta": meta}, path)


def load_heads(path: str | Path) -> tuple[ScoringHeads, dict]:
    blob = _load(Path(path), "train_ahl")
    meta = blob["meta"]

    def one() -> ScoringHeads:
        return build_heads(
            meta["model"], meta["in_channels"], topk=meta["topk"], margin=meta["margin"],
            official_geometry=meta["official_geometry"],
        )

    if meta["members"]:
        heads: ScoringHeads = HeadsEnsemble([one() for _ in range(meta["members"])])
    else:
        heads = one()
    heads.load_state_dict(blob["state_dict"])
    return heads.eval(), meta


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
