"""AHL against the official AHL/modeling/DRA_AHL.py, Plain_AHL.py and main.py: heads, the meta-learning step,
AHL(DevNet)'s loss."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from benchmarks.parity import ours
from benchmarks.parity.shims import Patches, standard_reference
from benchmarks.parity.unit_checks.helpers import (
    AHL_VARS,
    N_REF,
    C,
    Row,
    ahl_modules,
    copy_ahl_vars_to_ours,
    features,
    maxdiff,
    verdict,
)

N_TASKS, STEPS, UPDATE_STEP, BATCH = 2, 2, 3, 12  # the official epoch ahl_meta runs: T tasks, S steps, U rounds


def _official_trainer(main, layers, args, official, ref: list[torch.Tensor] | None = None):
    """An official main.Trainer without its __init__ (which loads data): the given args and model, the official
    deviation loss, and (DRA) a reference loader that yields the same reference features every time."""
    trainer = object.__new__(main.Trainer)
    trainer.args, trainer.model, trainer.criterion = args, official, layers.DeviationLoss()
    if ref is not None:
        trainer.ref = _reference_cycle(ref)
    return trainer


def _reference_cycle(ref: list[torch.Tensor]):
    """The official reference loader's batches: the same two scales of reference features, forever."""
    return itertools.cycle([{"image": ref[0], "image_scale": ref[1]}])


