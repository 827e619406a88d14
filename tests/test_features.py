"""The feature cache: shapes, dtypes, the same features as scoring, pseudo-anomaly families, atomic writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import feature_splits

from ahl.core.errors import UserError
from ahl.method.cache import CacheConfig, load_cache, write_cache
from ahl.models.base import BackboneConfig, build_model


@pytest.fixture(scope="module")
def model():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = build_model("dra", BackboneConfig(name="efficientnet_lite0", image_size=64, n_scales=2), topk=0.1, margin=5.0).eval()
    return m





def test_cache_shapes_dtypes_and_scoring_features(small_dataset, model, tmp_path):
    splits = feature_splits(small_dataset)
    normal_mean = [torch.randn(320, 2, 2), torch.randn(320, 1, 1)]
    write_cache(tmp_path / "c", model, normal_mean, splits, CacheConfig(batch_size=4), seed=0, device="cpu", meta={"x": 1})
    cache = load_cache(tmp_path / "c")
    assert cache.meta == {"x": 1} and cache.n_scales == 2
    assert sorted(cache.pseudo) == ["cutmix", "cutpaste", "draem"]
    for fs, n in [(cache.train_normal, 6), (cache.train_anomaly, 2), (cache.test, 6), *[(p, 6) for p in cache.pseudo.values()]]:
        assert [x.shape for x in fs.scales] == [(n, 320, 2, 2), (n, 320, 1, 1)]
        assert all(x.dtype == np.float32 and isinstance(x, np.memmap) for x in fs.scales)
    assert cache.pseudo["draem"].labels.tolist() == [2] * 6 and cache.test.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert cache.test.classes[-1] == "crack" and cache.train_anomaly.files == splits["train_anomaly"][3]
    # cached features = the features the model computes when scoring (eval mode, normalisation inside)
    x = torch.from_numpy(splits["test"][0]).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        feats = model.features(x)
    for s in range(2):
        assert np.allclose(cache.test.scales[s], feats[s].numpy(), atol=2e-2, rtol=1e-2)
    # pseudo anomalies differ from their normals, family by family
    for fam in cache.pseudo.values():
        assert not np.allclose(fam.scales[0], cache.train_normal.scales[0])
    assert np.allclose(cache.normal_mean[0], normal_mean[0].numpy())


def test_cache_is_deterministic_and_float32_option(small_dataset, model, tmp_path):
    splits = feature_splits(small_dataset)
    ref = [torch.zeros(320, 2, 2), torch.zeros(320, 1, 1)]
    for name in ("a", "b"):
        write_cache(tmp_path / name, model, ref, splits, CacheConfig(families=("cutpaste", "cutmix")), seed=3, device="cpu")
    a, b = load_cache(tmp_path / "a"), load_cache(tmp_path / "b")
    assert np.array_equal(a.pseudo["cutpaste"].scales[0], b.pseudo["cutpaste"].scales[0])
    write_cache(tmp_path / "f32", model, ref, splits, CacheConfig(dtype="float32", variants=2), seed=3, device="cpu")
    c = load_cache(tmp_path / "f32")
    assert c.test.scales[0].dtype == np.float32 and sorted(c.pseudo)[:2] == ["cutmix@0", "cutmix@1"]


def test_failure_midway_leaves_no_cache(small_dataset, model, tmp_path, monkeypatch):
    import ahl.pseudo.maker

    def broken(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(ahl.pseudo.maker.PseudoAnomalyMaker, "make", broken)
    with pytest.raises(RuntimeError):
        write_cache(tmp_path / "c", model, [torch.zeros(320, 2, 2)] * 2, feature_splits(small_dataset), CacheConfig(), seed=0, device="cpu")
    assert not (tmp_path / "c").exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="not a complete feature cache"):
        load_cache(tmp_path / "c")


def test_cache_config_errors():
    with pytest.raises(UserError, match="unknown family 'mixup'"):
        CacheConfig(families=("mixup", "draem"))
    with pytest.raises(UserError, match="at least 2 families"):
        CacheConfig(families=("draem",))
    with pytest.raises(UserError, match="float16 or float32"):
        CacheConfig(dtype="int8")


def test_a_corrupt_or_truncated_cache_is_a_one_line_error(small_dataset, model, tmp_path):
    normal_mean = [torch.randn(320, 2, 2), torch.randn(320, 1, 1)]
    config = CacheConfig(families=("cutpaste", "cutmix"), batch_size=8)
    write_cache(tmp_path / "c", model, normal_mean, feature_splits(small_dataset), config, seed=0, device="cpu")
    index = tmp_path / "c" / "index.json"
    good = index.read_text()
    index.write_text(good[: len(good) // 2])
    with pytest.raises(UserError, match=r"index.json is corrupt .*dvc repro -f features"):
        load_cache(tmp_path / "c")
    index.write_text(good)
    npy = tmp_path / "c" / "test.s0.npy"
    npy.write_bytes(npy.read_bytes()[:200])
    with pytest.raises(UserError, match=r"test.s0.npy is unreadable .*dvc repro -f features"):
        load_cache(tmp_path / "c")


def test_draem_textures_stretched_once_give_the_same_pseudo_anomalies():
    """The maker keeps each in-memory DRAEM texture stretched to the image size: the pseudo anomalies are the
    ones draem() makes from the original texture with the same random stream, bit for bit."""
    from ahl.pseudo.draem import draem
    from ahl.pseudo.maker import PseudoAnomalyMaker

    rng = np.random.default_rng(0)
    normals = rng.integers(0, 256, (4, 40, 48, 3), dtype=np.uint8)
    sources = [rng.integers(0, 256, (70, 90, 3), dtype=np.uint8), rng.random((30, 30))]  # RGB uint8, grey float
    maker = PseudoAnomalyMaker(normals, sources=sources)
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    for i in [0, 1, 2, 3, 0, 1]:
        made = maker.make("draem", i, a)
        expected = draem(normals[i], sources[int(b.integers(len(sources)))], b)
        assert np.array_equal(made, expected)
    assert len(maker._stretched) == 2  # one stretched copy per texture and image size
