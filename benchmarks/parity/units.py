"""Unit-level parity: the official modules and ours on the same tensors with the same weights.

    python benchmarks/parity/units.py --official-dra DIR --official-devnet DIR --official-ahl DIR \
        [--cache cache/features] [--backbone efficientnet_lite0] [--out results/parity_units.md]

Each row feeds the official component (imported from the user's checkout, shims in memory) and ours the same
inputs and weights, and reports the largest absolute difference: ``equal`` when within float32 round-off,
``differs`` otherwise (the note says why), ``info`` for measured statistics (sampling, parameter ranges).
docs/parity.md explains every row.
"""

from __future__ import annotations

import argparse
import ast
import csv
import itertools
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.parity import ours  # noqa: E402
from benchmarks.parity.shims import (  # noqa: E402
    MissingCheckout,
    Patches,
    check_checkout,
    import_official,
    kmeans_n_init_10,
    torch2,
    no_detect_anomaly,
    replace_backbone,
    sorted_listdir,
    standard_reference,
)

C = 512  # the official AHL heads hard-code 512 channels (ResNet-18's layer4)
SIZES = (6, 3)  # feature maps of the two scales (>= 3x3 for the official composite geometry)
N_REF = 5


@dataclass
class Row:
    component: str
    diff: float | None  # max abs difference, None for info rows
    verdict: str  # equal | differs | info
    note: str


def verdict(diff: float, scale: float = 1.0, tol: float = 2e-5) -> str:
    return "equal" if diff <= tol * max(1.0, scale) else "differs"


def maxdiff(a, b) -> float:
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


# the official AHL DRA (modeling/DRA_AHL.py) keeps its weights in a list ``vars``; index -> our name
AHL_VARS = (
    "holistic_head.fc1.weight", "holistic_head.fc1.bias", "holistic_head.fc2.weight", "holistic_head.fc2.bias",
    "seen_head.conv.weight", "seen_head.conv.bias", "pseudo_head.conv.weight", "pseudo_head.conv.bias",
    "composite_head.patch.conv.weight", "composite_head.patch.conv.bias", "composite_head.conv.0.weight",
    "composite_head.conv.0.bias", "composite_head.conv.1.weight", "composite_head.conv.1.bias",
)  # fmt: skip


def copy_ours_to_official_dra(heads, official_model, prefix: str = "") -> None:
    state = official_model.state_dict()
    for name, value in heads.state_dict().items():
        state[prefix + dra_official_name(name)] = value.clone()
    official_model.load_state_dict(state)


def copy_ahl_vars_to_ours(official, heads) -> None:
    with torch.no_grad():
        params = dict(heads.named_parameters())
        for k, name in enumerate(AHL_VARS):
            params[name].copy_(official.vars[k].reshape(params[name].shape))
        bn = heads.composite_head.conv[1]
        bn.running_mean.zero_()  # the official composite BatchNorm always uses mean 0 / var 1
        bn.running_var.fill_(1.0)


def grads_of(params) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]


# --------------------------------------------------------------------------------------------------------------
# DRA (official: DRA/modeling/net.py, DRA/train.py)


def dra_heads(dra_root: Path) -> list[Row]:
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
                d = max(d, maxdiff(official_value, ours.deviation_loss(s, y, reference=draw)))
            rows.append(Row(f"deviation loss ({kind}), the same 5,000 draws given to ours", d, verdict(d),
                            "ours with base.deviation_reference: sampled computes the official loss"))  # fmt: skip
    return rows


def _image_models(kind: str, root: Path, backbone: str, pretrained: str, size: int, n_scales: int):
    """(official model on our backbone, our model with the same weights), for DRA or DevNet."""
    module = "modeling.net"
    with Patches() as p:
        (net,) = import_official(root, module)
        replace_backbone(p, net, backbone, lambda: ours.backbone_body(backbone, pretrained))
        cfg = SimpleNamespace(topk=0.1, total_heads=4, n_scales=n_scales, img_size=size, nRef=N_REF, backbone=backbone)
        torch.manual_seed(0)
        official = net.DRA(cfg, backbone=backbone) if kind == "dra" else net.SemiADNet(cfg)
    torch.manual_seed(1)
    model = ours.build_model(kind, ours.BackboneConfig(backbone, pretrained, size, n_scales), topk=0.1, margin=5.0, warn=False)
    state = official.state_dict()
    for name, value in model.state_dict().items():
        if name.startswith("backbone."):
            state["feature_extractor." + name.removeprefix("backbone.")] = value.clone()
        elif kind == "dra":
            state[dra_official_name(name.removeprefix("heads."))] = value.clone()
        else:
            state["conv." + name.removeprefix("heads.seen_head.conv.")] = value.clone()
    official.load_state_dict(state)
    return official, model


