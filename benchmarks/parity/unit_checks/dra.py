"""DRA and DevNet against the official DRA/modeling/net.py and train.py: heads, deviation losses, whole models."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch.nn import functional as F

from benchmarks.parity import ours
from benchmarks.parity.shims import Patches, import_official, replace_backbone, standard_reference, torch2
from benchmarks.parity.unit_checks.helpers import (
    N_REF,
    SIZES,
    C,
    Row,
    copy_ours_to_official_dra,
    dra_official_name,
    features,
    image_official_name,
    maxdiff,
    verdict,
)


def dra_heads(dra_root: Path) -> list[Row]:
    """The official DRA model on an identity backbone vs our DRAHeads: each head, final score, loss, gradients."""
    rows = []
    with Patches() as p:
        torch2(p)
        net, layers, train_mod = import_official(dra_root, "modeling.net", "modeling.layers.deviation_loss", "train")
        replace_backbone(p, net, "identity", lambda: (torch.nn.Identity(), C))
        g = torch.Generator().manual_seed(1)
        cfg = SimpleNamespace(topk=0.1, total_heads=4, n_scales=2, img_size=SIZES[0], nRef=N_REF)
        torch.manual_seed(0)
        official = net.DRA(cfg, backbone="identity")
        heads = ours.DRAHeads(C, topk=0.1, margin=5.0)
        copy_ours_to_official_dra(heads, official)

        x0 = features(12, g)[0]
        ref0 = features(N_REF, g)[0]
        # the official model makes its second scale with F.interpolate's default (nearest) from the input;
        # with an identity "backbone" that is the nearest-resized scale-0 map, which ours is given directly
        x1, ref1 = (F.interpolate(t, size=SIZES[0] // 2) for t in (x0, ref0))
        labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])

        official.eval(), heads.eval()
        with torch.no_grad():
            out = official(torch.cat([ref0, x0]), labels)  # 4 x (B,)
            mine = heads([x0, x1], [ref0.mean(0), ref1.mean(0)])  # (B, 4)
        for h, name in enumerate(ours.DRAHeads.head_names):
            d = maxdiff(out[h], mine[:, h])
            rows.append(Row(f"DRA {name} head (eval, 2 scales)", d, verdict(d), "official DRA.forward vs DRAHeads"))
        final_official = -out[0] + out[1] + out[2] + out[3]  # train.py Trainer.eval: -holistic + the others
        d = maxdiff(final_official, heads.final_score(mine))
        rows.append(Row("DRA final score (eval)", d, verdict(d, float(final_official.abs().max())),
                        "-holistic + seen + pseudo + composite"))  # fmt: skip

        # training mode: the four heads' deviation losses and their gradients (BatchNorm on batch statistics)
        official.train(), heads.train()
        criterion = layers.DeviationLoss()
        with standard_reference(layers):
            out = official(torch.cat([ref0, x0]), labels)
            targets = train_mod.Trainer.generate_target(None, labels)
            loss_official = sum(criterion(out[i], targets[i].float()) for i in range(4))
            loss_official.backward()
        loss_ours = heads.loss(heads([x0, x1], [ref0.mean(0), ref1.mean(0)]), labels)
        loss_ours.backward()
        d = maxdiff(loss_official, loss_ours)
        rows.append(Row("DRA loss of the 4 heads (train mode)", d, verdict(d, float(loss_ours.detach())),
                        f"official {float(loss_official):.6f}, ours {float(loss_ours):.6f}; deviation reference "
                        "standardised on the official side"))  # fmt: skip
        official_params = dict(official.named_parameters())
        gd = max(maxdiff(official_params[dra_official_name(n)].grad, q.grad) for n, q in heads.named_parameters())
        rows.append(Row("DRA gradients of all head parameters", gd, verdict(gd), "same loss, autograd on both sides"))
    return rows


def deviation_losses(roots: dict[str, Path]) -> list[Row]:
    """Each checkout's DeviationLoss vs ours: standardised reference, its own 5,000 draws, the draws given to ours."""
    rows = []
    g = torch.Generator().manual_seed(2)
    s = torch.randn(64, generator=g) * 3
    y = (torch.rand(64, generator=g) < 0.5).float()
    for kind, root in roots.items():
        with Patches() as p:
            torch2(p)
            (layers,) = import_official(root, "modeling.layers.deviation_loss")
            loss = layers.DeviationLoss()
            s1 = s.clone().requires_grad_(True)
            s2 = s.clone().requires_grad_(True)
            with standard_reference(layers):
                v1 = loss(s1, y)
            v1.backward()
            v2 = ours.deviation_loss(s2, y)
            v2.backward()
            d = max(maxdiff(v1, v2), maxdiff(s1.grad, s2.grad))
            rows.append(Row(f"deviation loss + gradient ({kind}), standardised reference", d, verdict(d),
                            f"{kind}/modeling/layers/deviation_loss.py DeviationLoss vs ahl deviation_loss"))  # fmt: skip
            diffs = []
            for seed in range(20):
                torch.manual_seed(seed)
                diffs.append(abs(float(loss(s, y)) - float(v2)))
            rows.append(Row(f"deviation loss ({kind}), official 5,000-draw reference", max(diffs), "info",
                            f"the official per-call N(0,1) draw moves the loss by up to {max(diffs):.4f} "
                            f"(mean {np.mean(diffs):.4f}) over 20 seeds at loss {float(v2):.3f}"))  # fmt: skip
            d = 0.0
            for seed in range(5):  # the official draw handed to ours: base.deviation_reference: sampled
                torch.manual_seed(seed)
                official_value = loss(s, y)
                torch.manual_seed(seed)
                draw = torch.normal(mean=0.0, std=torch.full([5000], 1.0))
                d = max(d, maxdiff(official_value, ours.deviation_loss(s, y, draws=draw)))
            rows.append(Row(f"deviation loss ({kind}), the same 5,000 draws given to ours", d, verdict(d),
                            "ours with base.deviation_reference: sampled computes the official loss"))  # fmt: skip
    return rows


