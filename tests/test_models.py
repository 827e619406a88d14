"""Heads, deviation loss, backbones and the base trainer: shapes, targets, gradients, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ahl.core.errors import UserError
from ahl.models.backbones import build_backbone, multiscale
from ahl.models.base import BackboneConfig, load_base_heads, load_checkpoint, save_checkpoint
from ahl.models.devnet import DevNetHeads
from ahl.models.dra import DRAHeads
from ahl.models.heads import conv_as_matmul, topk_mean
from ahl.models.losses import deviation_loss
from ahl.models.train_base import BaseConfig, BatchSampler, train_base


def test_deviation_loss_values():
    s = torch.tensor([0.5, -2.0, 7.0, 1.0])
    y = torch.tensor([0, 0, 1, 1])
    # normals: |s| ; anomalies: max(0, 5 - s)
    expected = (0.5 + 2.0 + 0.0 + 4.0) / 4
    assert deviation_loss(s, y).item() == pytest.approx(expected)
    assert deviation_loss(s, y, margin=1.0).item() == pytest.approx((0.5 + 2.0 + 0.0 + 0.0) / 4)


def test_deviation_loss_with_a_sampled_reference_standardises_by_its_mean_and_std():
    s = torch.tensor([0.5, -2.0, 7.0, 1.0])
    y = torch.tensor([0, 0, 1, 1])
    r = torch.tensor([-1.0, 0.0, 3.0])  # mean 2/3, std sqrt(13/3) (unbiased, as torch.std and the official code)
    dev = (s - 2 / 3) / (13 / 3) ** 0.5
    expected = (dev[0].abs() + dev[1].abs() + (5 - dev[2]).clamp(min=0) + (5 - dev[3]).clamp(min=0)) / 4
    assert deviation_loss(s, y, draws=r).item() == pytest.approx(expected.item(), rel=1e-6)
    heads = DevNetHeads(8, topk=0.1, margin=5.0)
    scores = s[:, None]
    assert heads.loss(scores, y, draws=r[None]).item() == pytest.approx(expected.item(), rel=1e-6)
    assert heads.loss(scores, y).item() == pytest.approx(deviation_loss(s, y).item())


def test_topk_mean_takes_the_largest_magnitudes():
    x = torch.zeros(1, 1, 4, 5)
    x[0, 0, 0, 0], x[0, 0, 1, 1] = -10.0, 4.0
    assert topk_mean(x, 0.1).item() == pytest.approx(7.0)  # k = 2 of 20 positions
    assert topk_mean(x, 0.01).item() == pytest.approx(10.0)  # k >= 1


def _features(batch=6, channels=8):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, channels, 6, 6, generator=g), torch.randn(batch, channels, 3, 3, generator=g)]


def test_dra_heads_shapes_targets_and_gradients():
    with torch.random.fork_rng(devices=[]):  # the initialisation must not depend on which tests ran before
        torch.manual_seed(0)
        heads = DRAHeads(8, topk=0.1, margin=5.0, hidden=16)
    feats = _features()
    normal_mean = [f[:2].mean(0) for f in feats]
    scores = heads(feats, normal_mean)
    assert scores.shape == (6, 4) and heads.final_score(scores).shape == (6,)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    masks = heads.targets(labels)
    assert masks[1][0].tolist() == [True, True, True, True, False, False]  # seen head ignores pseudo
    assert masks[2][0].tolist() == [True, True, False, False, True, True]  # pseudo head ignores seen
    assert masks[0][1].tolist() == [True, True, False, False, False, False]  # holistic learns normality
    heads.loss(scores, labels).backward()
    for name, p in heads.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # final score = -holistic + seen + pseudo + composite
    s = scores.detach()
    assert torch.allclose(heads.final_score(s), -s[:, 0] + s[:, 1] + s[:, 2] + s[:, 3])


def test_dra_needs_reference_and_official_geometry_shrinks_the_map():
    heads = DRAHeads(8, topk=0.1, margin=5.0)
    with pytest.raises(ValueError, match="normal_mean"):
        heads(_features(), None)
    official = DRAHeads(8, topk=0.1, margin=5.0, official_geometry=True)
    x = torch.randn(2, 8, 14, 14)
    assert official.composite_head.conv(x).shape[-1] == 4 and heads.composite_head.conv(x).shape[-1] == 14


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("kernel,stride,padding", [(3, 3, 0), (3, 3, 1), (3, 4, 0), (1, 1, 0), (1, 2, 0), (3, 1, 1)])
def test_conv_as_matmul_equals_the_convolution_and_its_gradients(kernel, stride, padding, channels_last):
    """The heads' non-overlapping convolutions run as matrix products (AHL's speed): same outputs and gradients
    (input, kernel, bias) as nn.Conv2d, in float64 to 1e-12: the official composite geometry, 1 x 1 patch heads,
    other strides and paddings, both memory layouts; DRA's stride-1 geometry stays a convolution."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 8, kernel, stride=stride, padding=padding).double()
    for size in (14, 7, 3):
        x = torch.randn(4, 16, size, size, dtype=torch.float64, requires_grad=True)
        inp = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        expected, got = conv(inp), conv_as_matmul(inp, conv)
        assert got.shape == expected.shape
        assert got.is_contiguous(memory_format=torch.channels_last) or stride < kernel
        assert torch.allclose(got, expected, rtol=0, atol=1e-12)
        grad = torch.randn_like(expected)
        wrt = [x, conv.weight, conv.bias]
        for a, b in zip(torch.autograd.grad(got, wrt, grad), torch.autograd.grad(expected, wrt, grad)):
            assert torch.allclose(a, b, rtol=0, atol=1e-12)
    # overlapping windows, scoring (no gradient) and what it does not rewrite are left to the convolution itself
    if stride < kernel:
        assert torch.equal(conv_as_matmul(inp, conv), conv(inp))
    with torch.no_grad():
        assert torch.equal(conv_as_matmul(inp, conv), conv(inp))
    grouped = torch.nn.Conv2d(16, 8, 3, padding=1, groups=2).double()
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    assert torch.equal(conv_as_matmul(x, grouped), grouped(x))
    # with a reference: conv(reference - x), the difference taken while the patches are gathered, bitwise the same
    # values as subtracting first (x without gradient, as AHL's cached features; and with one)
    normal_mean = torch.randn(16, 14, 14, dtype=torch.float64)
    for x in (
        torch.randn(3, 16, 14, 14, dtype=torch.float64),
        torch.randn(3, 16, 14, 14, dtype=torch.float64).requires_grad_(),
    ):
        x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        assert torch.equal(conv_as_matmul(x, conv, normal_mean), conv_as_matmul(normal_mean[None] - x, conv))
        with torch.no_grad():
            assert torch.equal(conv_as_matmul(x, conv, normal_mean), conv(normal_mean[None] - x))