def image_level(kind: str, root: Path, backbone: str, pretrained: str, size: int = 128) -> list[Row]:
    """The whole model (backbone + heads + scales) on the same images: eval scores, train loss and gradients."""
    rows = []
    name = kind.upper() if kind == "dra" else "DevNet"
    g = torch.Generator().manual_seed(3)
    images = torch.rand(6, 3, size, size, generator=g)  # ours: [0, 1], normalisation inside the backbone
    refs = torch.rand(N_REF, 3, size, size, generator=g)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    norm = lambda x: (x - mean) / std  # noqa: E731  the official loaders' Normalize
    labels = torch.tensor([0, 0, 1, 1, 2, 0]) if kind == "dra" else torch.tensor([0, 0, 0, 1, 1, 1])

    def scores(official, model):
        official.eval(), model.eval()
        with torch.no_grad():
            if kind == "dra":
                out = official(norm(torch.cat([refs, images])), labels)
                off = -out[0] + out[1] + out[2] + out[3]
                reference = [f.mean(0) for f in model.features(refs)]
            else:
                off = official(norm(images))[:, 0]
                reference = None
            return off, model.heads.final_score(model(images, reference))

    for n_scales, nearest in ((1, False), (2, False), (2, True)):
        official, model = _image_models(kind, root, backbone, pretrained, size, n_scales)
        model.resize = "nearest" if nearest else "bilinear"  # backbone.resize
        off, mine = scores(official, model)
        d = maxdiff(off, mine)
        what = {(1, False): "1 scale", (2, False): "2 scales", (2, True): "2 scales, ours resized like theirs"}
        note = {
            (1, False): "same backbone weights, ImageNet normalisation in the loader (theirs) vs in the module (ours)",
            (2, False): "second scale: official F.interpolate nearest vs ours bilinear+antialias "
            f"(scores up to {float(off.abs().max()):.2f})",
            (2, True): "ours with backbone.resize: nearest: the only difference at image level",
        }[(n_scales, nearest)]
        rows.append(Row(f"{name} image-level final score (eval, {what[(n_scales, nearest)]})", d,
                        verdict(d, float(off.abs().max()), 1e-4), note))  # fmt: skip

    # train mode: loss and gradients of every parameter (backbone included), nearest second scale on both sides
    official, model = _image_models(kind, root, backbone, pretrained, size, 2)
    with Patches() as p:
        torch2(p)
        (layers,) = import_official(root, "modeling.layers.deviation_loss")
        criterion = layers.DeviationLoss()
        official.train(), model.train()
        model.resize = "nearest"  # backbone.resize: the official second scale
        with standard_reference(layers):
            if kind == "dra":
                out = official(norm(torch.cat([refs, images])), labels)
                (train_mod,) = import_official(root, "train")
                targets = train_mod.Trainer.generate_target(None, labels)
                loss_official = sum(criterion(out[i], targets[i].float()) for i in range(4))
                loss_ours = ours.train_step(model, images, labels, refs)
            else:
                loss_official = criterion(official(norm(images)), labels.unsqueeze(1).float())
                loss_ours = ours.train_step(model, images, labels, None)
        loss_official.backward()
        loss_ours.backward()
    d = maxdiff(loss_official, loss_ours)
    rows.append(Row(f"{name} image-level loss (train mode, BatchNorm batch statistics)", d, verdict(d, float(loss_ours.detach()), 1e-4),
                    f"official {float(loss_official.detach()):.5f}, ours {float(loss_ours.detach()):.5f}"))  # fmt: skip
    off_grads = dict(official.named_parameters())
    worst, scale = 0.0, 0.0
    for n, q in model.named_parameters():
        if n.startswith("backbone."):
            other = "feature_extractor." + n.removeprefix("backbone.")
        elif kind == "dra":
            other = dra_official_name(n.removeprefix("heads."))
        else:
            other = "conv." + n.removeprefix("heads.seen_head.conv.")
        if q.grad is None and off_grads[other].grad is None:
            continue
        worst = max(worst, maxdiff(off_grads[other].grad, q.grad))
        scale = max(scale, float(q.grad.abs().max()))
    rows.append(Row(f"{name} image-level gradients, all parameters incl. backbone", worst, verdict(worst, scale, 1e-4),
                    f"largest gradient entry {scale:.3g}"))  # fmt: skip
    return rows


# --------------------------------------------------------------------------------------------------------------
# AHL (official: AHL/modeling/DRA_AHL.py, Plain_AHL.py, aux_net.py, main.py)


def _ahl_modules(root: Path, p: Patches):
    torch2(p)
    p.setitem(os.environ, "CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    mods = import_official(root, "main", "modeling.DRA_AHL", "modeling.Plain_AHL", "modeling.aux_net",
                           "modeling.layers.deviation_loss", "dataloaders.utlis", "dataloaders.dataloader")  # fmt: skip
    no_detect_anomaly(p)  # main.py switched it on at import
    return mods


def ahl_heads(root: Path) -> list[Row]:
    rows = []
    with Patches() as p:
        main, dra_ahl, _plain, _aux, layers, *_ = _ahl_modules(root, p)
        g = torch.Generator().manual_seed(4)
        cfg = SimpleNamespace(total_heads=4, n_scales=2, nRef=N_REF)
        torch.manual_seed(0)
        official = dra_ahl.DRA(cfg)
        heads = ours.DRAHeads(C, topk=0.1, margin=5.0, official_geometry=True)
        copy_ahl_vars_to_ours(official, heads)
        x, ref = features(16, g), features(N_REF, g)
        official.eval(), heads.eval()

        def both():
            with torch.no_grad():
                out = official(torch.cat([ref[0], x[0]]), torch.cat([ref[1], x[1]]), st=True)
                mine = heads(x, [r.mean(0) for r in ref])
            return out, mine

        out, mine = both()
        for h, name in enumerate(ours.DRAHeads.head_names):
            d = maxdiff(out[h], mine[:, h])
            note = "official init: BatchNorm weight = bias = 0"
            if name == "holistic":
                with torch.no_grad():  # the holistic head before |.|, per scale
                    hh = heads.holistic_head
                    raw = torch.stack([hh.fc2(torch.relu(hh.fc1(f.mean(dim=(2, 3)))))[:, 0] for f in x])
                neg = float((raw < 0).float().mean())
                note = (f"official AHL holistic head has no |.| (DRA's has); {neg:.0%} of the per-scale outputs are "
                        "negative here; equal when they are positive (meta-gradient rows below)")  # fmt: skip
            if name == "composite":
                note += f"; the head outputs |patch bias| = {float(out[3].abs().max()):.4f} for every image (bias init 0)"
            rows.append(Row(f"AHL(DRA) {name} head, official init (eval)", d, verdict(d), note))

        # BatchNorm with PyTorch's default init (weight 1, bias 0) on both sides
        with torch.no_grad():
            official.vars[12].fill_(1.0)
            heads.composite_head.conv[1].weight.fill_(1.0)
        out, mine = both()
        d = maxdiff(out[3], mine[:, 3])
        rows.append(Row("AHL(DRA) composite head, BN weight 1 (ours eval, running stats 0/1)", d, verdict(d),
                        "stride 3, no padding (ahl.official_geometry); official F.batch_norm with fixed stats 0/1"))  # fmt: skip
        heads.train()
        with torch.no_grad():
            mine_train = heads(x, [r.mean(0) for r in ref])
        d = maxdiff(out[3], mine_train[:, 3])
        rows.append(Row("AHL(DRA) composite head, BN weight 1, ours in train mode", d, verdict(d),
                        "ours normalises with batch statistics during inner/query passes; the official BN never "
                        "normalises (fixed mean 0, var 1)"))  # fmt: skip

        # gradient reaching the composite head with the official init: zero on both sides
        with torch.no_grad():
            official.vars[12].zero_()
            heads.composite_head.conv[1].weight.zero_()
        official.train(), heads.train()
        labels = torch.tensor([0] * 6 + [1] * 5 + [2] * 5)
        trainer = object.__new__(main.Trainer)
        trainer.args = SimpleNamespace(model_name="DRA", total_heads=4, criterion="deviation", nRef=N_REF)
        trainer.model, trainer.criterion = official, layers.DeviationLoss()
        trainer.ref = itertools.cycle([{"image": ref[0], "image_scale": ref[1]}])
        with standard_reference(layers):
            _out, loss = trainer.train_unit(x[0], x[1], labels, var=official.parameters())
        grads = torch.autograd.grad(loss, list(official.parameters()))
        comp_official = max(float(gr.abs().max()) for gr in grads[10:14])
        loss_ours = heads.loss(heads(x, [r.mean(0) for r in ref]), labels)
        comp_names = [n for n in AHL_VARS[10:14]]
        params = dict(heads.named_parameters())
        g_ours = torch.autograd.grad(loss_ours, [params[n] for n in comp_names])
        comp_ours = max(float(gr.abs().max()) for gr in g_ours)
        rows.append(Row("AHL(DRA) composite conv+BN gradient, official init", None, "info",
                        f"largest entry: official {comp_official:.3g}, ours with the same init {comp_ours:.3g}: "
                        "with BN weight = bias = 0 the branch is dead on both sides; ours starts from the base "
                        "model's trained BN instead"))  # fmt: skip
    return rows


