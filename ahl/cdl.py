"""Collaborative differentiable learning (AHL section 2) and AHL's training loop on cached features.

theta_g (the shared heads) is adapted to every HADG task by inner gradient steps on its support set (phi_i);
the psi-weighted query losses of the phi_i flow back through the inner steps into one Adam step on theta_g.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from ahl.errors import UserError
from ahl.evaluate import auc_roc_pr
from ahl.estimator import WEIGHTINGS, EstimatorConfig, GeneralisationEstimation, QueryPool
from ahl.features import FeatureCache, FeatureSet
from ahl.hadg import BatchIndex, HADGConfig, Task, cluster_normals, draw_batch, family_variants, make_tasks
from ahl.hadg import pool_features
from ahl.heads import ScoringHeads

log = logging.getLogger(__name__)

Params = dict[str, torch.Tensor]


@dataclass
class AHLConfig:
    epochs: int = 30
    steps_per_epoch: int = 20  # support batches per round of inner steps
    batch_size: int = 48  # 16 normal + 16 seen + 16 pseudo
    inner_lr: float = 2e-4  # plain gradient steps phi <- phi - inner_lr * grad
    update_step: int = 3  # rounds of inner steps over a task's support batches
    # Outer (Adam) steps on theta_g per epoch; each splits the epoch's steps_per_epoch support batches of a task
    # evenly. 1 (default) = the paper/official schedule: per task update_step x steps_per_epoch inner steps, one
    # outer step per epoch. steps_per_epoch = MAML's schedule: update_step inner steps on one support batch per
    # outer step. The inner-step count per epoch is the same; more outer steps cost one query pass each.
    outer_steps_per_epoch: int = 1
    lr: float = 2e-3  # outer Adam on theta_g
    weight_decay: float = 1e-4
    lr_step: int = 10  # StepLR(lr_step, lr_gamma), stepped once per epoch
    lr_gamma: float = 0.1
    grad_clip: float = 1.0  # max norm of the outer gradient
    second_order: bool = True  # second order through the first inner step, first order after; False = FOMAML
    init: str = "base"  # "base": start from the base model's heads; "random": re-initialised (official code)
    history: int = 5  # K epochs psi reads
    psi_lr: float = 2e-3
    psi_wd: float = 1e-3
    psi_steps: int = 10  # Adam steps on psi after every epoch
    pool_pseudo_per_family: int = 32  # pseudo anomalies per family in psi's fixed query pool
    weighting: str = "psi"  # "psi" | "uniform"
    cdl: bool = True  # False: ablation "independent heads averaged" (T heads trained on their own support sets)
    redraw_augmentation: bool = False  # draw one variant ("family@k") of every family per epoch
    # DRA heads only: the official code's composite-head geometry (conv stride 3, no padding), for like-for-like
    # comparisons with it; the weights have the same shapes, so the base model's heads still initialise it.
    official_geometry: bool = False
    query_batches: int = 1  # query batches per task whose mean loss is L_query(phi_i)
    eval_batch_size: int = 64
    hadg: HADGConfig = field(default_factory=HADGConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        positive = (
            "epochs", "steps_per_epoch", "batch_size", "update_step", "outer_steps_per_epoch", "query_batches",
            "eval_batch_size",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"ahl.{name} = {getattr(self, name)}: must be >= 1")
        if self.steps_per_epoch % self.outer_steps_per_epoch:
            raise UserError(
                f"ahl.outer_steps_per_epoch = {self.outer_steps_per_epoch} must divide ahl.steps_per_epoch = "
                f"{self.steps_per_epoch}"
            )
        if self.batch_size < 3:
            raise UserError(f"ahl.batch_size = {self.batch_size}: needs room for normal, seen and pseudo samples")
        if self.init not in ("base", "random"):
            raise UserError(f"ahl.init = {self.init!r}: expected 'base' or 'random'")
        if self.weighting not in WEIGHTINGS:
            raise UserError(f"ahl.weighting = {self.weighting!r}: expected one of {WEIGHTINGS}")
        for name in ("inner_lr", "lr", "grad_clip", "lr_gamma", "psi_lr"):
            if not getattr(self, name) > 0:
                raise UserError(f"ahl.{name} = {getattr(self, name)}: must be > 0")
        self.hadg.validate()

    def estimator(self) -> EstimatorConfig:
        return EstimatorConfig(
            history=self.history, lr=self.psi_lr, weight_decay=self.psi_wd, steps=self.psi_steps,
            weighting=self.weighting,
        )


@dataclass
class AHLResult:
    heads: ScoringHeads  # theta_g after the last epoch (or the ensemble when cdl=False); eval mode, on CPU
    history: list[dict]  # per epoch: epoch, outer_loss, task_weights, test_auc_roc, test_auc_pr, seconds, ...
    test_scores: list[np.ndarray]  # per epoch: final score of every test image under theta_g
    tasks: list[Task]
    clusters: list[np.ndarray]


class HeadsEnsemble(ScoringHeads):
    """Ablation "independent heads averaged": T copies of the heads; the final score is the mean of theirs."""

    def __init__(self, members: Sequence[ScoringHeads]):
        super().__init__()
        self.members = nn.ModuleList(members)
        names = members[0].head_names
        self.head_names = tuple(f"{name}.{k}" for k in range(len(members)) for name in names)
        self.uses_reference = members[0].uses_reference

    def forward(self, features, reference=None) -> torch.Tensor:  # -> (B, T * n_heads)
        return torch.cat([m(features, reference) for m in self.members], dim=1)

    def final_score(self, scores: torch.Tensor) -> torch.Tensor:
        per_member = scores.view(scores.shape[0], len(self.members), -1)  # (B, T, n_heads)
        return torch.stack([m.final_score(per_member[:, k]) for k, m in enumerate(self.members)], 1).mean(1)


# --------------------------------------------------------------------------------------------------------------
# Features on the device


class FeatureStore:
    """The training features (normals, seen anomalies, the pseudo splits in use) as tensors on ``device``.

    Kept in the cache's dtype (float16 halves the memory); a batch is gathered by indexing and converted to
    float32 in channels_last layout (one copy), which the convolutions run faster on (see
    benchmarks/bench_ahl.py; the heads' conv weights are made channels_last too).
    """

    def __init__(self, cache: FeatureCache, pseudo_splits: Iterable[str], device: torch.device):
        self.device = device
        sets = {"normal": cache.train_normal, "seen": cache.train_anomaly}
        sets.update({name: cache.pseudo[name] for name in sorted(set(pseudo_splits))})
        self.sets = {name: [_to_tensor(x, device) for x in fs.scales] for name, fs in sets.items()}
        # (C, H, W) stored channels-last (strides of (H, W, C)) so that the composite head's (reference - x) is
        # channels_last like x
        self.reference = [
            torch.as_tensor(np.asarray(r, dtype=np.float32)).to(device).permute(1, 2, 0).contiguous().permute(2, 0, 1)
            for r in cache.reference
        ]

    def rows(self, split: str, index: np.ndarray) -> list[torch.Tensor]:
        """float32 (len(index), C, H_s, W_s) per scale."""
        idx = torch.as_tensor(np.asarray(index, dtype=np.int64)).to(self.device)
        # x[idx], not index_select: on CPU (torch 2.14) index_select of (300, 512, 14, 14) rows is ~35x slower
        return [x[idx].to(torch.float32, memory_format=torch.channels_last) for x in self.sets[split]]

    def batch(self, batch: BatchIndex, split_of: dict[str, str]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(features per scale (B, C, H_s, W_s) float32, labels (B,)) in the order normals, seen, pseudo."""
        parts = [self.rows("normal", batch.normals)]
        if len(batch.anomalies):
            parts.append(self.rows("seen", batch.anomalies))
        if len(batch.pseudo):
            parts.append(self.rows(split_of[batch.family], batch.pseudo))
        features = [torch.cat([p[s] for p in parts]) if len(parts) > 1 else parts[0][s] for s in range(len(parts[0]))]
        return features, torch.as_tensor(batch.labels).to(self.device)


def _to_tensor(x: np.ndarray, device: torch.device) -> torch.Tensor:
    # np.array copies a (read-only) memory map into memory: torch does not take read-only arrays.
    return torch.from_numpy(np.array(x)).to(device)


# --------------------------------------------------------------------------------------------------------------
# The pieces of CDL


def forward(heads: ScoringHeads, params: Params, buffers: Params, features, reference) -> torch.Tensor:
    """Per-head scores (B, n_heads) of the heads with weights ``params`` (theta_g or an adapted phi_i)."""
    return functional_call(heads, (params, buffers), (features, reference if heads.uses_reference else None))


def adapt(
    heads: ScoringHeads,
    theta: Params,
    buffers: Params,
    support: Iterable[tuple[list[torch.Tensor], torch.Tensor]],
    reference: list[torch.Tensor] | None,
    inner_lr: float,
    second_order: bool,
) -> tuple[Params, list[torch.Tensor]]:
    """phi_i: gradient steps from theta on the support batches; returns phi and the support losses (detached).

    The first step keeps its graph (create_graph) when ``second_order``, so the meta-gradient includes the
    Hessian term (I - inner_lr * H) of that step; later steps are first order: their gradients are constants,
    so phi_k = phi_1 - inner_lr * sum(g) and no graph of their forward/backward passes is kept.
    BatchNorm (DRA's composite head) runs in train mode on batch statistics; its running statistics are the
    shared buffers of theta_g, updated in place by every inner and query pass (as in ordinary training), and
    used in eval mode when scoring.
    """
    phi = dict(theta)
    names = list(phi)
    losses = []
    for k, (features, labels) in enumerate(support):
        loss = heads.loss(forward(heads, phi, buffers, features, reference), labels)
        create_graph = second_order and k == 0
        grads = torch.autograd.grad(loss, [phi[n] for n in names], create_graph=create_graph, allow_unused=True)
        phi = {n: phi[n] if g is None else phi[n] - inner_lr * g for n, g in zip(names, grads)}
        losses.append(loss.detach())
    return phi, losses


def query_loss(
    heads: ScoringHeads, phi: Params, buffers: Params, features, labels, reference
) -> torch.Tensor:
    """L_query(phi_i): the heads' deviation loss of the adapted model on a query batch."""
    return heads.loss(forward(heads, phi, buffers, features, reference), labels)


@torch.no_grad()
def _final_scores(heads: ScoringHeads, params: Params, buffers: Params, chunks, reference) -> np.ndarray:
    """Final scores in eval mode of the heads with weights ``params`` on an iterable of feature lists."""
    was_training = heads.training
    heads.eval()
    try:
        out = [heads.final_score(forward(heads, params, buffers, f, reference)).float().cpu() for f in chunks]
    finally:
        heads.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def score(
    cache_split: FeatureSet,
    heads: ScoringHeads,
    reference: Sequence[np.ndarray | torch.Tensor] | None,
    device: torch.device | str,
    batch_size: int = 64,
) -> np.ndarray:
    """Final anomaly score (N,) of every image of a FeatureSet under ``heads`` (eval mode, no gradient)."""
    device = torch.device(device)
    ref = None
    if reference is not None:
        ref = [torch.as_tensor(np.asarray(r, dtype=np.float32)).to(device) for r in reference]
    params = {n: p.detach() for n, p in heads.named_parameters()}
    buffers = dict(heads.named_buffers())

    def chunks():
        for start in range(0, len(cache_split), batch_size):
            stop = min(start + batch_size, len(cache_split))
            yield [torch.from_numpy(np.asarray(x[start:stop], dtype=np.float32)).to(device) for x in cache_split.scales]

    return _final_scores(heads, params, buffers, chunks(), ref)


def _reinitialise(heads: ScoringHeads, seed: int) -> None:
    """Fresh default initialisation of every layer, from ``seed`` and without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in heads.modules():
            if module is not heads and hasattr(module, "reset_parameters"):
                module.reset_parameters()


# --------------------------------------------------------------------------------------------------------------
# Training


class _Trainer:
    """State of one AHL run; ``epoch()`` does one epoch. See train_ahl for what an epoch is."""

    def __init__(self, cache: FeatureCache, heads: ScoringHeads, config: AHLConfig, seed: int, device):
        config.validate()
        self.config, self.device, self.cache = config, torch.device(device), cache
        self.rng = np.random.default_rng(seed)

        self.variants = family_variants(list(cache.pseudo))
        self.families = sorted(self.variants)
        self.clusters = cluster_normals(pool_features(cache.train_normal.scales), config.hadg, seed)
        self.tasks = make_tasks(self.clusters, len(cache.train_anomaly), self.families, self.rng)
        splits = [v for vs in self.variants.values() for v in (vs if config.redraw_augmentation else vs[:1])]
        self.store = FeatureStore(cache, splits, self.device)
        self.reference = self.store.reference if heads.uses_reference else None

        heads = copy.deepcopy(heads).cpu()
        if config.init == "random":
            _reinitialise(heads, seed)
        self.heads = heads.to(self.device).to(memory_format=torch.channels_last).train()
        n_tasks = len(self.tasks)
        if config.cdl:
            self.models = [self.heads]
        else:  # T independent copies; each is its own "theta" with its own optimiser
            self.models = [copy.deepcopy(self.heads) for _ in range(n_tasks)]
        self.optimizers = [
            torch.optim.Adam(m.parameters(), lr=config.lr, weight_decay=config.weight_decay) for m in self.models
        ]
        self.schedulers = [
            torch.optim.lr_scheduler.StepLR(o, step_size=config.lr_step, gamma=config.lr_gamma)
            for o in self.optimizers
        ]
        self.scored = HeadsEnsemble(self.models) if not config.cdl else self.heads

        # psi's fixed query pool, scored by every phi_i at the end of each epoch.
        self.pool = QueryPool.build(
            self.clusters, len(cache.train_anomaly), self.families, config.pool_pseudo_per_family, self.rng
        )
        self.pool_labels = self.pool.labels()
        self.pool_cost, self.pool_include = self.pool.cost_and_include(self.tasks)
        self.estimation = GeneralisationEstimation(n_tasks, config.estimator(), seed, self.device)
        self.weights = np.full(n_tasks, 1.0 / n_tasks)
        self.rewards = np.full(n_tasks, np.nan)
        self.epoch_index = 0
        log.info(
            "AHL: %d clusters (sizes %s), %d tasks, families %s, %d seen anomalies, device %s",
            len(self.clusters), [len(c) for c in self.clusters], n_tasks, self.families,
            len(cache.train_anomaly), self.device,
        )

    # -- data ------------------------------------------------------------------------------------------------
    def _split_of(self) -> dict[str, str]:
        """The pseudo split that stands for each family this epoch (a fresh variant with redraw_augmentation)."""
        if self.config.redraw_augmentation:
            return {f: vs[self.rng.integers(len(vs))] for f, vs in self.variants.items()}
        return {f: vs[0] for f, vs in self.variants.items()}

    def _support_batches(self, task: Task, n: int) -> list[BatchIndex]:
        c = self.config
        return [
            draw_batch(task.support_normals, task.support_anomalies, task.support_family, c.batch_size, self.rng)
            for _ in range(n)
        ]

    def _query_batches(self, task: Task) -> list[BatchIndex]:
        c = self.config
        return [
            draw_batch(task.query_normals, task.query_anomalies, task.query_family, c.batch_size, self.rng)
            for _ in range(c.query_batches)
        ]

    def _pool_chunks(self) -> Iterator[list[torch.Tensor]]:
        split_of = {f: vs[0] for f, vs in self.variants.items()}  # fixed across epochs: histories line up
        segments = [("normal", self.pool.normals), ("seen", self.pool.seen)]
        segments += [(split_of[f], rows) for f, rows in self.pool.pseudo.items()]
        step = self.config.eval_batch_size
        for split, rows in segments:
            for start in range(0, len(rows), step):
                yield self.store.rows(split, rows[start : start + step])

    # -- one epoch -------------------------------------------------------------------------------------------
    def epoch(self) -> tuple[dict, np.ndarray]:
        """One epoch of CDL (or of the independent-heads ablation): (its history entry, the test scores)."""
        start = time.perf_counter()
        c = self.config
        split_of = self._split_of()
        if c.cdl:
            entry = self._cdl_epoch(split_of)
        else:
            entry = self._independent_epoch(split_of)
        for scheduler in self.schedulers:
            scheduler.step()

        test_scores = score(self.cache.test, self.scored, self.cache.reference, self.device, c.eval_batch_size)
        auc = auc_roc_pr(self.cache.test.labels, test_scores) if np.isfinite(test_scores).all() else None
        auc_roc, auc_pr = (auc["auc_roc"], auc["auc_pr"]) if auc else (None, None)
        entry.update(
            epoch=self.epoch_index + 1,  # 1-based, like the base trainer's history
            test_auc_roc=auc_roc,
            test_auc_pr=auc_pr,
            seconds=time.perf_counter() - start,
        )
        self.epoch_index += 1
        return entry, test_scores

    def _cdl_epoch(self, split_of: dict[str, str]) -> dict:
        """outer_steps_per_epoch outer steps; each: per task i, phi_i <- update_step rounds of inner steps over
        steps_per_epoch / outer_steps_per_epoch support batches (drawn once; a "round" is one pass over them),
        then w_i * L_query(phi_i) is back-propagated into theta_g's .grad at once (one task's graph alive at a
        time); then one clipped Adam step on theta_g. After the last outer step the adapted phi_i score psi's
        pool; psi then sets the weights of the next epoch (the weights are fixed within an epoch).
        """
        c = self.config
        weights = self.weights.copy()
        n_outer = c.outer_steps_per_epoch
        query_losses = np.zeros((n_outer, len(self.tasks)))
        support_losses = np.zeros((n_outer, len(self.tasks)))
        grad_norms = []
        for m in range(n_outer):
            last = m == n_outer - 1
            pool_scores, grad_norm = self._outer_step(split_of, weights, query_losses[m], support_losses[m], last)
            grad_norms.append(grad_norm)

        self.estimation.push(pool_scores)
        psi_loss = self.estimation.fit()
        self.weights, self.rewards = self.estimation.weights(self.pool_labels, self.pool_cost, self.pool_include)
        return {
            "outer_loss": float(np.mean(query_losses @ weights)),
            "query_losses": query_losses.mean(axis=0).tolist(),
            "support_losses": support_losses.mean(axis=0).tolist(),
            "task_weights": weights.tolist(),
            "next_task_weights": self.weights.tolist(),
            "rewards": [None if np.isnan(r) else float(r) for r in self.rewards],
            "psi_loss": psi_loss,
            "grad_norm": float(np.mean(grad_norms)),
            "lr": self.optimizers[0].param_groups[0]["lr"],
        }

    def _outer_step(
        self, split_of: dict[str, str], weights: np.ndarray, query_losses: np.ndarray, support_losses: np.ndarray,
        last: bool,
    ) -> tuple[np.ndarray | None, float]:
        """One outer step; fills the per-task losses. Returns (psi's pool scores of the phi_i when ``last``,
        the norm of the outer gradient before clipping)."""
        c, heads = self.config, self.heads
        optimizer = self.optimizers[0]
        optimizer.zero_grad(set_to_none=True)
        theta = dict(heads.named_parameters())
        buffers = dict(heads.named_buffers())
        n_batches = c.steps_per_epoch // c.outer_steps_per_epoch
        pool_scores = np.zeros((len(self.pool), len(self.tasks)), dtype=np.float32) if last else None
        for i, task in enumerate(self.tasks):
            # the same batches in every round, gathered when used: keeping 20 float32 batches at the papers'
            # shapes would cost 0.5 GB for a ~1 % faster step (bench_ahl.py: gather 6 ms, inner step 560 ms)
            batches = self._support_batches(task, n_batches)
            support = (self.store.batch(b, split_of) for _ in range(c.update_step) for b in batches)
            phi, losses = adapt(heads, theta, buffers, support, self.reference, c.inner_lr, c.second_order)
            support_losses[i] = float(torch.stack(losses[-n_batches:]).mean())  # the last round
            queries = self._query_batches(task)
            total = 0.0
            for q, b in enumerate(queries):
                features, labels = self.store.batch(b, split_of)
                loss = query_loss(heads, phi, buffers, features, labels, self.reference) / len(queries)
                # retain the inner graph (shared by the task's query batches) until its last query batch
                (float(weights[i]) * loss).backward(retain_graph=q < len(queries) - 1)
                total += float(loss.detach())
            query_losses[i] = total
            if last:
                detached = {n: p.detach() for n, p in phi.items()}
                del phi
                pool_scores[:, i] = _final_scores(heads, detached, buffers, self._pool_chunks(), self.reference)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(heads.parameters(), c.grad_clip))
        optimizer.step()
        return pool_scores, grad_norm

    def _independent_epoch(self, split_of: dict[str, str]) -> dict:
        """Ablation: member i takes steps_per_epoch Adam steps (the outer optimiser's settings) on batches of
        task i's support set; no meta-gradient, no psi; the result is the average of the members' final scores."""
        c = self.config
        losses = []
        for task, model, optimizer in zip(self.tasks, self.models, self.optimizers):
            model.train()
            task_loss = []
            for b in self._support_batches(task, c.steps_per_epoch):
                features, labels = self.store.batch(b, split_of)
                optimizer.zero_grad(set_to_none=True)
                loss = model.loss(model(features, self.reference), labels)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
                optimizer.step()
                task_loss.append(loss.detach())
            losses.append(float(torch.stack(task_loss).mean()))
        n = len(self.tasks)
        return {
            "outer_loss": float(np.mean(losses)),
            "support_losses": losses,
            "task_weights": [1.0 / n] * n,
            "lr": self.optimizers[0].param_groups[0]["lr"],
        }


def train_ahl(
    cache: FeatureCache,
    heads: ScoringHeads,
    config: AHLConfig,
    *,
    seed: int,
    device: torch.device | str,
    progress: bool = False,
) -> AHLResult:
    """Train AHL on a feature cache, starting from ``heads`` (the base model's; left unchanged).

    One epoch (cdl=True, outer_steps_per_epoch=1): for each of the T tasks, phi_i = theta_g adapted by
    update_step x steps_per_epoch inner steps (update_step rounds over steps_per_epoch support batches), its
    query loss back-propagated (weighted by w_i) into theta_g; then one clipped Adam step on theta_g, StepLR,
    test scoring with theta_g, and psi's update of the weights. The returned model is the last epoch's (no
    selection on the test set).
    """
    trainer = _Trainer(cache, heads, config, seed, device)
    history, test_scores = [], []
    bar = tqdm(range(config.epochs), desc="AHL", disable=not progress, unit="epoch")
    for _ in bar:
        entry, scores = trainer.epoch()
        history.append(entry)
        test_scores.append(scores)
        auc = entry["test_auc_roc"]
        bar.set_postfix(loss=f"{entry['outer_loss']:.3f}", auc="-" if auc is None else f"{auc:.3f}")
        log.info(
            "epoch %d: outer loss %.4f, test AUC-ROC %s, weights %s, %.1f s",
            entry["epoch"], entry["outer_loss"], "-" if auc is None else f"{auc:.4f}",
            np.round(entry["task_weights"], 3).tolist(), entry["seconds"],
        )
    result_heads = trainer.scored.eval().cpu().to(memory_format=torch.contiguous_format)
    return AHLResult(
        heads=result_heads, history=history, test_scores=test_scores, tasks=trainer.tasks, clusters=trainer.clusters
    )


__all__ = [
    "AHLConfig",
    "AHLResult",
    "FeatureStore",
    "HeadsEnsemble",
    "adapt",
    "forward",
    "query_loss",
    "score",
    "train_ahl",
]
