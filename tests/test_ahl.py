"""AHL on a small synthetic feature cache: HADG's tasks, CDL's inner and outer steps, psi, and the training loop."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import FAMILIES, FAST, C, make_cache, make_heads
from sklearn.cluster import KMeans

from ahl.core.config import from_params, load_yaml
from ahl.core.errors import UserError
from ahl.method.cdl import adapt, query_loss
from ahl.method.estimator import EstimatorConfig, GeneralisationEstimation, GeneralisationEstimator, QueryPool, rewards
from ahl.method.forward import forward, score_features
from ahl.method.hadg import HADGConfig, check_batch, cluster_normals, draw_batch, make_tasks, pool_features
from ahl.method.init import initial_heads
from ahl.method.store import FeatureStore
from ahl.method.train_ahl import AHLConfig, train_ahl
from ahl.models.base import build_heads
from ahl.models.labels import NORMAL, PSEUDO, SEEN
from ahl.models.losses import deviation_loss


def score(features, heads, normal_mean, device):
    return score_features(features, heads, normal_mean, device, batch_size=64)


def train(cache, heads, config, seed=0, device="cpu"):
    """train_ahl with the pipeline's kind of callback: the test scores and AUC-ROC of every epoch."""
    test_scores = []

    def on_epoch(epoch, scored):
        test_scores.append(score(cache.test, scored, cache.normal_mean, device))
        return {"test_auc_roc": _auc(cache, test_scores[-1])}

    result = train_ahl(cache, heads, config, seed=seed, device=device, on_epoch=on_epoch)
    return result, test_scores


# Enough outer steps to learn in 3 epochs: 10 per epoch, each with one inner step per task (MAML's schedule).
LEARN = dataclasses.replace(FAST, steps_per_epoch=10, outer_steps_per_epoch=10)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def cache():
    return make_cache()[0]


# ---------------------------------------------------------------- HADG


def test_clusters_are_the_kmeans_members_not_the_first_files():
    cache, blob = make_cache()
    x = pool_features(cache.train_normal.scales)
    clusters = cluster_normals(x, HADGConfig(), seed=3)
    labels = KMeans(n_clusters=3, n_init=10, random_state=3).fit_predict(x)
    expected = [np.flatnonzero(labels == c) for c in range(3)]
    assert [c.tolist() for c in clusters] == [e.tolist() for e in expected]
    # the blobs are recovered exactly, and a cluster of n members is not the first n rows (official bug)
    assert sorted(map(tuple, clusters)) == sorted(tuple(np.flatnonzero(blob == b)) for b in range(3))
    assert all(c.tolist() != list(range(len(c))) for c in clusters)


def test_random_clusters_keep_the_sizes():
    cache, _ = make_cache()
    x = pool_features(cache.train_normal.scales)
    kmeans = cluster_normals(x, HADGConfig(), seed=0)
    shuffled = cluster_normals(x, HADGConfig(random_clusters=True), seed=0)
    assert [len(c) for c in shuffled] == [len(c) for c in kmeans]
    assert sorted(np.concatenate(shuffled).tolist()) == list(range(len(x)))
    assert any(set(a) != set(b) for a, b in zip(kmeans, shuffled))


@pytest.mark.parametrize(
    "sizes, n_clusters, n_tasks", [((20, 20, 2), 3, 2), ((15, 15, 15, 15), 4, 12), ((30, 30, 30), 3, 6)]
)
def test_small_clusters_are_dropped_and_tasks_are_ordered_pairs(sizes, n_clusters, n_tasks):
    cache, _ = make_cache(sizes=sizes)
    clusters = cluster_normals(pool_features(cache.train_normal.scales), HADGConfig(n_clusters=n_clusters), 0)
    assert all(len(c) >= 3 for c in clusters)
    c = len(clusters)
    tasks = make_tasks(clusters, 6, list(FAMILIES), np.random.default_rng(0))
    assert len(tasks) == c * (c - 1) == n_tasks
    assert sorted((t.support_cluster, t.query_cluster) for t in tasks) == [
        (i, j) for i in range(c) for j in range(c) if i != j
    ]
    for t in tasks:
        assert t.support_normals.tolist() == clusters[t.support_cluster].tolist()
        assert t.query_normals.tolist() == clusters[t.query_cluster].tolist()