class SamplerLog:
    """Records the batches every official BalancedBatchSampler yields, per sampler, in order."""

    def __init__(self, cls):
        self.cls, self.samplers, self.batches = cls, [], {}

    def install(self, p: Patches) -> None:
        init, it = self.cls.__init__, self.cls.__iter__
        log = self

        def __init__(sampler, *args, **kwargs):
            init(sampler, *args, **kwargs)
            log.samplers.append(sampler)
            log.batches[id(sampler)] = []

        def __iter__(sampler):
            run = []
            log.batches[id(sampler)].append(run)
            for batch in it(sampler):
                run.append(list(batch))
                yield batch

        p.setattr(self.cls, "__init__", __init__)
        p.setattr(self.cls, "__iter__", __iter__)


def _task_data(g: torch.Generator, n_normal: int, n_seen: int, n_pseudo: int):
    parts = [features(n_normal, g), features(n_seen, g, 0.5), features(n_pseudo, g, 0.25)]
    scales = [torch.cat([q[s] for q in parts]) for s in range(2)]
    labels = [0] * n_normal + [1] * n_seen + [2] * n_pseudo
    return [list(scales[0].numpy()), list(scales[1].numpy()), labels], scales, torch.tensor(labels)


def ahl_meta(root: Path) -> list[Row]:
    """One official AHL epoch (Trainer.training, psi off) on given tensors vs ours with the same batches."""
    rows = []
    n_tasks, steps, update_step, batch = 2, 2, 3, 12
    with Patches() as p:
        main, dra_ahl, _plain, _aux, layers, utlis, _dl = _ahl_modules(root, p)
        sampler_log = SamplerLog(main.BalancedBatchSampler)
        sampler_log.install(p)
        clip_log = []
        clip = torch.nn.utils.clip_grad_norm_

        def recording_clip(parameters, max_norm, *args, **kwargs):
            parameters = list(parameters)
            clip_log.append(([q.grad.detach().clone() for q in parameters], max_norm))
            return clip(parameters, max_norm, *args, **kwargs)

        p.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
        printed = []
        p.setattr(main, "print", lambda *a, **k: printed.append(a))

        g = torch.Generator().manual_seed(5)
        args = SimpleNamespace(model_name="DRA", total_heads=4, criterion="deviation", cuda=False, nRef=N_REF,
                               n_scales=2, workers=0, batch_size=batch, steps_per_epoch=steps, update_step=update_step,
                               nAnomaly=4, auxiliary=False, episode_num=n_tasks)  # fmt: skip
        p.setattr(main, "args", args)  # Trainer.training reads the script's global ``args`` for the query sampler
        torch.manual_seed(0)
        official = dra_ahl.DRA(args)
        ref = features(N_REF, g)
        support = [_task_data(g, 10, 2, 5) for _ in range(n_tasks)]
        query = [_task_data(g, 10, 2, 5) for _ in range(n_tasks)]
        # shift the holistic output positive on both sides so that the missing |.| (row above) does not mask the
        # rest of the comparison
        with torch.no_grad():
            pool = torch.cat([s[1][0] for s in support + query] + [ref[0]])
            hidden = torch.relu(F.linear(pool.mean(dim=(2, 3)), official.vars[0], official.vars[1]))
            raw = F.linear(hidden, official.vars[2], official.vars[3])
            official.vars[3] += 1.0 - float(raw.min())
        heads = ours.DRAHeads(C, topk=0.1, margin=5.0, official_geometry=True)
        copy_ahl_vars_to_ours(official, heads)
        heads.train()

        trainer = object.__new__(main.Trainer)
        trainer.args, trainer.model = args, official
        trainer.criterion = layers.DeviationLoss()
        trainer.ref = itertools.cycle([{"image": ref[0], "image_scale": ref[1]}])
        trainer.support_loader = [s[0] for s in support]
        trainer.query_loader = [q[0] for q in query]
        trainer.optimizer = torch.optim.Adam(official.parameters(), lr=0.002, weight_decay=1e-4)
        trainer.scheduler = torch.optim.lr_scheduler.StepLR(trainer.optimizer, step_size=10, gamma=0.1)
        np.random.seed(0)
        random.seed(0)
        theta0 = [v.detach().clone() for v in official.parameters()]
        with standard_reference(layers):
            # the inner step alone: official train_unit + autograd.grad + phi = theta - 2e-4 grad
            x, y = support[0][1], support[0][2]
            idx = torch.arange(batch)
            _o, loss_s = trainer.train_unit(x[0][idx], x[1][idx], y[idx], var=official.parameters())
            grad = torch.autograd.grad(loss_s, list(official.parameters()))
            phi_official = [v - 0.0002 * gr for v, gr in zip(official.parameters(), grad)]
            trainer.ref = itertools.cycle([{"image": ref[0], "image_scale": ref[1]}])
            trainer.training(0)
        loss_f = next(a[1] for a in printed if a and a[0] == "epoch_loss:")

    reference = [r.mean(0) for r in ref]
    theta = dict(heads.named_parameters())
    buffers = dict(heads.named_buffers())
    names = list(AHL_VARS)
    phi, losses = ours.adapt(heads, theta, buffers, [([s[idx] for s in x], y[idx])], reference, 2e-4, True)
    d = maxdiff(loss_s, losses[0])
    rows.append(Row("AHL inner step: support loss", d, verdict(d, float(loss_s.detach())),
                    f"official train_unit {float(loss_s.detach()):.5f} vs ours {float(losses[0]):.5f}"))  # fmt: skip
    d = max(maxdiff(phi_official[k].reshape(phi[n].shape), phi[n]) for k, n in enumerate(names))
    rows.append(Row("AHL inner step: adapted parameters phi", d, verdict(d), "phi = theta - 2e-4 * grad, all 14 tensors"))

    # the batches the official epoch drew: per task a support sampler and a query sampler
    samplers = sampler_log.samplers
    assert len(samplers) == 2 * n_tasks, len(samplers)
    total = 0.0
    used_support, drawn_support = 0, 0
    for i in range(n_tasks):
        s_runs = sampler_log.batches[id(samplers[2 * i])]
        q_runs = sampler_log.batches[id(samplers[2 * i + 1])]
        # round 0: every step restarts from theta (phi = theta - lr * grad(theta)), so only its last batch counts;
        # rounds 1..update_step-1 take first-order steps from phi; the loss is the sum over the last round's queries
        sequence = [s_runs[0][-1]] + [b for run in s_runs[1:] for b in run]
        used_support += len(sequence)
        drawn_support += sum(len(run) for run in s_runs)
        _, xs, ys = support[i]
        _, xq, yq = query[i]
        batches = [([s[b] for s in xs], ys[b]) for b in sequence]
        phi_i, _ = ours.adapt(heads, theta, buffers, batches, reference, 2e-4, True)
        for b in q_runs[-1]:
            total = total + ours.query_loss(heads, phi_i, buffers, [s[b] for s in xq], yq[b], reference)
    total = total / n_tasks
    d = maxdiff(loss_f, total)
    rows.append(Row("AHL outer (query) loss of one epoch", d, verdict(d, float(total)),
                    f"official loss_f {float(loss_f):.5f} = sum over {steps} query batches and {n_tasks} tasks / T; "
                    "ours fed the same batches"))  # fmt: skip
    grads = torch.autograd.grad(total, [theta[n] for n in names])
    pre_official = clip_log[-1][0]
    d = max(maxdiff(pre_official[k].reshape(gr.shape), gr) for k, gr in enumerate(grads))
    norm_official = math.sqrt(sum(float((q**2).sum()) for q in pre_official))
    rows.append(Row("AHL meta-gradient (second order through the first inner step)", d,
                    verdict(d, max(float(q.abs().max()) for q in pre_official), 1e-4),
                    f"pre-clip norm {norm_official:.4f}; theta unchanged by training(): "
                    f"{max(maxdiff(a, b) for a, b in zip(theta0, official.parameters())) == 0}"))  # fmt: skip
    rows.append(Row("AHL inner steps per task: official vs ours", None, "info",
                    f"official: {drawn_support // n_tasks} support batches drawn, {used_support // n_tasks} steps count "
                    f"(round 0 restarts from theta at every batch: 1 + (U-1)*S = {1 + (update_step - 1) * steps}); "
                    f"fresh batches in every round. Ours: U*S = {update_step * steps} steps over S = {steps} batches "
                    "drawn once and reused in every round"))  # fmt: skip

    # ours as configured (query_batches = 1, mean) vs the official sum over S query batches
    one = 0.0
    for i in range(n_tasks):
        s_runs = sampler_log.batches[id(samplers[2 * i])]
        q_runs = sampler_log.batches[id(samplers[2 * i + 1])]
        _, xs, ys = support[i]
        _, xq, yq = query[i]
        sequence = [b for run in s_runs[:1] for b in run] * update_step  # ours: the same S batches, U rounds
        phi_i, _ = ours.adapt(heads, theta, buffers, [([s[b] for s in xs], ys[b]) for b in sequence], reference, 2e-4, True)
        b = q_runs[-1][0]
        one = one + ours.query_loss(heads, phi_i, buffers, [s[b] for s in xq], yq[b], reference) / n_tasks
    g_one = torch.autograd.grad(one, [theta[n] for n in names])
    norm_one = math.sqrt(sum(float((q**2).sum()) for q in g_one))
    flat_o = torch.cat([q.flatten() for q in pre_official])
    flat_1 = torch.cat([q.flatten() for q in g_one])
    cos = float(F.cosine_similarity(flat_o, flat_1, dim=0))
    rows.append(Row("AHL outer loss scale: official sum of S query batches vs ours 1 batch", None, "info",
                    f"S = {steps}: official loss {float(loss_f):.4f}, norm {norm_official:.4f}; ours (query_batches=1, "
                    f"w = 1/T) loss {float(one):.4f}, norm {norm_one:.4f}; cosine {cos:.3f}. Both are clipped to "
                    "norm 1.0 before Adam; official x ~S in loss and gradient (x~S*T after epoch 7, when the "
                    "1/T is dropped)"))  # fmt: skip
    return rows


