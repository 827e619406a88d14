"""Base-model training (DRA or DevNet): the whole backbone is fine-tuned with the heads' deviation losses.

Batches are balanced as the model's spec says (ahl.models.heads.ModelSpec): DRA uses 2/3 normal slots (each turned into
a same-image CutPaste pseudo anomaly with probability ``pseudo_prob``) and 1/3 seen anomalies, plus ``n_ref``
reference normals whose mean feature feeds the composite head; DevNet uses half normals, half seen anomalies.
Random rotation augments every image. Under torchrun every rank draws the same global batch and trains on its
rows with DDP (ahl/core/distributed.py); the backbone's BatchNorm then normalises each rank's rows on their own (as
DDP does; CPU's gloo has no SyncBatchNorm), so N ranks are not bitwise one process: see docs/hardware.md.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ahl.core.config import at_least, one_of, positive, run_bounds
from ahl.core.distributed import SINGLE, Group
from ahl.core.errors import UserError
from ahl.core.runtime import Runtime, plain, seeded
from ahl.models.backbones import to_input
from ahl.models.base import AnomalyModel, BackboneConfig, Checkpoint, build_model
from ahl.models.heads import model_spec
from ahl.models.labels import NORMAL, PSEUDO, SEEN
from ahl.models.losses import N_DRAWS

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
    rotation_interpolation: str = "nearest"  # official (torchvision RandomRotation's default) | "bilinear"
    grad_clip: float = 1.0  # max norm of the gradient (official DRA and DevNet); 0 = no clipping
    sampling: str = "cycle"  # official: each image once per pass in a fresh permutation | "replace": i.i.d. draws
    deviation_reference: str = "standard"  # dev = s (N(0, 1)'s own mean and std) | "sampled": official draws
    reference_pseudo: float = 0.0  # DRA: probability that a reference image is a pseudo anomaly (official: 0.5)

    def __post_init__(self) -> None:
        model_spec(self.model)
        for name in ("epochs", "steps_per_epoch", "batch_size", "lr", "n_ref", "topk", "margin", "lr_step", "lr_gamma"):
            positive(f"base.{name}", getattr(self, name))
        run_bounds("base", self)
        for name in ("weight_decay", "rotation", "grad_clip"):
            at_least(f"base.{name}", getattr(self, name), 0)
        one_of("base.rotation_interpolation", self.rotation_interpolation, ("nearest", "bilinear"))
        one_of("base.sampling", self.sampling, ("cycle", "replace"))
        one_of("base.deviation_reference", self.deviation_reference, ("standard", "sampled"))
        if self.topk > 1:
            raise UserError(f"params.yaml: base.topk = {self.topk} is a fraction of positions: use a value in (0, 1]")
        for name in ("pseudo_prob", "reference_pseudo"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"params.yaml: base.{name} = {getattr(self, name)} is a probability: use [0, 1]")
        if self.batch_size < 4:
            positive("base.batch_size - 3", self.batch_size - 3)


class _Indices:
    """Indices into n items: ``cycle`` = consecutive passes, each a fresh permutation (the official samplers'
    generator); ``replace`` = independent draws."""

    def __init__(self, n: int, how: str, rng: np.random.Generator):
        self.n, self.how, self.rng, self.order = n, how, rng, np.zeros(0, np.int64)

    def take(self, k: int) -> np.ndarray:
        if self.how == "replace":
            return self.rng.integers(0, self.n, k)
        while len(self.order) < k:
            self.order = np.concatenate([self.order, self.rng.permutation(self.n)])
        out, self.order = self.order[:k], self.order[k:]
        return out


def _child(rng: np.random.Generator, k: int) -> np.random.Generator:
    """The k-th independent stream derived from rng's seed (SeedSequence's spawn key), without drawing from rng."""
    seq = rng.bit_generator.seed_seq
    return np.random.default_rng(np.random.SeedSequence(seq.entropy, spawn_key=(*seq.spawn_key, k)))


def check_batch(config: BaseConfig, n_normals: int, n_anomalies: int) -> None:
    """A batch larger than the training images only repeats them (and costs its memory): refused in one line."""
    n = n_normals + n_anomalies
    if config.batch_size > n:
        raise UserError(
            f"params.yaml: base.batch_size = {config.batch_size} is more than the {n} training images ({n_normals} "
            f"normals, {n_anomalies} seen anomalies); set it to at most {n} (the papers: 48)"
        )


class BatchSampler:
    """Balanced training batches drawn with one seeded numpy Generator."""

    def __init__(self, normals: np.ndarray, anomalies: np.ndarray, config: BaseConfig, rng: np.random.Generator):
        self.normals, self.anomalies, self.config, self.rng = normals, anomalies, config, rng
        self.normal_idx = _Indices(len(normals), config.sampling, rng)
        self.anomaly_idx = _Indices(len(anomalies), config.sampling, rng)
        self.reference_idx = _Indices(len(normals), config.sampling, rng)
        # The deviation loss's N(0, 1) draws come from their own stream, so that the batches are the same with
        # either base.deviation_reference (a paired ablation).
        self.draw_rng = None
        if config.deviation_reference == "sampled":
            self.draw_rng = _child(rng, 0)
        # Pseudo anomalies among the reference images, from their own stream too (base.reference_pseudo).
        self.reference_rng = None
        if config.reference_pseudo > 0:
            self.reference_rng = _child(rng, 1)

    def __call__(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(images (B, H, W, 3) uint8, labels (B,), reference images (n_ref, H, W, 3) or None)."""
        from ahl.pseudo.augment import cutpaste, rotate  # torchvision: here, so that stage selection starts fast

        cfg, rng = self.config, self.rng
        spec = model_spec(cfg.model)
        n_norm = int(cfg.batch_size * (1 - spec.anomaly_share))  # the official 2B // 3 (DRA), B // 2 (DevNet)
        n_anom = cfg.batch_size - n_norm
        normal_idx = self.normal_idx.take(n_norm)
        images = [self.normals[i] for i in normal_idx]
        labels = [NORMAL] * n_norm
        if spec.pseudo_anomalies:
            for j in range(n_norm):
                if rng.random() < cfg.pseudo_prob:
                    images[j] = cutpaste(images[j], rng)
                    labels[j] = PSEUDO
        images += [self.anomalies[i] for i in self.anomaly_idx.take(n_anom)]
        labels += [SEEN] * n_anom
        batch = rotate(np.stack(images), cfg.rotation, cfg.rotation_interpolation, rng)
        ref_images = None
        if spec.uses_normal_mean:
            refs = self.normals[self.reference_idx.take(cfg.n_ref)]
            if self.reference_rng is not None:  # the official reference loader is a training loader: it turns
                refs = refs.copy()  # normals into CutMix pseudo anomalies with probability 0.5, as in the batch
                for j in range(len(refs)):
                    if self.reference_rng.random() < cfg.reference_pseudo:
                        refs[j] = cutpaste(refs[j], self.reference_rng)
            ref_images = rotate(refs, cfg.rotation, cfg.rotation_interpolation, rng)
        return batch, np.asarray(labels, dtype=np.int64), ref_images

    def gaussian_draws(self, n_heads: int, device) -> torch.Tensor | None:
        """(n_heads, 5,000) fresh N(0, 1) draws for this step's deviation losses (base.deviation_reference:
        sampled, as the official loss draws per call), or None (standard: mean 0 and std 1 exactly)."""
        if self.draw_rng is None:
            return None
        draws = self.draw_rng.standard_normal((n_heads, N_DRAWS), dtype=np.float32)
        return torch.from_numpy(draws).to(device)


