"""Pixel metrics against hand-computed values (AUPRO as MVTec AD defines it), masks of the embedded demo, and the
heatmaps' link to the image score (each patch map is what its head's top-k mean pools)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ahl.data.mvtec import read_subset
from ahl.evaluation.localize import upsample
from ahl.method.forward import score_heads
from ahl.evaluation.overlay import overlay
from ahl.evaluation.pixel_metrics import aupro, load_masks, mask_file, pixel_metrics, pro_curve
from ahl.models.devnet import DevNetHeads
from ahl.models.dra import DRAHeads
from ahl.models.heads import HeadsEnsemble, topk_mean


def one_region(scores):
    """One image of 1 x 12 pixels: a defect region of 2 pixels (the first two), 10 defect-free pixels."""
    mask = np.zeros((1, 1, 12), bool)
    mask[0, 0, :2] = True
    return np.asarray(scores, np.float64).reshape(1, 1, 12), mask


def test_aupro_one_region_by_hand():
    # descending: .9 region (PRO 1/2, FPR 0), .7 normal (FPR .1), .5 region (PRO 1), then 9 normals at .1 together
    maps, masks = one_region([0.9, 0.5, 0.7] + [0.1] * 9)
    fpr, pro = pro_curve(maps, masks)
    assert fpr.tolist() == pytest.approx([0, 0, 0.1, 0.1, 1.0]) and pro.tolist() == pytest.approx([0, 0.5, 0.5, 1, 1])
    # area up to FPR 0.3: 0.1 * 0.5 + 0.2 * 1 = 0.25, normalised by 0.3
    assert aupro(maps, masks) == pytest.approx(0.25 / 0.3)


def test_aupro_cuts_the_segment_that_crosses_the_limit():
    # 4 defect-free pixels (FPR steps of 0.25): .9 region, .8 normal, .7 region, three normals tied at .1
    maps = np.array([[[0.9, 0.7, 0.8, 0.1, 0.1, 0.1]]])
    masks = np.array([[[1, 1, 0, 0, 0, 0]]], bool)
    # PRO 0.5 on [0, 0.25], then 1 on [0.25, 0.3]: 0.125 + 0.05 = 0.175
    assert aupro(maps, masks) == pytest.approx(0.175 / 0.3)


def test_aupro_averages_regions_not_pixels():
    """Regions of 1 and 3 pixels: PRO weighs each region equally, pixel TPR each pixel."""
    masks = np.zeros((1, 2, 7), bool)
    masks[0, 0, 0] = True  # region A, 1 pixel
    masks[0, 0, 4:7] = True  # region B, 3 pixels (not touching A)
    maps = np.full((1, 2, 7), 0.1)
    maps[0, 0, 4:7] = [0.9, 0.8, 0.7]
    maps[0, 0, 0] = 0.3
    maps[0, 1, 0] = 0.6  # one defect-free pixel above region A
    # B found first (PRO 0.5 at FPR 0), one false positive (FPR 0.1), then A (PRO 1): 0.1 * 0.5 + 0.2 * 1
    assert aupro(maps, masks) == pytest.approx(0.25 / 0.3)
    # pixel-wise the first step would be 3/4 of the defect pixels: 0.1 * 0.75 + 0.2 = 0.275 (not what AUPRO is)
    assert aupro(maps, masks) != pytest.approx(0.275 / 0.3)
    # the same two regions in two images, defect-free pixels pooled over both: the same curve
    split_maps, split_masks = maps.reshape(2, 1, 7).copy(), masks.reshape(2, 1, 7).copy()
    assert aupro(split_maps, split_masks) == pytest.approx(0.25 / 0.3)


def test_perfect_and_inverted_maps():
    masks = np.zeros((2, 4, 4), bool)
    masks[0, 1:3, 1:3] = True
    masks[1, 0, 0] = masks[1, 3, 3] = True  # two regions of one pixel
    perfect = masks.astype(float)
    assert aupro(perfect, masks) == 1.0
    assert pixel_metrics(perfect, masks) == {"pixel_auc_roc": 1.0, "pixel_aupro": 1.0}
    assert aupro(1.0 - perfect, masks) == 0.0 and pixel_metrics(1.0 - perfect, masks)["pixel_auc_roc"] == 0.0


def test_diagonal_pixels_are_one_region():
    """8-connectivity (MVTec AD): two diagonal neighbours form one region of 2 pixels."""
    masks = np.zeros((1, 3, 3), bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True
    maps = np.zeros((1, 3, 3))
    maps[0, 0, 0] = 1.0  # half of the one region found at FPR 0; with two regions it would be one full region
    _, pro = pro_curve(maps, masks)
    assert pro[1] == pytest.approx(0.5)


def test_pixel_auc_roc_by_hand_and_degenerate_masks():
    masks = np.array([[[1, 0, 0, 1]]], bool)
    maps = np.array([[[0.9, 0.8, 0.1, 0.5]]])
    # pairs (defect, defect-free): .9 > .8, .9 > .1, .5 < .8, .5 > .1 -> 3 of 4
    assert pixel_metrics(maps, masks)["pixel_auc_roc"] == pytest.approx(0.75)
    assert pixel_metrics(maps, np.zeros_like(masks)) == {}
    with pytest.raises(ValueError, match="non-finite"):
        pixel_metrics(np.full(maps.shape, np.nan), masks)


def test_masks_of_the_embedded_demo(small_dataset, tmp_path):
    subset = read_subset(small_dataset, "brick")
    files = [*subset.test_good[:2], *[f for c in subset.anomaly_classes for f in subset.anomalies[c][:1]]]
    labels = [0, 0] + [1] * len(subset.anomaly_classes)
    assert mask_file(subset.root, "test/crack/003.png") == subset.root / "ground_truth/crack/003_mask.png"
    masks = load_masks(subset.root, files, labels, 32)
    assert masks.shape == (len(files), 32, 32) and masks.dtype == bool
    assert not masks[:2].any() and all(m.any() and not m.all() for m in masks[2:])
    # an anomaly without a mask: no pixel metrics at all (rather than metrics on part of the test set)
    assert load_masks(tmp_path, files, labels, 32) is None


@pytest.mark.parametrize("heads_cls", [DRAHeads, DevNetHeads])
def test_patch_maps_are_what_the_heads_pool(heads_cls):
    torch.manual_seed(0)
    heads = heads_cls(8, topk=0.25, margin=5.0).eval()
    features = [torch.randn(3, 8, 4, 4), torch.randn(3, 8, 2, 2)]
    normal_mean = [torch.randn(8, 4, 4), torch.randn(8, 2, 2)]
    maps = score_heads(heads, features, normal_mean).maps
    with torch.no_grad():
        per_head = heads.score_scale(features[0], normal_mean[0])  # (B, n_heads) at the full-size scale
        spatial = [n for n in heads.head_names if n != "holistic"]
        for m, name in zip(maps, spatial, strict=True):
            assert m.shape == (3, 4, 4)
            pooled = topk_mean(m[:, None], heads.topk)  # |.| of a non-negative map is the map
            assert torch.allclose(pooled, per_head[:, heads.head_names.index(name)])
    heat = upsample(maps, (16, 16))
    assert heat.shape == (3, 16, 16) and (heat >= 0).all()
    ensemble = HeadsEnsemble([heads, heads])  # two equal members: the averaged map is the member's map
    assert torch.allclose(upsample(score_heads(ensemble, features, normal_mean).maps, (16, 16)), heat)


def test_overlay_is_per_image_and_keeps_the_image_size():
    image = np.full((20, 30, 3), 128, np.uint8)
    heat = np.linspace(0, 1, 600).reshape(20, 30)
    out = overlay(image, heat, caption="ahl 1.23")
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    assert np.array_equal(overlay(image, heat * 7 + 3), overlay(image, heat))  # its own colour scale
    flat = overlay(image, np.zeros((20, 30)))  # a constant map: all one colour, no division by zero
    assert (flat == flat[0, 0]).all()
