"""A base model = backbone + scoring heads (DRA's four or DevNet's one) at several scales; its checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ahl.backbones import build_backbone, multiscale
from ahl.config import one_of, positive
from ahl.errors import UserError
from ahl.heads import ScoringHeads, build_heads
from ahl.io import atomic_path

MODELS = ("dra", "devnet")


@dataclass(frozen=True)
class BackboneConfig:
    name: str = "resnet18"
    pretrained: str = "imagenet"  # "imagenet" or "none" (random weights, only when asked for)
    image_size: int = 448  # the first scale; scale s is image_size // 2**s
    n_scales: int = 2

    def __post_init__(self) -> None:
        positive("backbone.image_size", self.image_size)
        if self.n_scales < 1 or self.image_size // 2 ** (self.n_scales - 1) < 32:
            raise UserError(f"params.yaml: backbone.n_scales={self.n_scales} is too many for {self.image_size} px")


class AnomalyModel(nn.Module):
    def __init__(self, backbone: nn.Module, heads: ScoringHeads, n_scales: int):
        super().__init__()
        self.backbone = backbone
        self.heads = heads
        self.n_scales = n_scales

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images in [0, 1] (B, 3, S, S) -> per scale s: (B, C, S/2^s/32, ...)."""
        return multiscale(self.backbone, images, self.n_scales)

    def forward(self, images: torch.Tensor, reference: Sequence[torch.Tensor] | None) -> torch.Tensor:
        return self.heads(self.features(images), reference)  # (B, n_heads)


def build_model(model: str, backbone: BackboneConfig, topk: float = 0.1, warn: bool = True) -> AnomalyModel:
    one_of("base.model", model, MODELS)
    net = build_backbone(backbone.name, backbone.pretrained, warn=warn)
    return AnomalyModel(net, build_heads(model, net.out_channels, topk=topk), backbone.n_scales)


@dataclass
class Checkpoint:
    model: AnomalyModel
    reference: list[torch.Tensor]  # per scale (C, H_s, W_s): mean feature of the reference normals (eval mode)
    meta: dict  # model name, backbone config, topk, reference files, training history ...


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


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing checkpoint {path}; run the base training stage first (dvc repro train_base)")
    blob = torch.load(path, map_location="cpu", weights_only=False)
    meta = blob["meta"]
    cfg = BackboneConfig(**{**meta["backbone"], "pretrained": "none"})  # weights come from the checkpoint
    model = build_model(meta["model"], cfg, topk=meta["topk"], warn=False)
    model.load_state_dict(blob["state_dict"])
    model.to(device).eval()
    return Checkpoint(model, [r.to(device) for r in blob["reference"]], meta)


def backbone_meta(cfg: BackboneConfig) -> dict:
    return asdict(cfg)


# AHL's output: scoring heads only (they run on the base model's cached features).
def save_heads(path: str | Path, heads: ScoringHeads, meta: dict) -> None:
    """Save trained heads with what is needed to rebuild them: model, in_channels, topk, members."""
    _save({"format": 1, "state_dict": heads.state_dict(), "meta": meta}, path)


def load_heads(path: str | Path) -> tuple[ScoringHeads, dict]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing {path}; run the AHL stage first (dvc repro train_ahl)")
    blob = torch.load(path, map_location="cpu", weights_only=False)
    meta = blob["meta"]

    def one() -> ScoringHeads:
        return build_heads(
            meta["model"], meta["in_channels"], topk=meta["topk"], official_geometry=meta.get("official_geometry", False)
        )

    if meta.get("members"):
        from ahl.cdl import HeadsEnsemble

        heads: ScoringHeads = HeadsEnsemble([one() for _ in range(meta["members"])])
    else:
        heads = one()
    heads.load_state_dict(blob["state_dict"])
    return heads.eval(), meta