@dataclass
class ImageCase:
    """What the image-level rows compare: DRA or DevNet from one checkout, on one backbone, at one image size,
    with the images and labels both sides get."""

    kind: str  # dra | devnet
    root: Path
    backbone: str
    pretrained: str
    size: int
    images: torch.Tensor  # (6, 3, size, size) in [0, 1]: ours normalises inside the backbone
    refs: torch.Tensor  # (N_REF, 3, size, size): DRA's reference images
    labels: torch.Tensor  # (6,)

    @property
    def name(self) -> str:
        """The model's name in the rows."""
        return self.kind.upper() if self.kind == "dra" else "DevNet"

    def models(self, n_scales: int):
        """(official model on our backbone, our model with the same weights)."""
        kind, backbone, pretrained, size = self.kind, self.backbone, self.pretrained, self.size
        with Patches() as p:
            (net,) = import_official(self.root, "modeling.net")
            replace_backbone(p, net, backbone, lambda: ours.backbone_body(backbone, pretrained))
            cfg = SimpleNamespace(topk=0.1, total_heads=4, n_scales=n_scales, img_size=size, nRef=N_REF, backbone=backbone)
            torch.manual_seed(0)
            official = net.DRA(cfg, backbone=backbone) if kind == "dra" else net.SemiADNet(cfg)
        torch.manual_seed(1)
        config = ours.BackboneConfig(backbone, pretrained, size, n_scales)
        model = ours.build_model(kind, config, topk=0.1, margin=5.0, warn=False)
        state = official.state_dict()
        for name, value in model.state_dict().items():
            state[image_official_name(kind, name)] = value.clone()
        official.load_state_dict(state)
        return official, model


def _loader_normalise(x: torch.Tensor) -> torch.Tensor:
    """The official loaders' Normalize (ImageNet statistics): what the official models get."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


def _image_scores(case: ImageCase, official, model) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode final scores of the official model and ours on the case's images."""
    official.eval(), model.eval()
    with torch.no_grad():
        if case.kind == "dra":
            out = official(_loader_normalise(torch.cat([case.refs, case.images])), case.labels)
            off = -out[0] + out[1] + out[2] + out[3]
            normal_mean = [f.mean(0) for f in model.features(case.refs)]
        else:
            off = official(_loader_normalise(case.images))[:, 0]
            normal_mean = None
        return off, model.heads.final_score(model(case.images, normal_mean))