def ahl_devnet(root: Path) -> list[Row]:
    """AHL(DevNet)'s loss (official main.Trainer.train_unit, DevNet branch) vs ours on the same batch."""
    with Patches() as p:
        main, _dra, plain, _aux, layers, *_ = _ahl_modules(root, p)
        g = torch.Generator().manual_seed(6)
        torch.manual_seed(0)
        args = SimpleNamespace(model_name="DevNet", n_scales=2, criterion="deviation")
        official = plain.Plain_Net(args)
        heads = ours.DevNetHeads(C, topk=0.1, margin=5.0)
        with torch.no_grad():
            heads.seen_head.conv.weight.copy_(official.vars[0])
            heads.seen_head.conv.bias.copy_(official.vars[1])
        _, x, y = _task_data(g, 8, 4, 4)
        trainer = object.__new__(main.Trainer)
        trainer.args, trainer.model, trainer.criterion = args, official, layers.DeviationLoss()
        with standard_reference(layers):
            out, loss_official = trainer.train_unit(x[0], x[1], y.clone(), var=official.parameters())
        mine = heads(x)
        d_scores = maxdiff(out[:, 0], mine[:, 0])
        loss_ours = heads.loss(mine, y)
        rows = [Row("AHL(DevNet) head scores", d_scores, verdict(d_scores), "Plain_Net.forward vs DevNetHeads")]
        rows.append(Row("AHL(DevNet) loss", maxdiff(loss_official, loss_ours), "differs" if maxdiff(loss_official, loss_ours) > 1e-4 else "equal",
                        f"official {float(loss_official):.4f} = L(seen masked) + L(pseudo masked): the masked samples' "
                        f"scores are replaced by their label 1 (a constant 4 each) and the normals count twice; "
                        f"ours {float(loss_ours):.4f} = one deviation loss, pseudo and seen both anomalous"))  # fmt: skip
    return rows


