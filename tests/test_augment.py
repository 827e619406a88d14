"""Pseudo-anomaly generators: shapes, changed area, provenance of pasted pixels, determinism, texture pool."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from ahl.core.errors import UserError
from ahl.method import cache as features
from ahl.pseudo import augment, draem

SIZE = 128


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    # smooth gradients + noise: every pixel differs from its neighbours, so any moved patch changes pixels
    rng = np.random.default_rng(123)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    base = np.stack([yy * 2, xx * 2, (yy + xx)], axis=2).astype(np.int16)  # (H, W, 3)
    return np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def source() -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, (90, 70), dtype=np.uint8)  # grey, another size


def changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a != b).any(axis=2)  # (H, W) bool


def run(family: str, image: np.ndarray, source: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if family == "cutpaste":
        return augment.cutpaste(image, rng)
    if family == "cutmix":
        return augment.cutmix(image, source_rgb(source), rng)
    return draem.draem(image, source, rng)


def source_rgb(source: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(source).convert("RGB").resize((SIZE, SIZE)))


@pytest.mark.parametrize("family", features.FAMILIES)
@pytest.mark.parametrize("seed", range(5))
def test_family_changes_part_of_the_image(family, seed, image, source):
    before = image.copy()
    out = run(family, image, source, seed)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.array_equal(image, before), "the input must not be modified"
    frac = changed(out, image).mean()
    assert 0 < frac < 1
    if family != "draem":
        assert 0.01 <= frac <= 0.20, f"{family} changed {frac:.1%} of the pixels"


@pytest.mark.parametrize("family", features.FAMILIES)
def test_determinism(family, image, source):
    a = run(family, image, source, 0)
    b = run(family, image, source, 0)
    c = run(family, image, source, 1)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("family", features.FAMILIES)
def test_global_rngs_neither_used_nor_touched(family, image, source):
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    a = run(family, image, source, 3)
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    # reseeding the global generators changes nothing either
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    assert np.array_equal(run(family, image, source, 3), a)


def test_cutmix_pastes_colour_jittered_pixels_of_other(image):
    colour = np.array([1, 254, 3], dtype=np.uint8)
    other = np.broadcast_to(colour, image.shape).copy()
    for seed in range(10):
        out = augment.cutmix(image, other, np.random.default_rng(seed))
        diff = changed(out, image)
        # a uniform patch stays uniform under colour jitter (hue included): one colour
        pasted_colour = out[diff][0]
        assert (out[diff] == pasted_colour).all()
        rows, cols = np.nonzero(diff)  # one axis-aligned rectangle of that colour
        box = out[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert (box == pasted_colour).all()
        assert 0.02 * 0.9 <= box.shape[0] * box.shape[1] / diff.size <= 0.15 * 1.1


def test_cutmix_resizes_other_of_another_size(image):
    other = np.full((40, 60, 3), 200, dtype=np.uint8)
    out = augment.cutmix(image, other, np.random.default_rng(0))
    assert out.shape == image.shape


def test_cutpaste_patch_comes_from_the_same_image():
    # a constant image stays nearly constant: the pasted patch is the image's own colour, only jittered
    flat = np.full((SIZE, SIZE, 3), 120, dtype=np.uint8)
    out = augment.cutpaste(flat, np.random.default_rng(0))
    assert np.abs(out.astype(int) - 120).max() <= 0.1 * 255 + 1


@pytest.mark.parametrize("shape", [(SIZE, SIZE), (96, 160), (448, 448)])
def test_perlin_mask_is_neither_empty_nor_full(shape):
    for seed in range(10):
        mask = draem.perlin_mask(shape, np.random.default_rng(seed))
        assert mask.shape == shape and mask.dtype == bool
        assert 0 < mask.mean() < 1


def test_perlin_mask_deterministic():
    a = draem.perlin_mask((64, 64), np.random.default_rng(5))
    assert np.array_equal(a, draem.perlin_mask((64, 64), np.random.default_rng(5)))
    assert not np.array_equal(a, draem.perlin_mask((64, 64), np.random.default_rng(6)))


def test_draem_changes_only_inside_the_mask(image, source):
    for seed in range(10):
        out = draem.draem(image, source, np.random.default_rng(seed))
        mask = draem.perlin_mask(image.shape[:2], np.random.default_rng(seed))  # draem draws the mask first
        diff = changed(out, image)
        assert diff.any()
        assert not (diff & ~mask).any(), "pixels outside the Perlin mask changed"


def test_augment_source_ops_keep_shape_and_dtype():
    src = np.random.default_rng(0).integers(0, 256, (50, 60, 3), dtype=np.uint8)
    rng = np.random.default_rng(0)
    for name, op in draem.SOURCE_OPS.items():
        out = op(augment._to_tensor(src), rng)
        assert out.shape == (3, 50, 60) and out.dtype == torch.uint8, name


def test_anomaly_sources_default_are_rgb_photographs():
    sources = draem.anomaly_sources(None)
    assert len(sources) >= 5
    for s in sources:
        assert s.dtype == np.uint8 and s.ndim == 3 and s.shape[2] == 3


def test_anomaly_sources_from_folder(tmp_path):
    (tmp_path / "b").mkdir()
    Image.fromarray(np.zeros((20, 30), dtype=np.uint8)).save(tmp_path / "b" / "grey.png")
    Image.fromarray(np.full((10, 10, 3), 9, dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("not an image")
    sources = draem.anomaly_sources(tmp_path)
    assert len(sources) == 2
    assert sources[0].shape == (10, 10, 3)  # sorted: a.png before b/grey.png
    assert sources[1].shape == (20, 30, 3)  # grey loaded as RGB


def test_anomaly_sources_missing_or_empty_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        draem.anomaly_sources(tmp_path / "nope")
    with pytest.raises(UserError, match="holds no images"):
        draem.anomaly_sources(tmp_path)


def test_maker(image, source):
    normals = [image, np.full_like(image, 7), np.full_like(image, 250)]
    maker = features.PseudoAnomalyMaker(normals, [source])
    for family in features.FAMILIES:
        out = maker.make(family, 0, np.random.default_rng(0))
        assert out.shape == image.shape and changed(out, image).any()
        assert np.array_equal(out, maker.make(family, 0, np.random.default_rng(0)))
    # cutmix never pastes the image into itself
    for seed in range(20):
        out = maker.make("cutmix", 1, np.random.default_rng(seed))
        assert not np.array_equal(out, normals[1])
    with pytest.raises(UserError, match="unknown pseudo-anomaly family"):
        maker.make("mixup", 0, np.random.default_rng(0))
    with pytest.raises(UserError, match="at least 2 normal"):
        features.PseudoAnomalyMaker([image], [source]).make("cutmix", 0, np.random.default_rng(0))
