"""What every unit check shares: the result row, the comparison, random feature maps, the name maps between
the official modules and ours, and the official AHL modules with their shims."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.parity.shims import Patches, import_official, no_detect_anomaly, torch2

C = 512  # the official AHL heads hard-code 512 channels (ResNet-18's layer4)
SIZES = (6, 3)  # feature maps of the two scales (>= 3x3 for the official composite geometry)
N_REF = 5


@dataclass
class Row:
    """One line of the table."""

    component: str
    diff: float | None  # max abs difference, None for info rows
    verdict: str  # equal | differs | info
    note: str


def verdict(diff: float, scale: float = 1.0, tol: float = 2e-5) -> str:
    """``equal`` within float32 round-off (``tol``, relative to ``scale`` when that is above 1), else ``differs``."""
    return "equal" if diff <= tol * max(1.0, scale) else "differs"


def maxdiff(a, b) -> float:
    """The largest absolute difference of two tensors (or numbers), in float64; 0 for empty ones."""
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    return float((a - b).abs().max()) if a.numel() else 0.0


def features(n: int, g: torch.Generator, shift: float = 0.0) -> list[torch.Tensor]:
    """Non-negative (post-ReLU-like) feature maps per scale: (n, C, s, s)."""
    return [torch.relu(torch.randn(n, C, s, s, generator=g) + shift) for s in SIZES]


# --------------------------------------------------------------------------------------------------------------
# name maps between the official modules and ours


def dra_official_name(name: str) -> str:
    """Our DRAHeads parameter/buffer name -> the official DRA model's (modeling/net.py)."""
    name = name.replace("composite_head.patch.conv.", "composite_head.scoring.")
    for head in ("seen_head", "pseudo_head"):
        name = name.replace(f"{head}.conv.", f"{head}.scoring.")
    return name


def image_official_name(kind: str, name: str) -> str:
    """Our whole model's parameter/buffer name -> the official DRA's or DevNet's (modeling/net.py)."""
    if name.startswith("backbone."):
        return "feature_extractor." + name.removeprefix("backbone.")
    if kind == "dra":
        return dra_official_name(name.removeprefix("heads."))
    return "conv." + name.removeprefix("heads.seen_head.conv.")


# the official AHL DRA (modeling/DRA_AHL.py) keeps its weights in a list ``vars``; index -> our name
AHL_VARS = (
    "holistic_head.fc1.weight", "holistic_head.fc1.bias", "holistic_head.fc2.weight", "holistic_head.fc2.bias",
    "seen_head.conv.weight", "seen_head.conv.bias", "pseudo_head.conv.weight", "pseudo_head.conv.bias",
    "composite_head.patch.conv.weight", "composite_head.patch.conv.bias", "composite_head.conv.0.weight",
    "composite_head.conv.0.bias", "composite_head.conv.1.weight", "composite_head.conv.1.bias",
)  # fmt: skip


def copy_ours_to_official_dra(heads, official_model, prefix: str = "") -> None:
    """Our DRAHeads' weights and buffers into the official DRA model (names under ``prefix``)."""
    state = official_model.state_dict()
    for name, value in heads.state_dict().items():
        state[prefix + dra_official_name(name)] = value.clone()
    official_model.load_state_dict(state)


def copy_ahl_vars_to_ours(official, heads) -> None:
    """The official AHL DRA's ``vars`` into our DRAHeads, with the official composite BatchNorm's fixed stats."""
    with torch.no_grad():
        params = dict(heads.named_parameters())
        for k, name in enumerate(AHL_VARS):
            params[name].copy_(official.vars[k].reshape(params[name].shape))
        bn = heads.composite_head.conv[1]
        bn.running_mean.zero_()  # the official composite BatchNorm always uses mean 0 / var 1
        bn.running_var.fill_(1.0)


# --------------------------------------------------------------------------------------------------------------
# the official AHL modules (AHL/main.py, modeling/, dataloaders/), imported with their shims


def ahl_modules(root: Path, p: Patches):
    """main, modeling.DRA_AHL, Plain_AHL, aux_net, layers.deviation_loss, dataloaders.utlis and dataloader of the
    official AHL checkout, imported under the shims in ``p`` (CPU, torch 2, anomaly detection off)."""
    torch2(p)
    p.setitem(os.environ, "CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    mods = import_official(root, "main", "modeling.DRA_AHL", "modeling.Plain_AHL", "modeling.aux_net",
                           "modeling.layers.deviation_loss", "dataloaders.utlis", "dataloaders.dataloader")  # fmt: skip
    no_detect_anomaly(p)  # main.py switched it on at import
    return mods