def test_too_few_clusters_or_families_is_a_user_error():
    cache, _ = make_cache(sizes=(40, 2))
    x = pool_features(cache.train_normal.scales)
    with pytest.raises(UserError, match="n_clusters"):
        cluster_normals(x, HADGConfig(n_clusters=2), 0)
    clusters = [np.arange(5), np.arange(5, 10)]
    with pytest.raises(UserError, match="families"):
        make_tasks(clusters, 4, ["cutpaste"], np.random.default_rng(0))


@pytest.mark.parametrize("n_seen", [1, 2, 3, 10])
def test_support_and_query_anomalies_are_disjoint_halves(n_seen):
    clusters = [np.arange(0, 5), np.arange(5, 10), np.arange(10, 15)]
    tasks = make_tasks(clusters, n_seen, list(FAMILIES), np.random.default_rng(0))
    for t in tasks:
        if n_seen == 1:
            assert t.support_anomalies.tolist() == t.query_anomalies.tolist() == [0]
        else:
            assert not set(t.support_anomalies) & set(t.query_anomalies)
            assert sorted(np.r_[t.support_anomalies, t.query_anomalies].tolist()) == list(range(n_seen))
            assert len(t.support_anomalies) - len(t.query_anomalies) in (0, 1)
    if n_seen == 10:  # the halves are re-drawn per task
        assert len({tuple(t.support_anomalies) for t in tasks}) > 1


@pytest.mark.parametrize("families", [FAMILIES[:2], FAMILIES])
def test_support_and_query_families_differ(families):
    clusters = [np.arange(0, 5), np.arange(5, 10), np.arange(10, 15)]
    tasks = make_tasks(clusters, 4, list(families), np.random.default_rng(1))
    assert all(t.support_family != t.query_family for t in tasks)
    assert all(t.support_family in families and t.query_family in families for t in tasks)
    if len(families) == 3:  # 6 tasks get the 6 ordered pairs of families
        assert len({(t.support_family, t.query_family) for t in tasks}) == 6


def test_batches_are_16_16_16_and_pseudo_rows_come_from_the_task_normals(cache):
    normals = np.arange(0, 40)
    store = FeatureStore(cache, FAMILIES, torch.device("cpu"))
    split_of = {f: f for f in FAMILIES}

    def sample_batch(normals, anomalies, family):
        return store.batch(draw_batch(normals, anomalies, family, 48, np.random.default_rng(0)), split_of)

    features, labels = sample_batch(normals, np.arange(6), "draem")
    assert [int((labels == k).sum()) for k in (NORMAL, SEEN, PSEUDO)] == [16, 16, 16]
    assert [tuple(f.shape) for f in features] == [(48, C, 4, 4), (48, C, 2, 2)]
    assert all(f.dtype == torch.float32 for f in features)
    b = draw_batch(normals, np.arange(6), "draem", 48, np.random.default_rng(0))
    assert set(b.pseudo) <= set(normals) and set(b.normals) <= set(normals)
    assert not set(b.pseudo) & set(b.normals)  # 32 distinct normals drawn, half replaced by their pseudo version
    pseudo_rows = cache.pseudo["draem"].scales[0][b.pseudo].astype(np.float32)
    np.testing.assert_array_equal(features[0][labels == PSEUDO].numpy(), pseudo_rows)
    _, labels = sample_batch(normals, np.zeros(0, np.int64), "draem")
    assert [int((labels == k).sum()) for k in (NORMAL, SEEN, PSEUDO)] == [24, 0, 24]
    _, labels = sample_batch(normals, np.arange(6), None)
    assert [int((labels == k).sum()) for k in (NORMAL, SEEN, PSEUDO)] == [24, 24, 0]


# ---------------------------------------------------------------- CDL