def _both_heads(official, heads, x, ref) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Eval-mode outputs of the official AHL DRA (4 x (B,)) and ours ((B, 4)) on the same features."""
    with torch.no_grad():
        out = official(torch.cat([ref[0], x[0]]), torch.cat([ref[1], x[1]]), st=True)
        mine = heads(x, [r.mean(0) for r in ref])
    return out, mine


def _official_init_rows(official, heads, x, ref) -> list[Row]:
    """Each head at the official initialisation (BatchNorm weight = bias = 0)."""
    rows = []
    out, mine = _both_heads(official, heads, x, ref)
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
    return rows


def _bn_weight_one_rows(official, heads, x, ref) -> list[Row]:
    """The composite head with PyTorch's default BatchNorm init (weight 1, bias 0) on both sides, ours in eval
    and in train mode (leaves ours in train mode)."""
    with torch.no_grad():
        official.vars[12].fill_(1.0)
        heads.composite_head.conv[1].weight.fill_(1.0)
    out, mine = _both_heads(official, heads, x, ref)
    d = maxdiff(out[3], mine[:, 3])
    rows = [Row("AHL(DRA) composite head, BN weight 1 (ours eval, running stats 0/1)", d, verdict(d),
                "stride 3, no padding (ahl.official_geometry); official F.batch_norm with fixed stats 0/1")]  # fmt: skip
    heads.train()
    with torch.no_grad():
        mine_train = heads(x, [r.mean(0) for r in ref])
    d = maxdiff(out[3], mine_train[:, 3])
    rows.append(Row("AHL(DRA) composite head, BN weight 1, ours in train mode", d, verdict(d),
                    "ours normalises with batch statistics during inner/query passes; the official BN never "
                    "normalises (fixed mean 0, var 1)"))  # fmt: skip
    return rows


def _composite_gradient_row(main, layers, official, heads, x, ref) -> Row:
    """The gradient reaching the composite head with the official init: zero on both sides."""
    with torch.no_grad():
        official.vars[12].zero_()
        heads.composite_head.conv[1].weight.zero_()
    official.train(), heads.train()
    labels = torch.tensor([0] * 6 + [1] * 5 + [2] * 5)
    args = SimpleNamespace(model_name="DRA", total_heads=4, criterion="deviation", nRef=N_REF)
    trainer = _official_trainer(main, layers, args, official, ref)
    with standard_reference(layers):
        _out, loss = trainer.train_unit(x[0], x[1], labels, var=official.parameters())
    grads = torch.autograd.grad(loss, list(official.parameters()))
    comp_official = max(float(gr.abs().max()) for gr in grads[10:14])
    loss_ours = heads.loss(heads(x, [r.mean(0) for r in ref]), labels)
    params = dict(heads.named_parameters())
    g_ours = torch.autograd.grad(loss_ours, [params[n] for n in AHL_VARS[10:14]])
    comp_ours = max(float(gr.abs().max()) for gr in g_ours)
    return Row("AHL(DRA) composite conv+BN gradient, official init", None, "info",
               f"largest entry: official {comp_official:.3g}, ours with the same init {comp_ours:.3g}: "
               "with BN weight = bias = 0 the branch is dead on both sides; ours starts from the base "
               "model's trained BN instead")  # fmt: skip


def ahl_heads(root: Path) -> list[Row]:
    """The official AHL DRA heads (modeling/DRA_AHL.py) and ours with the official geometry, the same weights."""
    with Patches() as p:
        main, dra_ahl, _plain, _aux, layers, *_ = ahl_modules(root, p)
        g = torch.Generator().manual_seed(4)
        cfg = SimpleNamespace(total_heads=4, n_scales=2, nRef=N_REF)
        torch.manual_seed(0)
        official = dra_ahl.DRA(cfg)
        heads = ours.DRAHeads(C, topk=0.1, margin=5.0, official_geometry=True)
        copy_ahl_vars_to_ours(official, heads)
        x, ref = features(16, g), features(N_REF, g)
        official.eval(), heads.eval()
        rows = _official_init_rows(official, heads, x, ref)
        rows += _bn_weight_one_rows(official, heads, x, ref)
        rows.append(_composite_gradient_row(main, layers, official, heads, x, ref))
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

    def task_runs(self, i: int) -> tuple[list, list]:
        """Task i's support and query sampler runs (each run a list of batches of indices): the official epoch
        makes, per task, a support sampler and then a query sampler."""
        return self.batches[id(self.samplers[2 * i])], self.batches[id(self.samplers[2 * i + 1])]


def _task_data(g: torch.Generator, n_normal: int, n_seen: int, n_pseudo: int):
    """One task's features: (the official loader's batch, the two scales, the labels) for normals, seen and
    pseudo anomalies."""
    parts = [features(n_normal, g), features(n_seen, g, 0.5), features(n_pseudo, g, 0.25)]
    scales = [torch.cat([q[s] for q in parts]) for s in range(2)]
    labels = [0] * n_normal + [1] * n_seen + [2] * n_pseudo
    return [list(scales[0].numpy()), list(scales[1].numpy()), labels], scales, torch.tensor(labels)


@dataclass
class OfficialEpoch:
    """One official AHL epoch (main.Trainer.training, psi off) on given features, and what ours needs to replay it."""

    official: Any  # the official DRA; theta is its vars, unchanged by training() (its step is in the inner loop)
    heads: Any  # ours with the same weights, in train mode
    ref: list[torch.Tensor]  # the reference features per scale
    support: list  # per task: _task_data's (loader batch, scales, labels)
    query: list
    sampler_log: SamplerLog
    clips: list  # (pre-clip gradients, max_norm) per clip_grad_norm_ call
    inner: tuple  # (x, y, idx): the support batch of the inner step alone
    loss_s: torch.Tensor  # that step's support loss (official train_unit)
    phi: list[torch.Tensor]  # its adapted parameters theta - 2e-4 grad
    loss_f: Any  # the epoch's outer loss, as main.py prints it
    theta0: list[torch.Tensor]  # theta before training()


def _record_clips(p: Patches) -> list:
    """clip_grad_norm_ that records, call by call, the gradients it is given (before clipping) and max_norm."""
    clips = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        clips.append(([q.grad.detach().clone() for q in parameters], max_norm))
        return clip(parameters, max_norm, *args, **kwargs)

    p.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    return clips


def _shift_holistic_positive(official, tasks: list, ref: list[torch.Tensor]) -> None:
    """Shift the official holistic output positive on every input (before ours copies the weights), so that its
    missing |.| (an ahl_heads row) does not mask the rest of the comparison."""
    with torch.no_grad():
        pool = torch.cat([s[1][0] for s in tasks] + [ref[0]])
        hidden = torch.relu(F.linear(pool.mean(dim=(2, 3)), official.vars[0], official.vars[1]))
        raw = F.linear(hidden, official.vars[2], official.vars[3])
        official.vars[3] += 1.0 - float(raw.min())


def _meta_trainer(main, layers, args, official, ref: list[torch.Tensor], support: list, query: list):
    """The official Trainer for one epoch: our tasks as its support and query loaders, its optimiser and scheduler."""
    trainer = _official_trainer(main, layers, args, official, ref)
    trainer.support_loader = [s[0] for s in support]
    trainer.query_loader = [q[0] for q in query]
    trainer.optimizer = torch.optim.Adam(official.parameters(), lr=0.002, weight_decay=1e-4)
    trainer.scheduler = torch.optim.lr_scheduler.StepLR(trainer.optimizer, step_size=10, gamma=0.1)
    return trainer


def _official_epoch(root: Path) -> OfficialEpoch:
    """The inner step alone (official train_unit + autograd.grad + phi = theta - 2e-4 grad), then one epoch."""
    with Patches() as p:
        main, dra_ahl, _plain, _aux, layers, _utlis, _dl = ahl_modules(root, p)
        sampler_log = SamplerLog(main.BalancedBatchSampler)
        sampler_log.install(p)
        clips = _record_clips(p)
        printed = []
        p.setattr(main, "print", lambda *a, **k: printed.append(a))
        g = torch.Generator().manual_seed(5)
        args = SimpleNamespace(model_name="DRA", total_heads=4, criterion="deviation", cuda=False, nRef=N_REF,
                               n_scales=2, workers=0, batch_size=BATCH, steps_per_epoch=STEPS, update_step=UPDATE_STEP,
                               nAnomaly=4, auxiliary=False, episode_num=N_TASKS)  # fmt: skip
        p.setattr(main, "args", args)  # Trainer.training reads the script's global ``args`` for the query sampler
        torch.manual_seed(0)
        official = dra_ahl.DRA(args)
        ref = features(N_REF, g)
        support = [_task_data(g, 10, 2, 5) for _ in range(N_TASKS)]
        query = [_task_data(g, 10, 2, 5) for _ in range(N_TASKS)]
        _shift_holistic_positive(official, support + query, ref)
        heads = ours.DRAHeads(C, topk=0.1, margin=5.0, official_geometry=True)
        copy_ahl_vars_to_ours(official, heads)
        heads.train()
        trainer = _meta_trainer(main, layers, args, official, ref, support, query)
        np.random.seed(0)
        random.seed(0)
        theta0 = [v.detach().clone() for v in official.parameters()]
        with standard_reference(layers):
            x, y = support[0][1], support[0][2]
            idx = torch.arange(BATCH)
            _o, loss_s = trainer.train_unit(x[0][idx], x[1][idx], y[idx], var=official.parameters())
            grad = torch.autograd.grad(loss_s, list(official.parameters()))
            phi = [v - 0.0002 * gr for v, gr in zip(official.parameters(), grad)]
            trainer.ref = _reference_cycle(ref)
            trainer.training(0)
        loss_f = next(a[1] for a in printed if a and a[0] == "epoch_loss:")
    return OfficialEpoch(official, heads, ref, support, query, sampler_log, clips, (x, y, idx), loss_s, phi, loss_f,
                         theta0)  # fmt: skip


def _norm(tensors) -> float:
    """The 2-norm of the tensors taken as one vector (what clip_grad_norm_ measures)."""
    return math.sqrt(sum(float((q**2).sum()) for q in tensors))


def _inner_step_rows(e: OfficialEpoch, normal_mean, theta, buffers) -> list[Row]:
    """The inner step alone: ours on the same support batch from the same theta."""
    x, y, idx = e.inner
    phi, losses = ours.adapt(e.heads, theta, buffers, [([s[idx] for s in x], y[idx])], normal_mean, 2e-4, True)
    d = maxdiff(e.loss_s, losses[0])
    rows = [Row("AHL inner step: support loss", d, verdict(d, float(e.loss_s.detach())),
                f"official train_unit {float(e.loss_s.detach()):.5f} vs ours {float(losses[0]):.5f}")]  # fmt: skip
    d = max(maxdiff(e.phi[k].reshape(phi[n].shape), phi[n]) for k, n in enumerate(AHL_VARS))
    rows.append(Row("AHL inner step: adapted parameters phi", d, verdict(d), "phi = theta - 2e-4 * grad, all 14 tensors"))
    return rows


def _replayed_epoch_rows(e: OfficialEpoch, normal_mean, theta, buffers) -> list[Row]:
    """Ours fed the batches the official epoch drew: outer loss, meta-gradient, and how many inner steps count."""
    assert len(e.sampler_log.samplers) == 2 * N_TASKS, len(e.sampler_log.samplers)
    total = 0.0
    used_support, drawn_support = 0, 0
    for i in range(N_TASKS):
        s_runs, q_runs = e.sampler_log.task_runs(i)
        # round 0: every step restarts from theta (phi = theta - lr * grad(theta)), so only its last batch counts;
        # rounds 1..update_step-1 take first-order steps from phi; the loss is the sum over the last round's queries
        sequence = [s_runs[0][-1]] + [b for run in s_runs[1:] for b in run]
        used_support += len(sequence)
        drawn_support += sum(len(run) for run in s_runs)
        _, xs, ys = e.support[i]
        _, xq, yq = e.query[i]
        batches = [([s[b] for s in xs], ys[b]) for b in sequence]
        phi_i, _ = ours.adapt(e.heads, theta, buffers, batches, normal_mean, 2e-4, True)
        for b in q_runs[-1]:
            total = total + ours.query_loss(e.heads, phi_i, buffers, [s[b] for s in xq], yq[b], normal_mean)
    total = total / N_TASKS
    d = maxdiff(e.loss_f, total)
    rows = [Row("AHL outer (query) loss of one epoch", d, verdict(d, float(total)),
                f"official loss_f {float(e.loss_f):.5f} = sum over {STEPS} query batches and {N_TASKS} tasks / T; "
                "ours fed the same batches")]  # fmt: skip
    grads = torch.autograd.grad(total, [theta[n] for n in AHL_VARS])
    pre_official = e.clips[-1][0]
    d = max(maxdiff(pre_official[k].reshape(gr.shape), gr) for k, gr in enumerate(grads))
    rows.append(Row("AHL meta-gradient (second order through the first inner step)", d,
                    verdict(d, max(float(q.abs().max()) for q in pre_official), 1e-4),
                    f"pre-clip norm {_norm(pre_official):.4f}; theta unchanged by training(): "
                    f"{max(maxdiff(a, b) for a, b in zip(e.theta0, e.official.parameters())) == 0}"))  # fmt: skip
    rows.append(Row("AHL inner steps per task: official vs ours", None, "info",
                    f"official: {drawn_support // N_TASKS} support batches drawn, {used_support // N_TASKS} steps count "
                    f"(round 0 restarts from theta at every batch: 1 + (U-1)*S = {1 + (UPDATE_STEP - 1) * STEPS}); "
                    f"fresh batches in every round. Ours: U*S = {UPDATE_STEP * STEPS} steps over S = {STEPS} batches "
                    "drawn once and reused in every round"))  # fmt: skip
    return rows


def _query_scale_row(e: OfficialEpoch, normal_mean, theta, buffers) -> Row:
    """Ours as configured (query_batches = 1, mean over tasks) vs the official sum over S query batches."""
    one = 0.0
    for i in range(N_TASKS):
        s_runs, q_runs = e.sampler_log.task_runs(i)
        _, xs, ys = e.support[i]
        _, xq, yq = e.query[i]
        sequence = [b for run in s_runs[:1] for b in run] * UPDATE_STEP  # ours: the same S batches, U rounds
        batches = [([s[b] for s in xs], ys[b]) for b in sequence]
        phi_i, _ = ours.adapt(e.heads, theta, buffers, batches, normal_mean, 2e-4, True)
        b = q_runs[-1][0]
        one = one + ours.query_loss(e.heads, phi_i, buffers, [s[b] for s in xq], yq[b], normal_mean) / N_TASKS
    g_one = torch.autograd.grad(one, [theta[n] for n in AHL_VARS])
    pre_official = e.clips[-1][0]
    flat_o = torch.cat([q.flatten() for q in pre_official])
    flat_1 = torch.cat([q.flatten() for q in g_one])
    cos = float(F.cosine_similarity(flat_o, flat_1, dim=0))
    norm_official = _norm(pre_official)
    return Row("AHL outer loss scale: official sum of S query batches vs ours 1 batch", None, "info",
               f"S = {STEPS}: official loss {float(e.loss_f):.4f}, norm {norm_official:.4f}; ours (query_batches=1, "
               f"w = 1/T) loss {float(one):.4f}, norm {_norm(g_one):.4f}; cosine {cos:.3f}. Both are clipped to "
               "norm 1.0 before Adam; official x ~S in loss and gradient (x~S*T after epoch 7, when the "
               "1/T is dropped)")  # fmt: skip


def ahl_meta(root: Path) -> list[Row]:
    """One official AHL epoch (Trainer.training, psi off) on given tensors vs ours with the same batches."""
    e = _official_epoch(root)
    normal_mean = [r.mean(0) for r in e.ref]
    theta = dict(e.heads.named_parameters())
    buffers = dict(e.heads.named_buffers())
    rows = _inner_step_rows(e, normal_mean, theta, buffers) + _replayed_epoch_rows(e, normal_mean, theta, buffers)
    return rows + [_query_scale_row(e, normal_mean, theta, buffers)]


def ahl_devnet(root: Path) -> list[Row]:
    """AHL(DevNet)'s loss (official main.Trainer.train_unit, DevNet branch) vs ours on the same batch."""
    with Patches() as p:
        main, _dra, plain, _aux, layers, *_ = ahl_modules(root, p)
        g = torch.Generator().manual_seed(6)
        torch.manual_seed(0)
        args = SimpleNamespace(model_name="DevNet", n_scales=2, criterion="deviation")
        official = plain.Plain_Net(args)
        heads = ours.DevNetHeads(C, topk=0.1, margin=5.0)
        with torch.no_grad():
            heads.seen_head.conv.weight.copy_(official.vars[0])
            heads.seen_head.conv.bias.copy_(official.vars[1])
        _, x, y = _task_data(g, 8, 4, 4)
        trainer = _official_trainer(main, layers, args, official)
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