def psi(root: Path) -> list[Row]:
    rows = []
    with Patches() as p:
        _main, _dra, _plain, aux, *_ = _ahl_modules(root, p)
        torch.manual_seed(0)
        official = aux.AUX_Model()
        estimator = ours.GeneralisationEstimator(6, 5)
        state = {k.replace("fc.", "head."): v for k, v in official.state_dict().items()}
        estimator.load_state_dict(state)
        g = torch.Generator().manual_seed(7)
        seq = torch.randn(40, 5, 6, generator=g) * 3
        official.eval(), estimator.eval()
        with torch.no_grad():
            torch.manual_seed(1)
            random_state = official(seq)
            mine = estimator(seq)

            class ZeroRand:
                def __getattr__(self, name):
                    return getattr(torch, name)

                @staticmethod
                def rand(*size, **kwargs):
                    return torch.zeros(*size, **kwargs)

            p.setattr(aux, "torch", ZeroRand())
            zero_state = official(seq)
        d = maxdiff(random_state, mine)
        rows.append(Row("psi forward (eval), official random initial state", d, verdict(d),
                        "AUX_Model draws h0, c0 ~ U[0, 1) on every call; ours zero"))  # fmt: skip
        d = maxdiff(zero_state, mine)
        rows.append(Row("psi forward (eval), official initial state set to 0", d, verdict(d),
                        "same LSTM(6, 6, 2 layers, bidirectional) + ReLU + Linear(12, 6) weights"))  # fmt: skip
        official.train(), estimator.train()
        torch.manual_seed(2)
        with torch.no_grad():
            train_out = official(seq)
            mine_train = estimator(seq)
        d = maxdiff(train_out, mine_train)
        rows.append(Row("psi forward (train mode), initial state 0", d, verdict(d),
                        "official LSTM dropout=0.5 between its layers (nn.LSTM(..., dropout=0.5)); ours none"))  # fmt: skip
    return rows


def psi_weights(root: Path) -> list[Row]:
    """Task weights from the same predicted scores: official get_reward + its combination vs ours."""
    with Patches() as p:
        main, *_ = _ahl_modules(root, p)
        trainer = object.__new__(main.Trainer)
        trainer.mse_loss = torch.nn.MSELoss()
        rng = np.random.default_rng(8)
        n_tasks = 6
        labels = np.array([0] * 60 + [1] * 10 + [2] * 30)
        quality = np.linspace(0.5, 3.0, n_tasks)  # task k's scores deviate more from the labels
        target = (labels != 0).astype(float)
        pred = torch.tensor(target[:, None] + rng.normal(0, 1, (len(labels), n_tasks)) * quality, dtype=torch.float32)
        # the official combination (main.py Trainer.training): per task k the three MSEs summed over the T query
        # sets and divided by the summed counts, r_k = -(0.5 n + 0.5 p + 1 a), weights 0.5 + 0.5 softmax(r)
        r_official = []
        for k in range(n_tasks):
            parts = np.zeros(3)
            counts = np.zeros(3)
            for _ in range(n_tasks):  # every task's query set: here the same pool for all
                rn, rp, ra, nn_, na, np_ = trainer.get_reward(pred, list(labels), k=k)
                parts += [float(rn), float(rp), float(ra)]
                counts += [nn_, np_, na]
            r_official.append(-(0.5 * parts[0] / counts[0] + 0.5 * parts[1] / counts[1] + parts[2] / counts[2]))
        soft = np.exp(r_official) / np.exp(r_official).sum()
        w_official = 0.5 + 0.5 * soft
    cost = np.where(labels == 1, 1.0, 0.5)[:, None].repeat(n_tasks, 1)
    r_ours = ours.rewards(pred.numpy(), target.astype(np.float32), cost, np.ones_like(cost, dtype=bool))
    w_ours = ours.weights_from_rewards(r_ours)
    return [Row("psi task weights from the same predictions", float(np.abs(w_official - w_ours).max()), "info",
                f"tasks with error std {quality.round(2).tolist()}: official weights {np.round(w_official, 4).tolist()} "
                f"(max/min {w_official.max() / w_official.min():.4f}; rewards {np.round(r_official, 5).tolist()}, "
                f"MSE divided by the sample count again); ours softmax(-r) {np.round(w_ours, 4).tolist()} "
                f"(max/min {w_ours.max() / w_ours.min():.2f})")]  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# Pseudo anomalies and augmentation


class Probe:
    """Stands in for a PIL image in the official CutPaste/CutMix classes and records the boxes they use."""

    def __init__(self, image):
        self.image, self.crops, self.pastes = image, [], []

    @property
    def size(self):
        return self.image.size

    def crop(self, box):
        self.crops.append(box)
        return self.image.crop(box)

    def copy(self):
        return self

    def paste(self, patch, box):
        self.pastes.append(box)