def train_step(
    model: AnomalyModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    reference_images: torch.Tensor | None,
    counts: list[int] | None = None,
    draws: torch.Tensor | None = None,
) -> torch.Tensor:
    """Loss of one batch. DRA's reference images go through the backbone in the same batch (as in DRA).
    ``counts``: the rows are a rank's share of a larger batch; ``draws``: the deviation loss's N(0, 1)
    sample per head (ScoringHeads.loss)."""
    n_ref = 0 if reference_images is None else len(reference_images)
    x = images if reference_images is None else torch.cat([reference_images, images])
    feats = model.features(x)
    normal_mean = [f[:n_ref].mean(dim=0) for f in feats] if n_ref else None
    scores = model.heads([f[n_ref:] for f in feats], normal_mean)
    return model.heads.loss(scores, labels, counts, draws)


class _Step(torch.nn.Module):
    """train_step as a module: DDP synchronises the gradients of what its forward ran."""

    def __init__(self, model: AnomalyModel):
        super().__init__()
        self.model = model

    def forward(self, images, labels, reference_images, counts, draws):
        return train_step(self.model, images, labels, reference_images, counts, draws)


def rank_backward(
    step, images: np.ndarray, labels: np.ndarray, ref, runtime: Runtime, group: Group, draws=None
) -> float:
    """Backward of this rank's rows of the global batch through ``step`` (DDP over _Step): each head's mean
    is taken over its samples in the global batch, so that DDP's mean over the ranks (times world) is the
    gradient of the global batch's loss; every rank forwards the reference images. Returns the global loss."""
    rows = group.rows(len(images))
    counts = step.module.model.heads.head_counts(torch.from_numpy(labels))
    device = runtime.device
    with runtime.autocast():
        loss = step(
            runtime.input(to_input(images[rows], device)),
            torch.from_numpy(labels[rows]).to(device),
            None if ref is None else runtime.input(to_input(ref, device)),
            counts,
            draws,
        )
    (loss * group.world).backward()
    return float(group.sum_(loss.detach()))


