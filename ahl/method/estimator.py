"""Self-supervised generalisation-ability estimation (AHL section 3): psi predicts, from the last K epochs of the
T adapted models' scores on a fixed pool of query samples, their next scores; the predicted errors on data each
task has not seen become the task weights w = softmax(-r) of the outer loss.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ahl.core.errors import UserError
from ahl.core.runtime import seeded
from ahl.method.hadg import Task

log = logging.getLogger(__name__)

WEIGHTINGS = ("psi", "uniform")


class GeneralisationEstimator(nn.Module):
    """psi: 2-layer bidirectional LSTM (hidden T) over K epochs of T scores -> ReLU -> Linear(2T, T).

    The initial state is zero (the official code draws a random one on every call, so its predictions and
    rewards are noisy and not reproducible).
    """

    def __init__(self, n_tasks: int, history: int = 5, dropout: float = 0.0):
        super().__init__()
        self.n_tasks, self.history = n_tasks, history
        self.lstm = nn.LSTM(n_tasks, n_tasks, num_layers=2, bidirectional=True, batch_first=True, dropout=dropout)
        self.head = nn.Linear(2 * n_tasks, n_tasks)

    def forward(self, sequences: torch.Tensor) -> torch.Tensor:  # (N, K, T) -> (N, T)
        out, _ = self.lstm(sequences)  # zero (h0, c0) when none given; out (N, K, 2T)
        return self.head(torch.relu(out[:, -1]))  # the last step's output of both directions


def rewards(predicted: np.ndarray, labels: np.ndarray, cost: np.ndarray, include: np.ndarray) -> np.ndarray:
    """r_i = mean over pool samples j with include[j, i] of cost[j, i] * (predicted[j, i] - labels[j])^2.

    predicted (P, T): psi's predicted final score of adapted model phi_i on sample j; labels (P,): 1 anomaly,
    0 normal; cost (P, T): c_j for task i; include (P, T): sample j is not in task i's own support cluster.
    As the AHL paper writes it, the MSE compares a raw final score with the binary label: the score is not
    rescaled (DevNet's anomaly scores sit near the margin 5, DRA's normals near -5), so r also grows with the
    score's scale; a task whose scores stay closest to {0, 1} on data it did not see gets the largest weight.
    """
    err = cost * (predicted - labels[:, None]) ** 2  # (P, T)
    counts = include.sum(axis=0)
    if (counts == 0).any():
        raise ValueError(f"a task has no pool sample outside its support cluster: counts {counts.tolist()}")
    return (err * include).sum(axis=0) / counts


def weights_from_rewards(r: np.ndarray) -> np.ndarray:
    """w = softmax(-r) (the official code then uses 0.5 + 0.5 w, which does not sum to 1; we do not)."""
    e = np.exp(-(r - r.min()))
    return e / e.sum()


@dataclass
class QueryPool:
    """The fixed set of query samples psi tracks, the same in every epoch so that the score histories line up.

    The union of the tasks' query sets: every normal of a kept cluster (each cluster is some task's query
    cluster), every seen anomaly (each is in some task's query half), and a fixed draw of pseudo anomalies per
    family (rows of train_normal made anomalous by that family; a fixed sample keeps the pool cheap to score).
    Order of the rows: normals, seen anomalies, then each family in sorted order.
    """

    normals: np.ndarray  # rows of train_normal
    seen: np.ndarray  # rows of train_anomaly
    pseudo: dict[str, np.ndarray]  # family -> rows of train_normal whose pseudo version is in the pool

    @classmethod
    def build(
        cls, clusters: list[np.ndarray], n_seen: int, families: list[str], per_family: int, rng: np.random.Generator
    ) -> "QueryPool":
        normals = np.sort(np.concatenate(clusters))
        pseudo = {
            f: np.sort(rng.choice(normals, size=min(per_family, len(normals)), replace=False))
            for f in sorted(families)
        }
        return cls(normals=normals, seen=np.arange(n_seen, dtype=np.int64), pseudo=pseudo)

    def __len__(self) -> int:
        return len(self.normals) + len(self.seen) + sum(len(v) for v in self.pseudo.values())

    def labels(self) -> np.ndarray:
        """Binary labels (P,): 0 normal, 1 anomaly (seen or pseudo), the targets of the reward's MSE."""
        n_pseudo = sum(len(v) for v in self.pseudo.values())
        return np.concatenate([np.zeros(len(self.normals)), np.ones(len(self.seen) + n_pseudo)]).astype(np.float32)

    def cost_and_include(self, tasks: list[Task]) -> tuple[np.ndarray, np.ndarray]:
        """(c (P, T), include (P, T)) of the reward of each task; our reading of the AHL paper:

        - include[j, i]: "query data not in task i's own support cluster". A normal is excluded when it belongs
          to task i's support cluster; so is a pseudo anomaly made from such a normal (it is a support normal
          with an augmentation on top). Seen anomalies belong to no cluster and are always included.
        - c[j, i] = 1.0 for anomalies *unseen by task i*: seen anomalies outside task i's support half, and pseudo
          anomalies of a family other than task i's support family. c = 0.5 for anomalies task i adapted on (its
          support half, its support family) and for normals.
        """
        t = len(tasks)
        cost = np.full((len(self), t), 0.5, dtype=np.float32)
        include = np.ones((len(self), t), dtype=bool)
        n_normals, n_seen = len(self.normals), len(self.seen)
        for i, task in enumerate(tasks):
            support = np.zeros(int(self.normals.max()) + 1, dtype=bool)
            support[task.support_normals] = True
            include[:n_normals, i] = ~support[self.normals]
            unseen = ~np.isin(self.seen, task.support_anomalies)
            cost[n_normals : n_normals + n_seen, i] = np.where(unseen, 1.0, 0.5)
            start = n_normals + n_seen
            for family, rows in self.pseudo.items():
                stop = start + len(rows)
                include[start:stop, i] = ~support[rows]
                cost[start:stop, i] = 0.5 if family == task.support_family else 1.0
                start = stop
        return cost, include


@dataclass
class EstimatorConfig:
    history: int = 5  # K epochs of scores psi reads
    lr: float = 2e-3
    weight_decay: float = 1e-3
    steps: int = 10  # Adam steps on psi after each epoch (full batch over every window of the history)
    weighting: str = "psi"  # "psi" | "uniform" (ablation: w = 1/T throughout)
    dropout: float = 0.5  # between the LSTM's two layers, while psi trains (official)

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise UserError(f"ahl.weighting = {self.weighting!r}: expected one of {WEIGHTINGS}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"params.yaml: ahl.psi_dropout = {self.dropout}: must be in [0, 1)")
        if self.history < 1 or self.steps < 0:
            raise UserError(f"ahl.history = {self.history}, psi steps = {self.steps}: need history >= 1, steps >= 0")


class GeneralisationEstimation:
    """psi with its score history and optimiser; turns the per-epoch score matrices into task weights.

    Timeline: after epoch e the T adapted models' scores S_e (P, T) on the pool are pushed. Once K+1 epochs are
    stored, psi is trained (MSE, mean over samples and tasks, always) on every window S_{t-K..t-1} -> S_t of the
    history; then it predicts S_{e+1} from S_{e-K+1..e}, and these predictions give the weights of epoch e+1.
    Hence the weights are uniform for epochs 0..K (psi has not yet seen K epochs and one target).
    """

    def __init__(self, n_tasks: int, config: EstimatorConfig, seed: int, device: torch.device | str = "cpu"):
        self.n_tasks, self.config, self.device = n_tasks, config, torch.device(device)
        with seeded(seed):  # psi's init must not touch (or depend on) the global RNG
            self.psi = GeneralisationEstimator(n_tasks, config.history, config.dropout).to(self.device)
        self.seed = seed
        self.optimizer = torch.optim.Adam(self.psi.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scores: list[np.ndarray] = []  # one (P, T) matrix per epoch
        self.trained = False

    def push(self, scores: np.ndarray) -> None:
        scores = np.asarray(scores, dtype=np.float32)
        if scores.ndim != 2 or scores.shape[1] != self.n_tasks:
            raise ValueError(f"scores must be (P, {self.n_tasks}), got {scores.shape}")
        if self.scores and scores.shape != self.scores[0].shape:
            raise ValueError(f"the pool changed size between epochs: {self.scores[0].shape} -> {scores.shape}")
        self.scores.append(scores)

    def fit(self) -> float | None:
        """Train psi on every window of the history; returns the last MSE, or None before K+1 epochs."""
        k = self.config.history
        if self.config.weighting != "psi" or len(self.scores) <= k or self.config.steps == 0:
            return None
        history = torch.from_numpy(np.stack(self.scores, axis=1)).to(self.device)  # (P, E, T)
        inputs = torch.cat([history[:, t - k : t] for t in range(k, history.shape[1])])  # (P * W, K, T)
        targets = torch.cat([history[:, t] for t in range(k, history.shape[1])])  # (P * W, T)
        self.psi.train()
        with seeded(self.seed * 1000 + len(self.scores)):  # dropout masks (CPU or CUDA) from the seed and the epoch
            for _ in range(self.config.steps):
                self.optimizer.zero_grad(set_to_none=True)
                loss = torch.mean((self.psi(inputs) - targets) ** 2)
                loss.backward()
                self.optimizer.step()
        self.trained = True
        return float(loss.detach())

    @torch.no_grad()
    def predict(self) -> np.ndarray:
        """psi's prediction of the next epoch's scores (P, T) from the last K epochs."""
        k = self.config.history
        if len(self.scores) < k:
            raise ValueError(f"psi needs {k} epochs of scores, has {len(self.scores)}")
        x = torch.from_numpy(np.stack(self.scores[-k:], axis=1)).to(self.device)  # (P, K, T)
        self.psi.eval()
        return self.psi(x).cpu().numpy()

    def weights(self, labels: np.ndarray, cost: np.ndarray, include: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(task weights (T,) summing to 1, rewards (T,) or NaN while uniform) for the next epoch."""
        uniform = np.full(self.n_tasks, 1.0 / self.n_tasks)
        if self.config.weighting != "psi" or not self.trained:
            return uniform, np.full(self.n_tasks, np.nan)
        r = rewards(self.predict(), labels, cost, include)  # (T,)
        if not np.isfinite(r).all():
            log.warning("psi's rewards are not finite (%s); using uniform task weights", r.tolist())
            return uniform, r
        return weights_from_rewards(r), r


__all__ = [
    "EstimatorConfig",
    "GeneralisationEstimation",
    "GeneralisationEstimator",
    "QueryPool",
    "WEIGHTINGS",
    "rewards",
    "weights_from_rewards",
]