def _box_stats(boxes, h, w):
    area = np.array([(b[2] - b[0]) * (b[3] - b[1]) / (h * w) for b in boxes])
    aspect = np.array([(b[2] - b[0]) / max(b[3] - b[1], 1) for b in boxes])
    return area, aspect


def _fmt(x):
    return f"mean {x.mean():.4f} [{x.min():.4f}, {x.max():.4f}]"


def generators(dra_root: Path, ahl_root: Path, n: int = 2000) -> list[Row]:
    from PIL import Image
    from scipy.stats import ks_2samp

    rows = []
    size = 128
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8))
    rng = np.random.default_rng(0)
    mine = [ours.patch_size(size, size, rng) for _ in range(n)]
    area_ours = np.array([h * w / size**2 for h, w in mine])
    aspect_ours = np.array([w / h for h, w in mine])
    random.seed(0)
    torch.manual_seed(0)
    with Patches():
        (cm_dra,) = import_official(dra_root, "datasets.cutmix")
        (mvtec_dra,) = import_official(dra_root, "datasets.mvtecad")
        cp_ahl, cm_ahl = import_official(ahl_root, "datasets.cutpaste", "datasets.cutmix")
        sources = {
            "CutPaste (AHL datasets/cutpaste.py)": lambda probe: cp_ahl.CutPaste()(probe),
            "DRA pseudo anomaly (DRA datasets/cutmix.py, same image)": lambda probe: cm_dra.CutMix()(probe),
            "CutMix (AHL datasets/cutmix.py, another image)": lambda probe: cm_ahl.CutMix(a_img=probe)(probe),
        }
        for name, call in sources.items():
            probe = Probe(img)
            for _ in range(n):
                call(probe)
            area, aspect = _box_stats(probe.crops, size, size)
            ks_area = ks_2samp(area, area_ours).statistic
            ks_aspect = ks_2samp(np.log(aspect), np.log(aspect_ours)).statistic
            rows.append(Row(f"patch area and aspect: {name}", max(ks_area, ks_aspect), "info",
                            f"{n} draws each at {size} px; area official {_fmt(area)}, ours {_fmt(area_ours)}; "
                            f"aspect w/h official {_fmt(aspect)}, ours {_fmt(aspect_ours)}; diff = KS distance"))  # fmt: skip
        jitter = cp_ahl.CutPaste().colorJitter
        jit_cm = cm_ahl.CutMix(a_img=None).colorJitter
        rows.append(Row("colour jitter of the patch", None, "info",
                        f"official CutPaste and CutMix: ColorJitter brightness {jitter.brightness}, contrast "
                        f"{jitter.contrast}, saturation {jitter.saturation}, hue {jitter.hue} (AHL CutMix: "
                        f"{'same' if jit_cm is not None else 'none'}); ours: cutpaste and cutmix {ours.COLOR_JITTER} on all "
                        "four"))  # fmt: skip
        fake = SimpleNamespace(args=SimpleNamespace(img_size=size))
        pseudo = mvtec_dra.MVTecAD.transform_pseudo(fake)
        train_tf = mvtec_dra.MVTecAD.transform_train(fake)
        rot = next(t for t in pseudo.transforms if type(t).__name__ == "RandomRotation")
        rot_train = next(t for t in train_tf.transforms if type(t).__name__ == "RandomRotation")
        rows.append(Row("rotation of pseudo anomalies (DRA base training)", None, "info",
                        f"official DRA transform_pseudo: CutMix then RandomRotation{tuple(rot.degrees)} "
                        f"({rot.interpolation.value}) of the whole image; transform_train: "
                        f"RandomRotation{tuple(rot_train.degrees)} ({rot_train.interpolation.value}); ours: "
                        "rotation uniform in [-base.rotation, base.rotation] of every batch image, "
                        "base.rotation_interpolation (default nearest)"))  # fmt: skip
    rows.append(_static_rotation(ahl_root))
    # ours' cached CutPaste/CutMix (features.pseudo_rotation = 180, the default): is the whole image rotated?
    # pixels changed outside the 15 % patch say
    changed = []
    arr = np.asarray(img)
    maker = ours.PseudoAnomalyMaker([arr, np.asarray(img)[::-1].copy()], [arr], rotation=180.0)
    for k in range(200):
        for family in ("cutpaste", "cutmix"):
            made = maker.make(family, 0, np.random.default_rng(k))
            changed.append(float((made != arr).any(axis=2).mean()))
    rotated = np.mean([c > 0.15 for c in changed])
    rows.append(Row("rotation of ours' cached CutPaste/CutMix", None, "info",
                    f"features.pseudo_rotation = 180: {rotated:.0%} of 400 pseudo anomalies change more than the 15 % "
                    f"patch (the whole image is rotated, as in the official feature scripts)"))  # fmt: skip
    rows.append(_rotation_interpolation(dra_root))
    return rows


def _static_rotation(ahl_root: Path) -> Row:
    """The official AHL feature scripts import cv2 and a class their repository lacks (modeling.net.SemiADNet),
    so they cannot be imported; their transform pipelines are read from the source."""
    found = []
    for script in ("cutpaste_feature_extraction.py", "cutmix_feature_extraction.py", "DREAM_feature_extraction.py"):
        tree = ast.parse((ahl_root / "datasets" / script).read_text())
        calls = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                fn = ast.unparse(node.func)
                if fn.endswith(("RandomRotation", "Affine", "CutPaste", "CutMix")):
                    calls.append(ast.unparse(node))
        found.append(f"{script}: {', '.join(sorted(set(calls)))}")
    return Row("official AHL feature-script pipelines (read from source)", None, "info", "; ".join(found))


def _rotation_interpolation(dra_root: Path) -> Row:
    from PIL import Image
    import skimage.data

    image = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((128, 128)))
    with Patches() as p:
        (mvtec_dra,) = import_official(dra_root, "datasets.mvtecad")
        tf = mvtec_dra.MVTecAD.transform_train(SimpleNamespace(args=SimpleNamespace(img_size=128)))
        rot = next(t for t in tf.transforms if type(t).__name__ == "RandomRotation")
        p.setattr(type(rot), "get_params", staticmethod(lambda degrees: 30.0))
        official = np.asarray(rot(Image.fromarray(image)))

    class Fixed:
        @staticmethod
        def uniform(a, b):
            return 30.0

    mine = ours.rotate(image[None], 180.0, Fixed())[0]
    inside = np.zeros(image.shape[:2], bool)
    inside[32:96, 32:96] = True  # away from the border, where the fill differs only by interpolation
    d = float(np.abs(official.astype(float) - mine.astype(float))[inside].mean())
    return Row("rotation interpolation (30 degrees, 128 px photo)", d, "info",
               f"official RandomRotation {rot.interpolation.value} vs ours (default nearest): mean |diff| {d:.2f} grey levels "
               "in the centre (of 255)")  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# Base training loop and samplers (official DRA/train.py, DevNet/train.py, dataloaders/utlis.py)