@torch.no_grad()
def normal_mean_of(
    model: AnomalyModel, images: np.ndarray, device: torch.device, runtime: Runtime | None = None
) -> list[torch.Tensor]:
    """Mean eval-mode feature of the reference normals at every scale: per scale (C, H_s, W_s), float32."""
    runtime = runtime or plain(device)
    model.eval()
    with runtime.autocast():
        feats = model.features(runtime.input(to_input(images, device)))
    return [f.float().mean(dim=0).contiguous() for f in feats]


def _epoch(
    model, sampler, optimizer, config: BaseConfig, runtime: Runtime, desc: str, progress: bool, group=SINGLE, ddp=None
) -> float:
    """One epoch of steps_per_epoch clipped Adam steps; returns the mean loss. Several ranks: ``ddp`` is
    DDP over _Step(model)."""
    model.train()
    losses = []
    device = runtime.device
    bar = tqdm(range(config.steps_per_epoch), desc=desc, disable=not progress)
    for _ in bar:
        images, labels, ref = sampler()
        draws = sampler.gaussian_draws(len(model.heads.head_names), device)
        optimizer.zero_grad(set_to_none=True)
        if group.world > 1:
            losses.append(rank_backward(ddp, images, labels, ref, runtime, group, draws))
        else:
            with runtime.autocast():  # the forward pass only; backward runs in the dtypes autocast chose
                loss = train_step(
                    model,
                    runtime.input(to_input(images, device)),
                    torch.from_numpy(labels).to(device),
                    None if ref is None else runtime.input(to_input(ref, device)),
                    draws=draws,
                )
            loss.backward()
            losses.append(loss.item())
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return float(np.mean(losses))


def _fresh_model(config: BaseConfig, backbone: BackboneConfig, seed: int, device: torch.device, runtime: Runtime):
    """The untrained model on ``device``, its heads initialised from ``seed`` without touching global state."""
    with seeded(seed):
        model = build_model(config.model, backbone, topk=config.topk, margin=config.margin).to(device)
    runtime.prepare(model.backbone)
    if runtime.channels_last:
        model.heads.to(memory_format=torch.channels_last)
    return model


def train_base(
    normals: np.ndarray,
    anomalies: np.ndarray,
    backbone: BackboneConfig,
    config: BaseConfig,
    *,
    seed: int,
    device: torch.device,
    progress: bool = False,
    group: Group = SINGLE,
    runtime: Runtime | None = None,
) -> Checkpoint:
    """Train a base model on normal and seen-anomaly images ((N, S, S, 3) uint8 each). ``group``: this rank
    under torchrun (all ranks return the same weights). ``runtime``: autocast, channels_last, compile."""
    check_batch(config, len(normals), len(anomalies))
    runtime = runtime or plain(device)
    rng = np.random.default_rng(seed)
    model = _fresh_model(config, backbone, seed, device, runtime)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_step, gamma=config.lr_gamma)
    sampler = BatchSampler(normals, anomalies, config, rng)  # on every rank: the same global batches
    ddp = None
    if group.world > 1:
        ddp = DistributedDataParallel(_Step(model), device_ids=[device] if device.type == "cuda" else None)
    step_at_start = model_spec(config.model).lr_step_at_epoch_start
    history = []
    for epoch in range(config.epochs):
        if step_at_start:  # official DRA steps StepLR before each epoch: the rate drops one epoch earlier
            with warnings.catch_warnings():  # torch warns of a step before the optimiser's first: intended here
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                scheduler.step()
        start = time.perf_counter()
        desc = f"epoch {epoch + 1}/{config.epochs}"
        loss = _epoch(model, sampler, optimizer, config, runtime, desc, progress and group.is_main, group, ddp)
        if not step_at_start:
            scheduler.step()
        # Wall times go to the log only: the checkpoint must be byte-identical for the same params and seed,
        # so that DVC sees an unchanged output and skips the stages after it.
        history.append({"epoch": epoch + 1, "loss": loss})
        log.info("epoch %d/%d loss %.4f (%.1f s)", epoch + 1, config.epochs, loss, time.perf_counter() - start)

    # A fixed reference set for scoring: n_ref normals chosen with the seed, features in eval mode.
    ref_idx = np.sort(rng.choice(len(normals), size=min(config.n_ref, len(normals)), replace=False))
    normal_mean = normal_mean_of(model, normals[ref_idx], device, runtime)
    model.to(memory_format=torch.contiguous_format)  # checkpoints hold plain contiguous tensors
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
    return Checkpoint(model, normal_mean, meta)