@pytest.mark.parametrize("official_geometry", [True, False])
def test_composite_residual_in_training_is_the_convolution_of_the_difference(official_geometry):
    """The composite head's conv(reference - x) -> BatchNorm -> ReLU in training (official geometry: the difference
    taken while the patches are gathered) equals that of the plain convolution, outputs and gradients (float64);
    scoring (no gradient) computes conv(reference - x) itself, bitwise."""
    from ahl.models.dra import CompositeHead

    torch.manual_seed(0)
    head = CompositeHead(16, official_geometry=official_geometry).double()
    x = torch.randn(4, 16, 14, 14, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    normal_mean = torch.randn(16, 14, 14, dtype=torch.float64)
    conv, norm, relu = head.conv
    got = head.residual(x, normal_mean)
    expected = relu(norm(conv(normal_mean[None] - x)))
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)
    grad = torch.randn_like(expected)
    wrt = [conv.weight, conv.bias, norm.weight]
    for a, b in zip(torch.autograd.grad(got, wrt, grad), torch.autograd.grad(expected, wrt, grad)):
        assert torch.allclose(a, b, rtol=0, atol=1e-10)
    head.eval()
    with torch.no_grad():
        assert torch.equal(head.residual(x, normal_mean), relu(norm(conv(normal_mean[None] - x))))