def samplers(dra_root: Path) -> list[Row]:
    (utlis,) = import_official(dra_root, "dataloaders.utlis")
    n_normal, n_anom, batch, steps = 80, 5, 24, 10
    dataset = SimpleNamespace(normal_idx=np.arange(n_normal), outlier_idx=np.arange(n_normal, n_normal + n_anom))
    cfg = SimpleNamespace(batch_size=batch, nAnomaly=n_anom, steps_per_epoch=steps)
    np.random.seed(0)
    with Patches() as p:
        torch2(p)
        sampler = utlis.BalancedBatchSampler(cfg, dataset)
        official = [b for b in sampler]
    dup_off = np.mean([len(b[:16]) - len(set(b[:16])) for b in official])
    cover_off = len({i for b in official for i in b[:16]})
    normals = np.repeat(np.arange(n_normal, dtype=np.uint8)[:, None, None, None], 4, 1).repeat(4, 2).repeat(3, 3)
    anomalies = normals[:n_anom] + 100
    config = ours.BaseConfig(model="dra", batch_size=batch, steps_per_epoch=steps, pseudo_prob=0.0, rotation=0.0)
    mine = ours.BatchSampler(normals, anomalies, config, np.random.default_rng(0))
    drawn = [mine()[0][:16, 0, 0, 0].tolist() for _ in range(steps)]
    dup_ours = np.mean([len(b) - len(set(b)) for b in drawn])
    cover_ours = len({i for b in drawn for i in b})
    return [Row("base batch sampler: normals per epoch", None, "info",
                f"{steps} batches x 16 normal slots from {n_normal} normals: official permutation cycles "
                f"(BalancedBatchSampler) repeat {dup_off:.2f} per batch and cover {cover_off}/{n_normal}; ours "
                f"(base.sampling = {config.sampling}) repeat {dup_ours:.2f} per batch and cover {cover_ours}/{n_normal}")]


def base_loops(dra_root: Path, devnet_root: Path, backbone: str, pretrained: str, epochs: int = 12) -> list[Row]:
    """Run the official Trainers' epochs (1 step each) on a tiny dataset and record learning rate and clipping;
    the same for ours."""
    from ahl.data.embedded import EmbeddedConfig, build_embedded  # test fixture data, built in a second

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "mvtec"
        build_embedded(root, EmbeddedConfig(image_size=64, n_train=12, n_test_good=4, n_per_defect=4, seed=0))
        classname = sorted(q.name for q in root.iterdir())[0]
        for kind, repo in (("dra", dra_root), ("devnet", devnet_root)):
            lrs, clips = [], []
            with Patches() as p:
                torch2(p)
                sorted_listdir(p)
                train_mod, net = import_official(repo, "train", "modeling.net")
                replace_backbone(p, net, backbone, lambda: ours.backbone_body(backbone, pretrained))
                clip = torch.nn.utils.clip_grad_norm_

                def recording_clip(parameters, max_norm, *a, **k):
                    norm = clip(parameters, max_norm, *a, **k)
                    clips.append((float(norm), max_norm))
                    return norm

                p.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
                args = SimpleNamespace(
                    batch_size=6, steps_per_epoch=1, epochs=epochs, cont_rate=0.0, test_threshold=0, test_rate=0.0,
                    dataset="mvtecad", ramdn_seed=0, workers=0, dataset_root=str(root), classname=classname,
                    img_size=64, nAnomaly=2, n_anomaly=2, n_scales=1, backbone=backbone, criterion="deviation",
                    topk=0.1, know_class=None, pretrain_dir=None, total_heads=4, nRef=2, outlier_root=None,
                    cuda=False, experiment_dir=tmp,
                )  # fmt: skip
                torch.manual_seed(0), np.random.seed(0), random.seed(0)
                trainer = train_mod.Trainer(args)
                step = trainer.optimizer.step

                def recording_step(*a, **k):
                    lrs.append(trainer.optimizer.param_groups[0]["lr"])
                    return step(*a, **k)

                trainer.optimizer.step = recording_step
                for epoch in range(epochs):
                    (trainer.training if kind == "dra" else trainer.train)(epoch)
            first_low = next((e for e, lr in enumerate(lrs) if lr < 2e-4 * 0.5), None)
            rows.append(Row(f"{kind} official: learning rate and clipping", None, "info",
                            f"lr 2e-4 -> 2e-5 from epoch {first_low} (0-based; StepLR(10) "
                            f"{'stepped before the epoch' if kind == 'dra' else 'stepped after the epoch'}); "
                            f"clip_grad_norm_(max_norm={clips[0][1] if clips else None}) at {len(clips)}/{len(lrs)} "
                            f"steps, pre-clip norms median {np.median([c[0] for c in clips]):.3g} "
                            f"({np.mean([c[0] > 1.0 for c in clips]):.0%} of steps > 1)"))  # fmt: skip
        # ours
        for kind in ("dra", "devnet"):
            lrs, clips = [], []
            from ahl.data.mvtec import load_images, read_subset

            subset = read_subset(root, classname)
            normals = load_images(subset.root, list(subset.train_good), 64)
            anomalies = load_images(subset.root, [f for fs in subset.anomalies.values() for f in fs][:2], 64)
            step = torch.optim.Adam.step
            clip = torch.nn.utils.clip_grad_norm_

            with Patches() as p:

                def recording_step(self, *a, **k):
                    lrs.append(self.param_groups[0]["lr"])
                    return step(self, *a, **k)

                def recording_clip(parameters, max_norm, *a, **k):
                    norm = clip(parameters, max_norm, *a, **k)
                    clips.append(float(norm))
                    return norm

                p.setattr(torch.optim.Adam, "step", recording_step)
                p.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
                config = ours.BaseConfig(model=kind, epochs=epochs, steps_per_epoch=1, batch_size=6, n_ref=2)
                ours.train_base(normals, anomalies, ours.BackboneConfig(backbone, pretrained, 64, 1), config,
                                seed=0, device=torch.device("cpu"))  # fmt: skip
            first_low = next((e for e, lr in enumerate(lrs) if lr < 2e-4 * 0.5), None)
            rows.append(Row(f"{kind} ours: learning rate and clipping", None, "info",
                            f"lr 2e-4 -> 2e-5 from epoch {first_low} (StepLR(10) stepped {'before' if kind == 'dra' else 'after'} the epoch); "
                            f"clip_grad_norm_ called at {len(clips)}/{len(lrs)} steps"))  # fmt: skip
    return rows