def _task_batches(cache, n_support, seed=0):
    clusters = cluster_normals(pool_features(cache.train_normal.scales), HADGConfig(), 0)
    rng = np.random.default_rng(seed)
    task = make_tasks(clusters, len(cache.train_anomaly), list(FAMILIES), rng)[0]
    store = FeatureStore(cache, FAMILIES, torch.device("cpu"))
    split_of = {f: f for f in FAMILIES}
    support = [
        store.batch(draw_batch(task.support_normals, task.support_anomalies, task.support_family, 24, rng), split_of)
        for _ in range(n_support)
    ]
    query = store.batch(draw_batch(task.query_normals, task.query_anomalies, task.query_family, 24, rng), split_of)
    return store, support, query


@pytest.mark.parametrize("model", ["dra", "devnet"])
def test_inner_steps_lower_the_support_loss(cache, model):
    heads = make_heads(model).train()
    store, support, _ = _task_batches(cache, 1)
    theta = dict(heads.named_parameters())
    buffers = {n: b.clone() for n, b in heads.named_buffers()}
    ref = store.normal_mean
    features, labels = support[0]
    before = float(heads.loss(forward(heads, theta, buffers, features, ref), labels).detach())
    phi, losses = adapt(heads, theta, buffers, support * 10, ref, inner_lr=2e-3, second_order=True)
    after = float(heads.loss(forward(heads, phi, buffers, features, ref), labels).detach())
    assert after < before
    assert float(losses[-1]) < float(losses[0])
    assert all(p.grad is None for p in heads.parameters())  # adaptation never touches theta_g's .grad


@pytest.mark.parametrize("official_geometry", [True, False])
def test_a_memo_per_support_batch_changes_no_bit_of_the_adaptation(official_geometry):
    """AHL's rounds revisit the same support batches; what the heads derive from a batch's features alone (the
    composite head's residual patches, the holistic head's spatial mean) is kept in a memo per batch and scale.
    phi, the support losses and the meta-gradient are bitwise those computed without it."""
    torch.manual_seed(0)
    heads = build_heads("dra", C, topk=0.1, margin=5.0, official_geometry=official_geometry)
    heads = heads.to(memory_format=torch.channels_last).train()
    normal_mean = [torch.rand(C, 7, 7), torch.rand(C, 4, 4)]
    batches = [
        ([torch.rand(12, C, n, n).contiguous(memory_format=torch.channels_last) for n in (7, 4)],
         torch.tensor([NORMAL] * 4 + [SEEN] * 4 + [PSEUDO] * 4))
        for _ in range(2)
    ]  # fmt: skip
    memos = [[{}, {}] for _ in batches]
    runs = {}
    for with_memo in (False, True):
        buffers = {n: b.clone() for n, b in heads.named_buffers()}
        theta = {n: p.detach().clone().requires_grad_() for n, p in heads.named_parameters()}
        rounds = [(f, y, m) if with_memo else (f, y) for _ in range(3) for (f, y), m in zip(batches, memos)]
        phi, losses = adapt(heads, theta, buffers, rounds, normal_mean, inner_lr=2e-3, second_order=True)
        query_loss(heads, phi, buffers, *batches[0], normal_mean).backward()
        runs[with_memo] = (phi, losses, {n: t.grad for n, t in theta.items()}, buffers)
        if with_memo:  # what the first round kept
            kept = {key for memo in memos for scale in memo for key in scale}
            assert ("spatial mean",) in kept
            assert any(key[0] == "residual patches" for key in kept) == official_geometry  # stride 1: a convolution
    for a, b in zip(runs[False], runs[True]):
        if isinstance(a, dict):
            assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
        else:
            assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("second_order", [True, False])
