"""The base training loop and sampler against the official DRA/train.py, DevNet/train.py and
dataloaders/utlis.py."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from benchmarks.parity import ours
from benchmarks.parity.shims import Patches, import_official, replace_backbone, sorted_listdir, torch2
from benchmarks.parity.unit_checks.helpers import Row


def samplers(dra_root: Path) -> list[Row]:
    """The normals an epoch draws: the official BalancedBatchSampler (dataloaders/utlis.py) vs our BatchSampler."""
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


def _record_clips(p: Patches, clips: list) -> None:
    """clip_grad_norm_ that appends (pre-clip norm, max_norm) to ``clips``, call by call."""
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters, max_norm, *a, **k):
        norm = clip(parameters, max_norm, *a, **k)
        clips.append((float(norm), max_norm))
        return norm

    p.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)


def _first_low_epoch(lrs: list[float]) -> int | None:
    """The first epoch (0-based, one step each) whose learning rate is below half of 2e-4."""
    return next((e for e, lr in enumerate(lrs) if lr < 2e-4 * 0.5), None)


def _official_loop(kind: str, repo: Path, data: Path, classname: str, backbone: str, pretrained: str, epochs: int,
                   tmp: str) -> Row:  # fmt: skip
    """The official Trainer's epochs (1 step each) on the data folder, learning rate and clipping recorded."""
    lrs, clips = [], []
    with Patches() as p:
        torch2(p)
        sorted_listdir(p)
        train_mod, net = import_official(repo, "train", "modeling.net")
        replace_backbone(p, net, backbone, lambda: ours.backbone_body(backbone, pretrained))
        _record_clips(p, clips)
        args = SimpleNamespace(
            batch_size=6, steps_per_epoch=1, epochs=epochs, cont_rate=0.0, test_threshold=0, test_rate=0.0,
            dataset="mvtecad", ramdn_seed=0, workers=0, dataset_root=str(data), classname=classname,
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
    return Row(f"{kind} official: learning rate and clipping", None, "info",
               f"lr 2e-4 -> 2e-5 from epoch {_first_low_epoch(lrs)} (0-based; StepLR(10) "
               f"{'stepped before the epoch' if kind == 'dra' else 'stepped after the epoch'}); "
               f"clip_grad_norm_(max_norm={clips[0][1] if clips else None}) at {len(clips)}/{len(lrs)} "
               f"steps, pre-clip norms median {np.median([c[0] for c in clips]):.3g} "
               f"({np.mean([c[0] > 1.0 for c in clips]):.0%} of steps > 1)")  # fmt: skip


def _our_loop(kind: str, data: Path, classname: str, backbone: str, pretrained: str, epochs: int) -> Row:
    """Our base training (train_base, 1 step an epoch) on the same data, learning rate and clipping recorded."""
    from ahl.data.mvtec import load_images, read_subset

    lrs, clips = [], []
    subset = read_subset(data, classname)
    normals = load_images(subset.root, list(subset.train_good), 64)
    anomalies = load_images(subset.root, [f for fs in subset.anomalies.values() for f in fs][:2], 64)
    step = torch.optim.Adam.step

    with Patches() as p:

        def recording_step(self, *a, **k):
            lrs.append(self.param_groups[0]["lr"])
            return step(self, *a, **k)

        p.setattr(torch.optim.Adam, "step", recording_step)
        _record_clips(p, clips)
        config = ours.BaseConfig(model=kind, epochs=epochs, steps_per_epoch=1, batch_size=6, n_ref=2)
        ours.train_base(normals, anomalies, ours.BackboneConfig(backbone, pretrained, 64, 1), config,
                        seed=0, device=torch.device("cpu"))  # fmt: skip
    return Row(f"{kind} ours: learning rate and clipping", None, "info",
               f"lr 2e-4 -> 2e-5 from epoch {_first_low_epoch(lrs)} (StepLR(10) stepped {'before' if kind == 'dra' else 'after'} the epoch); "
               f"clip_grad_norm_ called at {len(clips)}/{len(lrs)} steps")  # fmt: skip


def base_loops(dra_root: Path, devnet_root: Path, backbone: str, pretrained: str, epochs: int = 12) -> list[Row]:
    """Run the official Trainers' epochs (1 step each) on a tiny dataset and record learning rate and clipping;
    the same for ours."""
    from ahl.data.embedded import EmbeddedConfig, build_embedded  # test fixture data, built in a second

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "mvtec"
        build_embedded(root, EmbeddedConfig(image_size=64, n_train=12, n_test_good=4, n_per_defect=4, seed=0))
        classname = sorted(q.name for q in root.iterdir())[0]
        rows = [_official_loop(kind, repo, root, classname, backbone, pretrained, epochs, tmp)
                for kind, repo in (("dra", dra_root), ("devnet", devnet_root))]  # fmt: skip
        rows += [_our_loop(kind, root, classname, backbone, pretrained, epochs) for kind in ("dra", "devnet")]
    return rows
