"""AHL's training loop on cached features: HADG tasks, one CDL outer step per epoch, psi's task weights.

The maths of a task's meta-gradient is in ahl/method/cdl.py, the tasks and batches in ahl/method/hadg.py, psi
in ahl/method/estimator.py, the device-side features in ahl/method/store.py. Training never reads test labels:
the stage passes an ``on_epoch`` callback that may score whatever it likes (the pipeline logs the test AUC per
epoch that way).
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from ahl.core.config import at_least, one_of, positive, run_bounds
from ahl.core.distributed import SINGLE, Group
from ahl.core.errors import UserError
from ahl.core.runtime import Runtime, plain
from ahl.method import hadg
from ahl.method.cache import FeatureCache
from ahl.method.cdl import task_meta_gradient
from ahl.method.estimator import WEIGHTINGS, EstimatorConfig, GeneralisationEstimation, QueryPool
from ahl.method.forward import final_scores
from ahl.method.hadg import BatchIndex, HADGConfig, Task
from ahl.method.init import reinitialise
from ahl.method.store import FeatureStore
from ahl.method.tasks import TaskSplit, share_members
from ahl.models.heads import HeadsEnsemble, ScoringHeads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AHLConfig:
    """AHL's settings. The defaults are the paper's; the pipeline never uses them (every value comes from
    params.yaml, where a missing key is an error)."""

    epochs: int = 30
    steps_per_epoch: int = 20  # support batches per round of inner steps
    batch_size: int = 48  # 16 normal + 16 seen + 16 pseudo
    inner_lr: float = 2e-4  # plain gradient steps phi <- phi - inner_lr * grad
    update_step: int = 3  # rounds of inner steps over a task's support batches
    # Outer (Adam) steps on theta_g per epoch; each splits the epoch's steps_per_epoch support batches of a task
    # evenly. 1 = the paper's schedule (per task update_step x steps_per_epoch inner steps, one outer step per
    # epoch); steps_per_epoch = MAML's schedule (update_step inner steps on one support batch per outer step).
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
    psi_dropout: float = 0.5  # between psi's two LSTM layers (official)
    psi_steps: int = 10  # Adam steps on psi after every epoch
    pool_pseudo_per_family: int = 32  # pseudo anomalies per family in psi's fixed query pool
    weighting: str = "psi"  # "psi" | "uniform" (ablation: no generalisation estimator)
    cdl: bool = True  # False: ablation "independent heads averaged" (T heads trained on their own support sets)
    redraw_augmentation: bool = False  # draw one variant ("family@k") of every family per epoch
    # DRA heads only: the official code's composite-head geometry (conv stride 3, no padding), for like-for-like
    # comparisons with it; the weights have the same shapes, so the base model's heads still initialise it.
    official_geometry: bool = False
    query_batches: int = 1  # query batches per task whose mean loss is L_query(phi_i)
    # "same": every round of inner steps goes over the same steps_per_epoch support batches; "fresh": each round
    # draws new ones (the official code re-iterates its sampler, which continues its permutation cycle)
    support_rounds: str = "same"
    eval_batch_size: int = 64
    hadg: HADGConfig = field(default_factory=HADGConfig)

    def __post_init__(self) -> None:
        for name in ("epochs", "steps_per_epoch", "update_step", "outer_steps_per_epoch", "query_batches",
                     "eval_batch_size", "lr_step", "history"):  # fmt: skip
            at_least(f"ahl.{name}", getattr(self, name), 1)
        run_bounds("ahl", self, steps=("steps_per_epoch", "update_step", "query_batches"),
                   batches=("batch_size", "eval_batch_size"))  # fmt: skip
        for name in ("inner_lr", "lr", "grad_clip", "lr_gamma", "psi_lr"):
            positive(f"ahl.{name}", getattr(self, name))
        for name in ("weight_decay", "psi_wd", "psi_steps", "pool_pseudo_per_family"):
            at_least(f"ahl.{name}", getattr(self, name), 0)
        if self.steps_per_epoch % self.outer_steps_per_epoch:
            raise UserError(
                f"params.yaml: ahl.outer_steps_per_epoch = {self.outer_steps_per_epoch} must divide "
                f"ahl.steps_per_epoch = {self.steps_per_epoch}"
            )
        if self.batch_size < 3:
            raise UserError(f"params.yaml: ahl.batch_size = {self.batch_size}: needs room for normal, seen and pseudo")
        one_of("ahl.init", self.init, ("base", "random"))
        one_of("ahl.support_rounds", self.support_rounds, ("same", "fresh"))
        one_of("ahl.weighting", self.weighting, WEIGHTINGS)

    def to_dict(self) -> dict:
        return asdict(self)

    def estimator(self) -> EstimatorConfig:
        return EstimatorConfig(
            history=self.history, lr=self.psi_lr, weight_decay=self.psi_wd, steps=self.psi_steps,
            weighting=self.weighting, dropout=self.psi_dropout,
        )


@dataclass
class AHLResult:
    heads: ScoringHeads  # theta_g after the last epoch (or the ensemble when cdl=False); eval mode, on CPU
    history: list[dict]  # per epoch: epoch, outer_loss, task_weights, seconds, ... and what on_epoch returned
    tasks: list[Task]
    clusters: list[np.ndarray]


# Called after every epoch with (1-based epoch, the heads as they score now, eval mode); what it returns is
# added to that epoch's history entry.
EpochCallback = Callable[[int, ScoringHeads], dict]


class AHLTrainer:
    """State of one AHL run; ``epoch()`` does one epoch. See train_ahl for what an epoch is."""

    def __init__(
        self, cache: FeatureCache, heads: ScoringHeads, config: AHLConfig, seed: int, device,
        group=SINGLE, runtime: Runtime | None = None,
    ):  # fmt: skip
        hadg.check_batch(config.batch_size, len(cache.train_normal), len(cache.train_anomaly))
        self.config, self.device, self.cache, self.group = config, torch.device(device), cache, group
        self.autocast = (runtime or plain(self.device)).autocast  # heads not compiled: no double backward
        self.rng = np.random.default_rng(seed)
        self.variants = hadg.family_variants(list(cache.pseudo))
        self.families = sorted(self.variants)
        features = hadg.cluster_features(cache.train_normal.scales, config.hadg.features)
        self.clusters = hadg.cluster_normals(features, config.hadg, seed)
        self.tasks = hadg.make_tasks(self.clusters, len(cache.train_anomaly), self.families, self.rng)
        splits = [v for vs in self.variants.values() for v in (vs if config.redraw_augmentation else vs[:1])]
        self.store = FeatureStore(cache, splits, self.device)
        self.normal_mean = self.store.normal_mean if heads.uses_normal_mean else None
        self._build_models(heads, seed)
        # psi's fixed query pool, scored by every phi_i at the end of each epoch.
        self.pool = QueryPool.build(
            self.clusters, len(cache.train_anomaly), self.families, config.pool_pseudo_per_family, self.rng
        )
        self.pool_labels = self.pool.labels()
        self.pool_cost, self.pool_include = self.pool.cost_and_include(self.tasks)
        self.estimation = GeneralisationEstimation(len(self.tasks), config.estimator(), seed, self.device)
        self.weights = np.full(len(self.tasks), 1.0 / len(self.tasks))
        self.rewards = np.full(len(self.tasks), np.nan)
        self.epoch_index = 0
        log.info(
            "AHL: %d clusters (sizes %s), %d tasks, families %s, %d seen anomalies, device %s",
            len(self.clusters), [len(c) for c in self.clusters], len(self.tasks), self.families,
            len(cache.train_anomaly), self.device,
        )

    def _build_models(self, heads: ScoringHeads, seed: int) -> None:
        config = self.config
        heads = copy.deepcopy(heads).cpu()
        if config.init == "random":
            reinitialise(heads, seed)
        self.heads = heads.to(self.device).to(memory_format=torch.channels_last).train()
        if config.cdl:
            self.models = [self.heads]
        else:  # T independent copies; each is its own "theta" with its own optimiser
            self.models = [copy.deepcopy(self.heads) for _ in self.tasks]
        self.optimizers = [
            torch.optim.Adam(m.parameters(), lr=config.lr, weight_decay=config.weight_decay) for m in self.models
        ]
        self.schedulers = [
            torch.optim.lr_scheduler.StepLR(o, step_size=config.lr_step, gamma=config.lr_gamma)
            for o in self.optimizers
        ]
        self.scored = self.heads if config.cdl else HeadsEnsemble(self.models)

    # -- data ------------------------------------------------------------------------------------------------
    def _split_of(self) -> dict[str, str]:
        """The pseudo split that stands for each family this epoch (a fresh variant with redraw_augmentation)."""
        if self.config.redraw_augmentation:
            return {f: vs[self.rng.integers(len(vs))] for f, vs in self.variants.items()}
        return {f: vs[0] for f, vs in self.variants.items()}

    def _batches(self, normals, anomalies, family, n: int) -> list[BatchIndex]:
        return [hadg.draw_batch(normals, anomalies, family, self.config.batch_size, self.rng) for _ in range(n)]

    def _pool_chunks(self) -> Iterator[list[torch.Tensor]]:
        split_of = {f: vs[0] for f, vs in self.variants.items()}  # fixed across epochs: histories line up
        segments = [("normal", self.pool.normals), ("seen", self.pool.seen)]
        segments += [(split_of[f], rows) for f, rows in self.pool.pseudo.items()]
        step = self.config.eval_batch_size
        for split, rows in segments:
            for start in range(0, len(rows), step):
                yield self.store.rows(split, rows[start : start + step])

    # -- one epoch -------------------------------------------------------------------------------------------
    def epoch(self) -> dict:
        """One epoch of CDL (or of the independent-heads ablation); returns its history entry."""
        start = time.perf_counter()
        split_of = self._split_of()
        entry = self._cdl_epoch(split_of) if self.config.cdl else self._independent_epoch(split_of)
        for scheduler in self.schedulers:
            scheduler.step()
        self.epoch_index += 1
        entry.update(epoch=self.epoch_index, seconds=time.perf_counter() - start)  # 1-based, like base training
        return entry

    def _cdl_epoch(self, split_of: dict[str, str]) -> dict:
        """outer_steps_per_epoch outer steps, then psi's update of the task weights of the next epoch (the
        weights are fixed within an epoch)."""
        c = self.config
        weights = self.weights.copy()
        query_losses = np.zeros((c.outer_steps_per_epoch, len(self.tasks)))
        support_losses = np.zeros((c.outer_steps_per_epoch, len(self.tasks)))
        grad_norms = []
        for m in range(c.outer_steps_per_epoch):
            last = m == c.outer_steps_per_epoch - 1
            pool_scores, grad_norm = self._outer_step(split_of, weights, query_losses[m], support_losses[m], last)
            grad_norms.append(grad_norm)
        self.estimation.push(pool_scores)
        psi_loss = self.estimation.fit()
        self.weights, self.rewards = self.estimation.weights(self.pool_labels, self.pool_cost, self.pool_include)
        self.weights = self.group.broadcast_array(self.weights)  # every rank fits psi alike; rank 0's rule
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
        """One outer step: per task i, phi_i <- update_step rounds of inner steps over its support batches (the
        same batches in every round, drawn once; or fresh ones per round, ``support_rounds``), then
        w_i * L_query(phi_i) into theta_g's .grad; then one clipped Adam step. Fills the per-task losses; returns
        (psi's pool scores of the phi_i when ``last``, the norm of the outer gradient before clipping)."""
        c, heads = self.config, self.heads
        self.optimizers[0].zero_grad(set_to_none=True)
        theta, buffers = dict(heads.named_parameters()), dict(heads.named_buffers())
        n_batches = c.steps_per_epoch // c.outer_steps_per_epoch
        pool_scores = np.zeros((len(self.pool), len(self.tasks)), dtype=np.float32) if last else None
        split = TaskSplit(self.group, heads, len(self.tasks))  # tasks over ranks (ahl/method/tasks.py)
        fresh = c.support_rounds == "fresh"
        for i, task in enumerate(self.tasks):
            n_drawn = n_batches * (c.update_step if fresh else 1)
            batches = self._batches(task.support_normals, task.support_anomalies, task.support_family, n_drawn)
            queries = self._batches(task.query_normals, task.query_anomalies, task.query_family, c.query_batches)
            if not split.begin(i):  # another rank's task: its batches were drawn all the same (one stream)
                continue
            if fresh:  # every round its own batches, gathered when used
                rounds = (self.store.batch(b, split_of) for b in batches)
            else:
                # each support batch is gathered once and kept for the update_step rounds (memory and time:
                # docs/performance.md), with a memo per scale: what the heads derive from its features alone (the
                # composite head's patches at the official geometry) is computed in the first round only
                support = [(f, y, [{} for _ in f]) for f, y in (self.store.batch(b, split_of) for b in batches)]
                rounds = (batch for _ in range(c.update_step) for batch in support)
            phi, losses, query_losses[i] = task_meta_gradient(
                heads, theta, buffers, rounds,
                (self.store.batch(b, split_of) for b in queries), len(queries), self.normal_mean,
                weight=float(weights[i]), inner_lr=c.inner_lr, second_order=c.second_order, autocast=self.autocast,
            )  # fmt: skip
            support_losses[i] = float(torch.stack(losses[-n_batches:]).mean())  # the last round
            if last:
                score = functools.partial(final_scores, autocast=self.autocast)
                split.score(i, phi, pool_scores, score, self._pool_chunks, self.normal_mean)  # psi's inputs
        split.finish((query_losses, support_losses), pool_scores)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(heads.parameters(), c.grad_clip))
        self.optimizers[0].step()
        return pool_scores, grad_norm

    def _independent_epoch(self, split_of: dict[str, str]) -> dict:
        """Ablation: member i takes steps_per_epoch Adam steps (the outer optimiser's settings) on batches of
        task i's support set; no meta-gradient, no psi; the result is the average of the members' final scores."""
        c = self.config
        losses = np.zeros(len(self.tasks))
        for i, (task, model, optimizer) in enumerate(zip(self.tasks, self.models, self.optimizers)):
            model.train()
            task_loss = []
            n = c.steps_per_epoch
            batches = self._batches(task.support_normals, task.support_anomalies, task.support_family, n)
            if not self.group.owns(i):  # another rank's member (ahl/core/distributed.py)
                continue
            for b in batches:
                features, labels = self.store.batch(b, split_of)
                optimizer.zero_grad(set_to_none=True)
                with self.autocast():
                    loss = model.loss(model(features, self.normal_mean), labels)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
                optimizer.step()
                task_loss.append(loss.detach())
            losses[i] = float(torch.stack(task_loss).mean())
        losses = share_members(self.models, np.array(losses), self.group).tolist()
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
    on_epoch: EpochCallback | None = None,
    group: Group = SINGLE,
    runtime: Runtime | None = None,
) -> AHLResult:
    """Train AHL on a feature cache, starting from ``heads`` (the base model's; left unchanged).

    One epoch (cdl=True, outer_steps_per_epoch=1): for each of the T tasks, phi_i = theta_g adapted by
    update_step x steps_per_epoch inner steps (update_step rounds over steps_per_epoch support batches), its
    query loss back-propagated (weighted by w_i) into theta_g; then one clipped Adam step on theta_g, StepLR,
    and psi's update of the weights. The returned model is the last epoch's (no selection on the test set).
    ``runtime`` (None: float32) sets the autocast dtype of the heads' forward passes.
    """
    trainer = AHLTrainer(cache, heads, config, seed, device, group, runtime)
    history = []
    bar = tqdm(range(config.epochs), desc="AHL", disable=not progress, unit="epoch")
    for _ in bar:
        entry = trainer.epoch()
        if on_epoch is not None:
            trainer.scored.eval()
            entry.update(on_epoch(entry["epoch"], trainer.scored))
            trainer.scored.train()
        history.append(entry)
        bar.set_postfix(loss=f"{entry['outer_loss']:.3f}")
        log.info(
            "epoch %d: outer loss %.4f, weights %s, %.1f s %s", entry["epoch"], entry["outer_loss"],
            np.round(entry["task_weights"], 3).tolist(), entry["seconds"],
            {k: v for k, v in entry.items() if k.startswith("test_")},
        )
    result_heads = trainer.scored.eval().cpu().to(memory_format=torch.contiguous_format)
    return AHLResult(heads=result_heads, history=history, tasks=trainer.tasks, clusters=trainer.clusters)