def test_meta_gradient_reaches_every_parameter(cache, second_order):
    heads = make_heads("dra").train()
    store, support, query = _task_batches(cache, 3)
    theta = dict(heads.named_parameters())
    buffers = dict(heads.named_buffers())
    phi, _ = adapt(heads, theta, buffers, support, store.normal_mean, 2e-4, second_order)
    query_loss(heads, phi, buffers, *query, store.normal_mean).backward()
    for name, p in heads.named_parameters():
        # .grad starts as None: a parameter the outer backward does not reach keeps None
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name.endswith("bias") and name != "composite_head.conv.1.bias":
            # Biases can have an exact zero gradient: the composite conv's bias is cancelled by the train-mode
            # BatchNorm after it, and a patch head's bias gradient is a sum of +-1 terms (top-1 of 4x4 maps).
            continue
        assert p.grad.abs().sum() > 0, name
    names = {n for n, _ in heads.named_parameters()}
    assert {"composite_head.conv.0.weight", "composite_head.conv.1.weight", "composite_head.conv.1.bias"} <= names


def test_second_order_term_changes_the_meta_gradient(cache):
    grads = {}
    for second_order in (True, False):
        heads = make_heads("dra").train()
        store, support, query = _task_batches(cache, 2)
        theta, buffers = dict(heads.named_parameters()), {n: b.clone() for n, b in heads.named_buffers()}
        phi, _ = adapt(heads, theta, buffers, support, store.normal_mean, 1e-2, second_order)
        query_loss(heads, phi, buffers, *query, store.normal_mean).backward()
        grads[second_order] = torch.cat([p.grad.flatten() for p in heads.parameters()])
    assert not torch.allclose(grads[True], grads[False])


# ---------------------------------------------------------------- psi


def test_psi_has_a_zero_initial_state_so_predictions_are_deterministic():
    psi = GeneralisationEstimator(6, history=5).eval()
    x = torch.randn(7, 5, 6)
    a, b = psi(x), psi(x)
    assert torch.equal(a, b)
    out, _ = psi.lstm(x, (torch.zeros(4, 7, 6), torch.zeros(4, 7, 6)))
    assert torch.allclose(a, psi.head(torch.relu(out[:, -1])))
    assert a.shape == (7, 6)


def test_rewards_follow_the_cost_and_the_support_cluster():
    clusters = [np.arange(0, 4), np.arange(4, 8)]
    tasks = make_tasks(clusters, 2, ["a", "b"], np.random.default_rng(0))
    pool = QueryPool.build(clusters, 2, ["a", "b"], per_family=3, rng=np.random.default_rng(0))
    cost, include = pool.cost_and_include(tasks)
    labels = pool.labels()
    assert len(pool) == 8 + 2 + 6 and labels.tolist() == [0] * 8 + [1] * 8
    for i, t in enumerate(tasks):
        assert include[:8, i].tolist() == [n not in t.support_normals for n in range(8)]
        assert (cost[:8, i] == 0.5).all()
        assert cost[8:10, i].tolist() == [0.5 if a in t.support_anomalies else 1.0 for a in range(2)]
        for k, (family, rows) in enumerate(pool.pseudo.items()):
            block = slice(10 + 3 * k, 13 + 3 * k)
            assert (cost[block, i] == (0.5 if family == t.support_family else 1.0)).all()
            assert include[block, i].tolist() == [r not in t.support_normals for r in rows]
    predicted = np.tile(labels[:, None], (1, len(tasks)))
    predicted[:, 1] += 1.0  # task 1 is predicted to be off by 1 everywhere, task 0 exact
    r = rewards(predicted, labels, cost, include)
    assert r[0] == 0 and r[1] > 0


def test_task_weights_are_uniform_before_warm_up_and_sum_to_one(cache):
    config = dataclasses.replace(FAST, epochs=4, history=2)
    result, _ = train(cache, make_heads(), config, seed=0, device=torch.device("cpu"))
    for entry in result.history:
        w = np.array(entry["task_weights"])
        assert w.shape == (6,) and np.isclose(w.sum(), 1.0) and (w > 0).all()
        if entry["epoch"] <= config.history + 1:  # psi needs K epochs as input plus one as target first
            assert np.allclose(w, 1 / 6)
    assert not np.allclose(result.history[-1]["task_weights"], 1 / 6)

    estimation = GeneralisationEstimation(3, EstimatorConfig(history=2, weighting="uniform"), seed=0)
    for _ in range(4):
        estimation.push(np.random.default_rng(0).normal(size=(5, 3)))
        estimation.fit()
    w, _ = estimation.weights(np.zeros(5), np.ones((5, 3)), np.ones((5, 3), bool))
    assert np.allclose(w, 1 / 3)