def test_devnet_head():
    heads = DevNetHeads(8, topk=0.1, margin=5.0)
    scores = heads(_features())
    assert scores.shape == (6, 1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    mask, target = heads.targets(labels)[0]
    assert mask.all() and target.tolist() == [False, False, True, True, True, True]


def test_backbone_two_scales_and_errors():
    net = build_backbone("efficientnet_lite0", "imagenet").eval()
    with torch.no_grad():
        feats = multiscale(net, torch.rand(1, 3, 128, 128), 2)
    assert [tuple(f.shape) for f in feats] == [(1, 320, 4, 4), (1, 320, 2, 2)]
    with pytest.raises(UserError, match="unknown backbone.name 'vgg'.*efficientnet_lite0, resnet18"):
        build_backbone("vgg")
    with pytest.raises(UserError, match="pretrained"):
        build_backbone("resnet18", "imagenet21k")


def test_second_scale_resize_nearest_takes_every_second_pixel_and_reaches_the_checkpoint(tmp_path):
    seen = []
    net = lambda x: seen.append(x) or x.mean(dim=1, keepdim=True)  # noqa: E731  (a stand-in that records its input)
    images = torch.rand(2, 3, 8, 8)
    multiscale(net, images, 2, "nearest")
    assert torch.equal(seen[1], images[:, :, ::2, ::2])  # F.interpolate's nearest: pixel floor(i * 2)
    multiscale(net, images, 2)  # bilinear with antialiasing: a low-pass filter, smoother than the pixels kept
    assert seen[3].shape == seen[1].shape and float(seen[3].std()) < 0.8 * float(seen[1].std())
    with pytest.raises(UserError, match="backbone.resize must be one of bilinear, nearest; got 'bicubic'"):
        BackboneConfig(name="efficientnet_lite0", resize="bicubic")
    rng = np.random.default_rng(0)
    normals = rng.integers(0, 255, (8, 64, 64, 3), dtype=np.uint8)
    bb = BackboneConfig(name="efficientnet_lite0", pretrained="none", image_size=64, n_scales=2, resize="nearest")
    cfg = BaseConfig(model="devnet", epochs=1, steps_per_epoch=1, batch_size=4)
    ckpt = train_base(normals, normals[:2], bb, cfg, seed=0, device=torch.device("cpu"))
    save_checkpoint(tmp_path / "m.pt", ckpt)
    assert load_checkpoint(tmp_path / "m.pt").model.resize == "nearest"


def test_sampled_deviation_reference_keeps_the_batches_and_changes_only_the_loss():
    normals = np.random.default_rng(0).integers(0, 255, (10, 32, 32, 3), dtype=np.uint8)
    standard = BatchSampler(
        normals, normals[:3], BaseConfig(model="dra", batch_size=12, n_ref=2), np.random.default_rng(1)
    )
    sampled_cfg = BaseConfig(model="dra", batch_size=12, n_ref=2, deviation_reference="sampled")
    sampled = BatchSampler(normals, normals[:3], sampled_cfg, np.random.default_rng(1))
    assert standard.gaussian_draws(4, "cpu") is None
    for _ in range(3):
        a, b = standard(), sampled()
        assert all(np.array_equal(x, y) for x, y in zip(a, b))  # the same batches: a paired comparison
        draws = sampled.gaussian_draws(4, "cpu")
        assert draws.shape == (4, 5000) and abs(float(draws.mean())) < 0.05 and abs(float(draws.std()) - 1) < 0.05
    with pytest.raises(UserError, match="base.deviation_reference must be one of standard, sampled"):
        BaseConfig(deviation_reference="drawn")


def test_reference_pseudo_turns_some_reference_normals_into_pseudo_anomalies_only():
    """base.reference_pseudo: the official reference loader's CutMix pseudo anomalies among the reference images;
    the batch itself and the draws of the other images are those of the default."""
    normals = np.random.default_rng(0).integers(0, 255, (10, 32, 32, 3), dtype=np.uint8)
    clean_cfg = BaseConfig(model="dra", batch_size=12, n_ref=4, rotation=0)
    mixed_cfg = BaseConfig(model="dra", batch_size=12, n_ref=4, rotation=0, reference_pseudo=0.5)
    clean = BatchSampler(normals, normals[:3], clean_cfg, np.random.default_rng(1))
    mixed = BatchSampler(normals, normals[:3], mixed_cfg, np.random.default_rng(1))
    changed = 0
    for _ in range(10):
        (a, la, ra), (b, lb, rb) = clean(), mixed()
        assert np.array_equal(a, b) and np.array_equal(la, lb)
        changed += sum(not np.array_equal(x, y) for x, y in zip(ra, rb))
    assert 10 <= changed <= 30  # about half of the 40 reference images
    with pytest.raises(UserError, match="base.reference_pseudo = 1.5 is a probability"):
        BaseConfig(reference_pseudo=1.5)


def test_resnet18_without_cached_weights_says_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    try:
        build_backbone("resnet18", "imagenet")
    except UserError as exc:  # offline (this machine, CI): the message says which file goes where
        assert "resnet18-f37072fd.pth" in str(exc) and str(tmp_path / "hub" / "checkpoints") in str(exc)
    else:  # with internet torchvision downloaded it into the cache
        assert (tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth").is_file()


def test_batches_are_balanced_and_seeded():
    normals = np.random.default_rng(0).integers(0, 255, (10, 32, 32, 3), dtype=np.uint8)
    anomalies = normals[:3]
    cfg = BaseConfig(model="dra", batch_size=12, n_ref=2, rotation=0)
    images, labels, ref = BatchSampler(normals, anomalies, cfg, np.random.default_rng(1))()
    assert images.shape == (12, 32, 32, 3) and ref.shape == (2, 32, 32, 3)
    assert (labels == 1).sum() == 4 and set(labels[:8]) <= {0, 2}
    again = BatchSampler(normals, anomalies, cfg, np.random.default_rng(1))()
    assert np.array_equal(images, again[0]) and np.array_equal(labels, again[1])
    _, dev_labels, dev_ref = BatchSampler(
        normals, anomalies, BaseConfig(model="devnet", batch_size=12), np.random.default_rng(1)
    )()
    assert (dev_labels == 1).sum() == 6 and (dev_labels == 0).sum() == 6 and dev_ref is None


@pytest.mark.parametrize("model", ["dra", "devnet"])
def test_train_base_is_deterministic_and_checkpoint_roundtrips(tmp_path, model):
    rng = np.random.default_rng(0)
    normals = rng.integers(0, 255, (8, 64, 64, 3), dtype=np.uint8)
    anomalies = rng.integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    bb = BackboneConfig(name="efficientnet_lite0", pretrained="none", image_size=64, n_scales=2)
    cfg = BaseConfig(model=model, epochs=1, steps_per_epoch=2, batch_size=6, n_ref=2, margin=3.0)
    a = train_base(normals, anomalies, bb, cfg, seed=5, device=torch.device("cpu"))
    b = train_base(normals, anomalies, bb, cfg, seed=5, device=torch.device("cpu"))
    assert a.meta["history"][0]["loss"] == b.meta["history"][0]["loss"]
    for (k, v), w in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(v, w), k
    save_checkpoint(tmp_path / "m.pt", a)
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert loaded.model.heads.margin == a.model.heads.margin == 3.0  # AHL trains with base.margin
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x, loaded.normal_mean), a.model.eval()(x, a.normal_mean))
    with pytest.raises(UserError, match="missing checkpoint"):
        load_checkpoint(tmp_path / "absent.pt")
    heads, meta = load_base_heads(tmp_path / "m.pt")  # what train_ahl starts from: no backbone built
    assert meta == loaded.meta and heads.margin == 3.0 and not heads.training
    assert heads.state_dict().keys() == loaded.model.heads.state_dict().keys()
    for k, v in loaded.model.heads.state_dict().items():
        assert torch.equal(heads.state_dict()[k], v), k