# --------------------------------------------------------------------------------------------------------------
# HADG clustering on a real feature cache


def kmeans(ahl_root: Path, cache_dir: Path | None, seed: int = 0) -> list[Row]:
    if cache_dir is None:
        return [Row("k-means: official flattened scale-0 map vs ours", None, "info",
                    "skipped: pass --cache DIR (a features stage output, e.g. from run.py --keep)")]  # fmt: skip
    from sklearn.metrics import adjusted_rand_score

    cache = ours.load_cache(cache_dir)
    x0 = np.asarray(cache.train_normal.scales[0], dtype=np.float32)
    with Patches() as p:
        _main, _dra, _plain, _aux, _layers, _utlis, dl = _ahl_modules(ahl_root, p)
        fake = SimpleNamespace(args=SimpleNamespace(auxiliary=False, extract=True, cluster_num=3, ramdn_seed=seed))
        train_set = [{"label": 0, "image": f} for f in x0]
        official, _ = dl.initDataloader.get_cluster(fake, train_set, [])
        kmeans_n_init_10(p, dl)  # the same call under scikit-learn's default of its time (a version shim)
        official10, _ = dl.initDataloader.get_cluster(fake, train_set, [])
    rows = []
    for off, note, how, what in (
        (official, "", "flattened", "flattened scale-0 map, the default"),
        (official10, ", KMeans n_init=10 as in scikit-learn < 1.4", "flattened", "flattened scale-0 map, the default"),
        (official10, ", KMeans n_init=10 as in scikit-learn < 1.4", "pooled", "pooled, both scales"),
    ):
        a = np.zeros(len(x0), int)
        for k, members in enumerate(off):
            a[members] = k
        vectors = ours.cluster_features(cache.train_normal.scales, how)
        mine = ours.cluster_normals(vectors, ours.HADGConfig(min_cluster_size=1, features=how), seed)
        b = np.zeros(len(x0), int)
        for k, members in enumerate(mine):
            b[members] = k
        rows.append(Row(f"k-means clusters: official (flattened scale-0 map{note}) vs ours ({what})",
                        adjusted_rand_score(a, b), "info",
                        f"{cache_dir}: {len(x0)} normals, map {tuple(x0.shape[1:])}; official sizes "
                        f"{sorted(len(c) for c in off)}, ours {sorted(len(c) for c in mine)}; diff = adjusted "
                        "Rand index (1 = the same partition)"))  # fmt: skip
    return rows


# --------------------------------------------------------------------------------------------------------------


def write_table(rows: list[Row], out: Path | None) -> str:
    def fmt(d):
        return "" if d is None else f"{d:.3g}"

    lines = ["| component | max abs diff | verdict | evidence |", "|---|---|---|---|"]
    lines += [f"| {r.component} | {fmt(r.diff)} | {r.verdict} | {r.note.replace('|', '/')} |" for r in rows]
    text = "\n".join(lines) + "\n"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".csv":
            with open(out, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["component", "max_abs_diff", "verdict", "evidence"])
                w.writerows([r.component, "" if r.diff is None else r.diff, r.verdict, r.note] for r in rows)
        else:
            out.write_text(text)
    return text


SECTIONS = ("dra", "loss", "image", "ahl", "psi", "generators", "base", "kmeans")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-dra", help="checkout of https://github.com/Choubo/DRA")
    parser.add_argument("--official-devnet", help="checkout of https://github.com/Choubo/deviation-network-image")
    parser.add_argument("--official-ahl", help="checkout of https://github.com/mala-lab/AHL")
    parser.add_argument("--backbone", default="efficientnet_lite0", help="efficientnet_lite0 | resnet18")
    parser.add_argument("--pretrained", default="imagenet", help="imagenet | none (random weights)")
    parser.add_argument("--cache", type=Path, help="a feature cache (cache/features) for the k-means row")
    parser.add_argument("--only", nargs="*", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--out", type=Path, help="write the table here (.md or .csv)")
    args = parser.parse_args(argv)
    try:
        dra = check_checkout("dra", args.official_dra)
        devnet = check_checkout("devnet", args.official_devnet)
        ahl = check_checkout("ahl", args.official_ahl)
    except MissingCheckout as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(min(2, torch.get_num_threads()))
    wanted = set(args.only or SECTIONS)
    sections = [
        ("dra", lambda: dra_heads(dra)),
        ("loss", lambda: deviation_losses({"DRA": dra, "DevNet": devnet, "AHL": ahl})),
        ("image", lambda: image_level("dra", dra, args.backbone, args.pretrained)
         + image_level("devnet", devnet, args.backbone, args.pretrained)),
        ("ahl", lambda: ahl_heads(ahl) + ahl_meta(ahl) + ahl_devnet(ahl)),
        ("psi", lambda: psi(ahl) + psi_weights(ahl)),
        ("generators", lambda: generators(dra, ahl) + samplers(dra)),
        ("base", lambda: base_loops(dra, devnet, args.backbone, args.pretrained)),
        ("kmeans", lambda: kmeans(ahl, args.cache)),
    ]  # fmt: skip
    rows: list[Row] = []
    for name, run in sections:
        if name in wanted:
            start = time.perf_counter()
            rows += run()
            print(f"[{name}: {time.perf_counter() - start:.1f} s]", file=sys.stderr)
    print(write_table(rows, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