# ---------------------------------------------------------------- training loop


def _strip(history):
    return [{k: v for k, v in e.items() if k != "seconds"} for e in history]


def test_same_seed_gives_the_same_history(cache):
    config = dataclasses.replace(FAST, epochs=2)
    a, a_scores = train(cache, make_heads(), config, seed=5)
    b, b_scores = train(cache, make_heads(), config, seed=5)
    assert _strip(a.history) == _strip(b.history)
    for x, y in zip(a_scores, b_scores):
        np.testing.assert_array_equal(x, y)
    c, _ = train(cache, make_heads(), config, seed=6)
    assert _strip(a.history) != _strip(c.history)


def test_training_raises_test_auc_and_leaves_the_input_heads_alone(cache):
    heads = make_heads()
    before = {n: p.clone() for n, p in heads.state_dict().items()}
    initial_auc = _auc(cache, score(cache.test, heads, cache.normal_mean, "cpu"))
    result, test_scores = train(cache, heads, LEARN, seed=0)
    aucs = [e["test_auc_roc"] for e in result.history]
    assert len(aucs) == 3 and aucs[-1] > 0.9 and aucs[-1] > initial_auc + 0.1
    assert all(torch.equal(before[n], p) for n, p in heads.state_dict().items())
    # the returned heads are theta_g of the last epoch: scoring them again gives the last epoch's test scores
    again = score(cache.test, result.heads, cache.normal_mean, "cpu")
    np.testing.assert_allclose(again, test_scores[-1], rtol=1e-5, atol=1e-5)
    assert not result.heads.training


def _auc(cache, scores):
    from sklearn.metrics import roc_auc_score

    return roc_auc_score(cache.test.labels != 0, scores)


@pytest.mark.parametrize(
    "change",
    [
        {"cdl": False},
        {"weighting": "uniform", "second_order": False},
        {"init": "random"},
    ],
)
def test_ablations_run(cache, change):
    config = dataclasses.replace(FAST, epochs=2, **change)
    result, _ = train(cache, make_heads(), config, seed=0)
    assert len(result.history) == 2
    assert all(e["test_auc_roc"] is not None for e in result.history)
    scores = score(cache.test, result.heads, cache.normal_mean, "cpu")
    assert scores.shape == (40,) and np.isfinite(scores).all()


def test_fresh_support_rounds_draw_new_batches_and_equal_same_with_one_round(cache):
    """ahl.support_rounds: fresh (the official sampler's behaviour) changes the run; with a single round there is
    nothing to redraw, and it is the same run as "same"."""
    runs = {}
    for rounds, update_step in (("same", 1), ("fresh", 1), ("same", 2), ("fresh", 2)):
        config = dataclasses.replace(FAST, epochs=2, update_step=update_step, support_rounds=rounds)
        runs[rounds, update_step] = _strip(train(cache, make_heads(), config, seed=0)[0].history)
    assert runs["same", 1] == runs["fresh", 1]
    assert runs["same", 2] != runs["fresh", 2]
    with pytest.raises(UserError, match="ahl.support_rounds must be one of same, fresh"):
        AHLConfig(support_rounds="new")


def test_devnet_heads_train(cache):
    result, _ = train(cache, make_heads("devnet"), LEARN, seed=0)
    assert result.history[-1]["test_auc_roc"] > 0.8


def test_redraw_augmentation_uses_the_variants(cache):
    variants = dict(cache.pseudo)
    for family in FAMILIES:  # two variants per family, the second a slightly different draw
        base = variants.pop(family)
        variants[f"{family}@0"] = base
        variants[f"{family}@1"] = dataclasses.replace(base, scales=[(x * 1.1).astype(np.float16) for x in base.scales])
    multi = dataclasses.replace(cache, pseudo=variants)
    redraw = dataclasses.replace(FAST, epochs=2, redraw_augmentation=True)
    a, _ = train(multi, make_heads(), redraw, seed=0)
    b, _ = train(multi, make_heads(), dataclasses.replace(FAST, epochs=2), seed=0)
    assert {t.support_family for t in a.tasks} <= set(FAMILIES)
    assert _strip(a.history) != _strip(b.history)


