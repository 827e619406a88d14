"""CDL's meta-gradient (ahl/method/cdl.py) against an independent computation with torch.func, and the
heads-ensemble checkpoint of the `ahl.cdl: false` ablation through a save/load round trip."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call, grad

from ahl.method.cdl import task_meta_gradient
from ahl.models.base import load_heads, save_heads
from ahl.models.devnet import DevNetHeads
from ahl.models.dra import DRAHeads
from ahl.models.heads import HeadsEnsemble

LR = 0.3


def _batch(seed: int, labels: list[int], channels: int = 8):
    g = torch.Generator().manual_seed(seed)
    features = [torch.randn(len(labels), channels, 4, 4, generator=g, dtype=torch.float64),
                torch.randn(len(labels), channels, 2, 2, generator=g, dtype=torch.float64)]  # fmt: skip
    return features, torch.tensor(labels)


def _setup(heads_cls):
    torch.manual_seed(0)
    heads = heads_cls(8, topk=0.25, margin=5.0).double().train()
    mean = [torch.randn(8, 4, 4, dtype=torch.float64), torch.randn(8, 2, 2, dtype=torch.float64)]
    mean = mean if heads.uses_normal_mean else None
    support = _batch(1, [0, 0, 1, 2, 0, 1])
    query = _batch(2, [0, 1, 0, 2, 1, 0])
    return heads, mean, support, query


def _loss(heads, weights, buffers, batch, mean):
    features, labels = batch
    return heads.loss(functional_call(heads, (weights, buffers), (features, mean, None)), labels)


def _untracked(heads):
    """A copy of ``heads`` whose BatchNorm keeps no running statistics: in train mode it normalises by the batch
    either way, and torch.func's transforms refuse the in-place updates of tracked statistics."""
    heads = copy.deepcopy(heads)
    for m in heads.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.track_running_stats, m.running_mean, m.running_var, m.num_batches_tracked = False, None, None, None
    return heads


def _expected(heads, theta, buffers, support, query, mean, second_order: bool):
    """d/dtheta L_q(theta - lr * grad L_s(theta)) by torch.func: through the inner gradient (second order) or with
    it held constant at theta (first order: the gradient of L_q at phi)."""
    heads, buffers = _untracked(heads), {}
    inner = grad(lambda th: _loss(heads, th, buffers, support, mean))
    if second_order:
        return grad(lambda th: _loss(heads, {n: th[n] - LR * g for n, g in inner(th).items()}, buffers, query, mean))(
            theta
        )
    fixed = inner(theta)
    return grad(lambda th: _loss(heads, {n: th[n] - LR * fixed[n] for n in th}, buffers, query, mean))(theta)


@pytest.mark.parametrize("heads_cls", [DevNetHeads, DRAHeads])
@pytest.mark.parametrize("second_order", [True, False])
def test_meta_gradient_is_the_gradient_through_the_inner_step(heads_cls, second_order):
    heads, mean, support, query = _setup(heads_cls)
    start = {n: p.detach().clone() for n, p in heads.named_parameters()}
    buffers = {n: b.clone() for n, b in heads.named_buffers()}
    expected = _expected(heads, start, buffers, support, query, mean, second_order)
    theta = {n: p.clone().requires_grad_() for n, p in start.items()}
    buffers = {n: b.clone() for n, b in heads.named_buffers()}
    task_meta_gradient(
        heads, theta, buffers, [support], [query], 1, mean, weight=1.0, inner_lr=LR, second_order=second_order
    )
    for name, p in theta.items():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-9, atol=1e-12, msg=name)
    if second_order and heads_cls is DRAHeads:  # the Hessian term is there (DevNet's loss is piecewise linear)
        first = _expected(heads, start, buffers, support, query, mean, second_order=False)
        assert any(not torch.allclose(first[n], expected[n], rtol=1e-6, atol=1e-9) for n in expected)


def test_ensemble_checkpoint_of_the_no_cdl_ablation_round_trips(tmp_path):
    torch.manual_seed(0)
    members = [DRAHeads(8, topk=0.25, margin=5.0) for _ in range(3)]
    ensemble = HeadsEnsemble(members).eval()
    meta = {"model": "dra", "in_channels": 8, "topk": 0.25, "margin": 5.0, "official_geometry": False,
            "members": 3, "feature_dtype": "float16"}  # fmt: skip
    save_heads(tmp_path / "ahl.pt", ensemble, meta)
    loaded, loaded_meta = load_heads(tmp_path / "ahl.pt")
    assert isinstance(loaded, HeadsEnsemble) and len(loaded.members) == 3 and loaded_meta == meta
    features, _ = _batch(3, [0, 1, 2, 0])
    features = [f.float() for f in features]
    mean = [torch.randn(8, 4, 4), torch.randn(8, 2, 2)]
    with torch.no_grad():
        assert torch.equal(loaded(features, mean), ensemble(features, mean))
        assert torch.equal(loaded.final_score(loaded(features, mean)), ensemble.final_score(ensemble(features, mean)))
    for a, b in zip(loaded.state_dict().values(), ensemble.state_dict().values(), strict=True):
        assert torch.equal(a, b)