def _image_score_rows(case: ImageCase) -> list[Row]:
    """Final scores with 1 scale, 2 scales, and 2 scales with ours resized like theirs (nearest)."""
    rows = []
    for n_scales, nearest in ((1, False), (2, False), (2, True)):
        official, model = case.models(n_scales)
        model.resize = "nearest" if nearest else "bilinear"  # backbone.resize
        off, mine = _image_scores(case, official, model)
        d = maxdiff(off, mine)
        what = {(1, False): "1 scale", (2, False): "2 scales", (2, True): "2 scales, ours resized like theirs"}
        note = {
            (1, False): "same backbone weights, ImageNet normalisation in the loader (theirs) vs in the module (ours)",
            (2, False): "second scale: official F.interpolate nearest vs ours bilinear+antialias "
            f"(scores up to {float(off.abs().max()):.2f})",
            (2, True): "ours with backbone.resize: nearest: the only difference at image level",
        }[(n_scales, nearest)]
        rows.append(Row(f"{case.name} image-level final score (eval, {what[(n_scales, nearest)]})", d,
                        verdict(d, float(off.abs().max()), 1e-4), note))  # fmt: skip
    return rows


def _image_losses(case: ImageCase, official, model) -> tuple[torch.Tensor, torch.Tensor]:
    """Train-mode losses of both sides (nearest second scale on both), backpropagated."""
    images, refs, labels = case.images, case.refs, case.labels
    with Patches() as p:
        torch2(p)
        (layers,) = import_official(case.root, "modeling.layers.deviation_loss")
        criterion = layers.DeviationLoss()
        official.train(), model.train()
        model.resize = "nearest"  # backbone.resize: the official second scale
        with standard_reference(layers):
            if case.kind == "dra":
                out = official(_loader_normalise(torch.cat([refs, images])), labels)
                (train_mod,) = import_official(case.root, "train")
                targets = train_mod.Trainer.generate_target(None, labels)
                loss_official = sum(criterion(out[i], targets[i].float()) for i in range(4))
                loss_ours = ours.train_step(model, images, labels, refs)
            else:
                loss_official = criterion(official(_loader_normalise(images)), labels.unsqueeze(1).float())
                loss_ours = ours.train_step(model, images, labels, None)
        loss_official.backward()
        loss_ours.backward()
    return loss_official, loss_ours


def _image_train_rows(case: ImageCase) -> list[Row]:
    """Train-mode loss and the gradients of every parameter (backbone included)."""
    official, model = case.models(2)
    loss_official, loss_ours = _image_losses(case, official, model)
    d = maxdiff(loss_official, loss_ours)
    rows = [Row(f"{case.name} image-level loss (train mode, BatchNorm batch statistics)", d, verdict(d, float(loss_ours.detach()), 1e-4),
                f"official {float(loss_official.detach()):.5f}, ours {float(loss_ours.detach()):.5f}")]  # fmt: skip
    off_grads = dict(official.named_parameters())
    worst, scale = 0.0, 0.0
    for n, q in model.named_parameters():
        other = image_official_name(case.kind, n)
        if q.grad is None and off_grads[other].grad is None:
            continue
        worst = max(worst, maxdiff(off_grads[other].grad, q.grad))
        scale = max(scale, float(q.grad.abs().max()))
    rows.append(Row(f"{case.name} image-level gradients, all parameters incl. backbone", worst,
                    verdict(worst, scale, 1e-4), f"largest gradient entry {scale:.3g}"))  # fmt: skip
    return rows


def image_level(kind: str, root: Path, backbone: str, pretrained: str, size: int = 128) -> list[Row]:
    """The whole model (backbone + heads + scales) on the same images: eval scores, train loss and gradients."""
    g = torch.Generator().manual_seed(3)
    images = torch.rand(6, 3, size, size, generator=g)
    refs = torch.rand(N_REF, 3, size, size, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 2, 0]) if kind == "dra" else torch.tensor([0, 0, 0, 1, 1, 1])
    case = ImageCase(kind, root, backbone, pretrained, size, images, refs, labels)
    return _image_score_rows(case) + _image_train_rows(case)
