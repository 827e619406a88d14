"""Base-model training (DRA or DevNet): the whole backbone is fine-tuned with the heads' deviation losses.

Batches are balanced as the model's spec says (ahl.heads.ModelSpec): DRA uses 2/3 normal slots (each turned into
a same-image CutPaste pseudo anomaly with probability ``pseudo_prob``) and 1/3 seen anomalies, plus ``n_ref``
reference normals whose mean feature feeds the composite head; DevNet uses half normals, half seen anomalies.
Random rotation augments every image.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from ahl.augment import cutpaste
from ahl.backbones import to_input
from ahl.config import at_least, positive
from ahl.errors import UserError
from ahl.heads import NORMAL, PSEUDO, SEEN, get_model
from ahl.model import AnomalyModel, BackboneConfig, Checkpoint, build_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaseConfig:
    model: str = "dra"  # "dra" or "devnet"
    epochs: int = 30
    steps_per_epoch: int = 20
    batch_size: int = 48
    lr: float = 2e-4
    weight_decay: float = 1e-5
    lr_step: int = 10  # StepLR(step_size=lr_step, gamma=lr_gamma), stepped per epoch
    lr_gamma: float = 0.1
    n_ref: int = 5  # DRA: reference normals per batch for the composite head
    topk: float = 0.1  # fraction of positions averaged by the patch heads
    margin: float = 5.0  # deviation-loss margin a
    pseudo_prob: float = 0.5  # DRA: probability that a normal slot becomes a pseudo anomaly
    rotation: float = 180.0  # random rotation in [-rotation, rotation] degrees

    def __post_init__(self) -> None:
        get_model(self.model)
        for name in ("epochs", "steps_per_epoch", "batch_size", "lr", "n_ref", "topk", "margin", "lr_step", "lr_gamma"):
            positive(f"base.{name}", getattr(self, name))
        for name in ("weight_decay", "rotation"):
            at_least(f"base.{name}", getattr(self, name), 0)
        if self.topk > 1:
            raise UserError(f"params.yaml: base.topk = {self.topk} is a fraction of positions: use a value in (0, 1]")
        if not 0 <= self.pseudo_prob <= 1:
            raise UserError(f"params.yaml: base.pseudo_prob = {self.pseudo_prob} is a probability: use [0, 1]")
        if self.batch_size < 4:
            positive("base.batch_size - 3", self.batch_size - 3)


def _rotate(images: np.ndarray, max_degrees: float, rng: np.random.Generator) -> np.ndarray:
    if max_degrees <= 0:
        return images
    out = np.empty_like(images)
    for i, img in enumerate(images):
        angle = float(rng.uniform(-max_degrees, max_degrees))
        t = torch.from_numpy(img).permute(2, 0, 1)
        out[i] = TF.rotate(t, angle, interpolation=TF.InterpolationMode.BILINEAR).permute(1, 2, 0).numpy()
    return out


class BatchSampler:
    """Balanced training batches drawn with one seeded numpy Generator."""

    def __init__(self, normals: np.ndarray, anomalies: np.ndarray, config: BaseConfig, rng: np.random.Generator):
        self.normals, self.anomalies, self.config, self.rng = normals, anomalies, config, rng

    def __call__(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(images (B, H, W, 3) uint8, labels (B,), reference images (n_ref, H, W, 3) or None)."""
        cfg, rng = self.config, self.rng
        spec = get_model(cfg.model)
        n_anom = int(cfg.batch_size * spec.anomaly_share)
        n_norm = cfg.batch_size - n_anom
        normal_idx = rng.integers(0, len(self.normals), n_norm)
        images = [self.normals[i] for i in normal_idx]
        labels = [NORMAL] * n_norm
        if spec.pseudo_anomalies:
            for j in range(n_norm):
                if rng.random() < cfg.pseudo_prob:
                    images[j] = cutpaste(images[j], rng)
                    labels[j] = PSEUDO
        anomaly_idx = rng.integers(0, len(self.anomalies), n_anom)
        images += [self.anomalies[i] for i in anomaly_idx]
        labels += [SEEN] * n_anom
        batch = _rotate(np.stack(images), cfg.rotation, rng)
        reference = None
        if spec.uses_reference:
            reference = _rotate(self.normals[rng.integers(0, len(self.normals), cfg.n_ref)], cfg.rotation, rng)
        return batch, np.asarray(labels, dtype=np.int64), reference


def train_step(
    model: AnomalyModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    reference_images: torch.Tensor | None,
) -> torch.Tensor:
    """Loss of one batch. DRA's reference images go through the backbone in the same batch (as in DRA)."""
    n_ref = 0 if reference_images is None else len(reference_images)
    x = images if reference_images is None else torch.cat([reference_images, images])
    feats = model.features(x)
    reference = [f[:n_ref].mean(dim=0) for f in feats] if n_ref else None
    scores = model.heads([f[n_ref:] for f in feats], reference)
    return model.heads.loss(scores, labels)


@torch.no_grad()
def reference_features(model: AnomalyModel, images: np.ndarray, device: torch.device) -> list[torch.Tensor]:
    """Mean eval-mode feature of the reference normals at every scale: per scale (C, H_s, W_s)."""
    model.eval()
    return [f.mean(dim=0) for f in model.features(to_input(images, device))]


def train_base(
    normals: np.ndarray,
    anomalies: np.ndarray,
    backbone: BackboneConfig,
    config: BaseConfig,
    *,
    seed: int,
    device: torch.device,
    progress: bool = False,
) -> Checkpoint:
    """Train a base model on normal and seen-anomaly images ((N, S, S, 3) uint8 each)."""
    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]):  # head initialisation from the seed, without touching global state
        torch.manual_seed(seed)
        model = build_model(config.model, backbone, topk=config.topk, margin=config.margin).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_step, gamma=config.lr_gamma)
    sampler = BatchSampler(normals, anomalies, config, rng)
    history = []
    for epoch in range(config.epochs):
        model.train()
        start, losses = time.perf_counter(), []
        bar = tqdm(range(config.steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress)
        for _ in bar:
            images, labels, ref = sampler()
            loss = train_step(
                model,
                to_input(images, device),
                torch.from_numpy(labels).to(device),
                None if ref is None else to_input(ref, device),
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        scheduler.step()
        # Wall times go to the log only: the checkpoint must be byte-identical for the same params and seed,
        # so that DVC sees an unchanged output and skips the stages after it.
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses))})
        log.info("epoch %d/%d loss %.4f (%.1f s)", epoch + 1, config.epochs, history[-1]["loss"], time.perf_counter() - start)

    # A fixed reference set for scoring: n_ref normals chosen with the seed, features in eval mode.
    ref_idx = np.sort(rng.choice(len(normals), size=min(config.n_ref, len(normals)), replace=False))
    reference = reference_features(model, normals[ref_idx], device)
    meta = {
        "model": config.model,
        "backbone": asdict(backbone),
        "topk": config.topk,
        "margin": config.margin,
        "base": asdict(config),
        "seed": seed,
        "reference_index": ref_idx.tolist(),
        "history": history,
    }
    model.eval()
    return Checkpoint(model, reference, meta)
