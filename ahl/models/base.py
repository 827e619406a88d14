"""A base model = backbone + scoring heads (DRA's four or DevNet's one) at several scales; checkpoints of it and of
AHL's heads. Importing this module registers the built-in models (ahl.models.dra, ahl.models.devnet) in
``ahl.models.heads.MODELS``.

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

from ahl.core.config import one_of, positive
from ahl.core.errors import UserError
from ahl.core.io import atomic_path
from ahl.models import devnet, dra  # noqa: F401  (register the built-in models)
from ahl.models.backbones import RESIZE, build_backbone, multiscale
from ahl.models.heads import HeadsEnsemble, ScoringHeads, model_spec


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
        if self.image_size % 2 ** (self.n_scales - 1):
            raise UserError(
                f"params.yaml: backbone.image_size = {self.image_size} is not a multiple of {2 ** (self.n_scales - 1)}"
                f" (2 ** (n_scales - 1)): each scale must be an exact resize; e.g. "
                f"{self.image_size // 2 ** (self.n_scales - 1) * 2 ** (self.n_scales - 1)}"
            )


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

    def forward(self, images: torch.Tensor, normal_mean: Sequence[torch.Tensor] | None) -> torch.Tensor:
        return self.heads(self.features(images), normal_mean)  # (B, n_heads)


def build_heads(
    model: str, in_channels: int, *, topk: float, margin: float, official_geometry: bool = False
) -> ScoringHeads:
    """The heads of the registered ``model`` for a backbone with ``in_channels`` output channels."""
    return model_spec(model).heads(in_channels, topk=topk, margin=margin, official_geometry=official_geometry)


def build_model(model: str, backbone: BackboneConfig, *, topk: float, margin: float, warn: bool = True) -> AnomalyModel:
    model_spec(model)  # an unknown name fails before the backbone is built
    net = build_backbone(backbone.name, backbone.pretrained, warn=warn)
    return AnomalyModel(
        net, build_heads(model, net.out_channels, topk=topk, margin=margin), backbone.n_scales, backbone.resize
    )


@dataclass
class Checkpoint:
    model: AnomalyModel
    normal_mean: list[torch.Tensor]  # per scale (C, H_s, W_s): mean feature of the reference normals (eval mode)
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
        "reference": [r.cpu() for r in ckpt.normal_mean],
        "meta": ckpt.meta,
    }
    _save(blob, path)


# What each kind of checkpoint's meta holds: a file of the other kind (ahl.pt given as base.pt) is named as such.
_KINDS = {"train_base": ("the base model (models/base.pt)", {"backbone", "topk", "margin"}),
          "train_ahl": ("AHL's heads (models/ahl.pt)", {"in_channels", "members", "official_geometry"})}  # fmt: skip


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
    what, keys = _KINDS[stage]
    if not isinstance(blob["meta"], dict) or not keys <= set(blob["meta"]):
        other = [
            w
            for s, (w, k) in _KINDS.items()
            if s != stage and isinstance(blob["meta"], dict) and k <= set(blob["meta"])
        ]
        holds = f"holds {other[0]}" if other else "is not a checkpoint of this version"
        raise UserError(f"{path} {holds}, not {what}; give the right file (or rebuild it: `dvc repro -f {stage}`)")
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
    heads.load_state_dict(
        {k.removeprefix("heads."): v for k, v in blob["state_dict"].items() if k.startswith("heads.")}
    )
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
            meta["model"],
            meta["in_channels"],
            topk=meta["topk"],
            margin=meta["margin"],
            official_geometry=meta["official_geometry"],
        )

    if meta["members"]:
        heads: ScoringHeads = HeadsEnsemble([one() for _ in range(meta["members"])])
    else:
        heads = one()
    heads.load_state_dict(blob["state_dict"])
    return heads.eval(), meta