def test_heads_checkpoint_roundtrip_keeps_the_official_geometry(tmp_path):
    from ahl.models.base import load_heads, save_heads

    heads = DRAHeads(8, topk=0.1, margin=5.0, official_geometry=True)
    meta = {"model": "dra", "in_channels": 8, "topk": 0.1, "margin": 5.0, "members": 0, "official_geometry": True}
    save_heads(tmp_path / "h.pt", heads, meta)
    loaded, _ = load_heads(tmp_path / "h.pt")
    assert loaded.composite_head.conv[0].stride == (3, 3) and loaded.composite_head.conv[0].padding == (0, 0)
    feats = [torch.randn(2, 8, 9, 9)]
    normal_mean = [torch.randn(8, 9, 9)]
    with torch.no_grad():
        assert torch.allclose(loaded(feats, normal_mean), heads.eval()(feats, normal_mean))


class _Payload:
    """Pickles as a call of os.system: what a crafted checkpoint from a shared cache could carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("loader", ["checkpoint", "heads"])
def test_a_crafted_checkpoint_is_refused_without_running_its_code(tmp_path, loader):
    from ahl.models.base import load_heads

    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        torch.save({"format": 1, "state_dict": {}, "meta": _Payload(marker)}, f)
    load = load_checkpoint if loader == "checkpoint" else load_heads
    with pytest.raises(UserError, match="could run code.*dvc repro -f"):
        load(tmp_path / "evil.pt")
    assert not marker.exists()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load(tmp_path / "junk.pt")


def test_a_batch_larger_than_the_training_images_is_refused():
    """base.batch_size above normals + seen anomalies only repeats images: one line before any model is built."""
    normals = np.zeros((8, 64, 64, 3), np.uint8)
    bb = BackboneConfig(name="efficientnet_lite0", pretrained="none", image_size=64, n_scales=2)
    train_base(normals, normals[:2], bb, BaseConfig(model="devnet", epochs=1, steps_per_epoch=1, batch_size=10),
               seed=0, device=torch.device("cpu"))  # fmt: skip  # exactly the images: accepted
    with pytest.raises(UserError) as err:
        train_base(normals, normals[:2], bb, BaseConfig(model="devnet", batch_size=11), seed=0, device="cpu")
    assert str(err.value) == (
        "params.yaml: base.batch_size = 11 is more than the 10 training images (8 normals, 2 seen anomalies); "
        "set it to at most 10 (the papers: 48)"
    )


@pytest.mark.parametrize("size, factor", [(64, 2), (64, 4), (192, 2), (192, 4)])
def test_downscale_is_torchs_antialiased_bilinear_resize_and_nearest(size, factor):
    """The one resize of training, scoring and export (ahl/models/backbones.py: downscale): torch's
    interpolate(antialias=True) to float rounding, and interpolate's nearest exactly."""
    import torch.nn.functional as F

    from ahl.models.backbones import downscale

    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(size + factor))
    small = size // factor
    want = F.interpolate(x, size=(small, small), mode="bilinear", antialias=True, align_corners=False)
    assert (downscale(x, factor) - want).abs().max() < 1e-6
    assert torch.equal(downscale(x, factor, "nearest"), F.interpolate(x, size=(small, small), mode="nearest"))
