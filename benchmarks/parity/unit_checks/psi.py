"""The generalisation estimator psi against the official AHL/modeling/aux_net.py and main.py's task weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from benchmarks.parity import ours
from benchmarks.parity.shims import Patches
from benchmarks.parity.unit_checks.helpers import Row, ahl_modules, maxdiff, verdict


def psi(root: Path) -> list[Row]:
    """The official AUX_Model (modeling/aux_net.py) vs our GeneralisationEstimator with the same weights."""
    rows = []
    with Patches() as p:
        _main, _dra, _plain, aux, *_ = ahl_modules(root, p)
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
        main, *_ = ahl_modules(root, p)
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