def _from_params(**changes) -> AHLConfig:
    section = load_yaml("params.yaml")["ahl"]
    for key, value in changes.items():
        *parents, leaf = key.split("__")
        node = section
        for p in parents:
            node = node[p]
        node[leaf] = value
    return from_params(AHLConfig, section, "ahl")


def test_config_from_params_takes_every_value_from_params_and_rejects_mistakes():
    config = _from_params(epochs=2, hadg__n_clusters=4)
    assert config.epochs == 2 and config.hadg.n_clusters == 4
    with pytest.raises(UserError, match=r"ahl.epoch \(did you mean 'epochs'\?\)"):
        _from_params(epoch=2)
    with pytest.raises(UserError, match=r"ahl.hadg.n_cluster \(did you mean 'n_clusters'\?\)"):
        _from_params(hadg__n_cluster=2)
    with pytest.raises(UserError, match="weighting"):
        _from_params(weighting="lstm")
    with pytest.raises(UserError, match=r"ahl.lr = '2e-4x' is not float"):
        _from_params(lr="2e-4x")
    section = load_yaml("params.yaml")["ahl"]
    del section["psi_steps"]
    with pytest.raises(UserError, match=r"missing key\(s\) ahl.psi_steps"):
        from_params(AHLConfig, section, "ahl")


def test_ahl_trains_with_the_base_models_margin(cache):
    """The deviation-loss margin is the base model's (base.margin), carried by the heads into every AHL loss."""
    store, support, _ = _task_batches(cache, 1)
    losses = {}
    for margin in (2.0, 5.0):
        heads = make_heads(margin=margin).train()
        theta, buffers = dict(heads.named_parameters()), {n: b.clone() for n, b in heads.named_buffers()}
        _, (loss,) = adapt(heads, theta, buffers, support, store.normal_mean, 2e-4, False)
        features, labels = support[0]
        with torch.no_grad():
            scores = forward(heads, theta, {n: b.clone() for n, b in heads.named_buffers()}, features, store.normal_mean)
            expected = sum(
                deviation_loss(scores[mask, h], target[mask], margin)
                for h, (mask, target) in enumerate(heads.targets(labels)) if mask.any()
            )  # fmt: skip
        assert float(loss) == pytest.approx(float(expected), rel=1e-6)
        losses[margin] = float(loss)
    assert losses[2.0] != losses[5.0]
    official = initial_heads(make_heads(margin=2.0), "dra", True, [(6, 6), (3, 3)])
    assert official.margin == 2.0 and official.topk == 0.1


def test_the_store_wraps_read_only_maps_without_a_warning(tmp_path):
    """A cache's memory maps are read-only; 1 x 1 maps need no transposing copy, and torch warns about wrapping a
    non-writable array (once per process, in every run's log)."""
    import warnings

    from ahl.method.store import _to_tensor

    np.save(tmp_path / "x.npy", np.arange(24, dtype=np.float16).reshape(4, 6, 1, 1))
    x = np.load(tmp_path / "x.npy", mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = _to_tensor(x, torch.device("cpu"))
    assert t.shape == (4, 1, 1, 6) and torch.equal(t[:, 0, 0], torch.from_numpy(np.array(x[:, :, 0, 0])))


def test_an_ahl_batch_larger_than_a_tasks_rows_is_refused_in_one_line():
    cache, _ = make_cache()  # 60 normals, 6 seen: a task draws from at most 2 * 60 + 6 = 126 rows
    with pytest.raises(UserError, match=r"ahl.batch_size = 127 is more than the 126 rows .* at most 126"):
        train(cache, make_heads(), dataclasses.replace(FAST, batch_size=127), seed=0, device=torch.device("cpu"))
    check_batch(126, 60, 6)  # the bound itself is allowed
