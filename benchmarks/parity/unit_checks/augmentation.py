"""Pseudo anomalies and augmentation against the official DRA and AHL datasets/: patch geometry, jitter, rotation."""

from __future__ import annotations

import ast
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from benchmarks.parity import ours
from benchmarks.parity.shims import Patches, import_official
from benchmarks.parity.unit_checks.helpers import Row


class Probe:
    """Stands in for a PIL image in the official CutPaste/CutMix classes and records the boxes they use."""

    def __init__(self, image):
        self.image, self.crops, self.pastes = image, [], []

    @property
    def size(self):
        return self.image.size

    def crop(self, box):
        self.crops.append(box)
        return self.image.crop(box)

    def copy(self):
        return self

    def paste(self, patch, box):
        self.pastes.append(box)


def _box_stats(boxes, h, w):
    """Area (fraction of the image) and aspect ratio w/h of PIL boxes (left, upper, right, lower)."""
    area = np.array([(b[2] - b[0]) * (b[3] - b[1]) / (h * w) for b in boxes])
    aspect = np.array([(b[2] - b[0]) / max(b[3] - b[1], 1) for b in boxes])
    return area, aspect


def _fmt(x):
    """mean [min, max] of an array, for the notes."""
    return f"mean {x.mean():.4f} [{x.min():.4f}, {x.max():.4f}]"


def _our_patch_stats(size: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Area (fraction of the image) and aspect ratio w/h of n patches as our CutPaste/CutMix draw them."""
    rng = np.random.default_rng(0)
    mine = [ours.patch_size(size, size, rng) for _ in range(n)]
    return np.array([h * w / size**2 for h, w in mine]), np.array([w / h for h, w in mine])


def _patch_rows(sources: dict, img, size: int, n: int, ours_stats) -> list[Row]:
    """Each official generator's patch boxes over n calls on one image vs ours (KS distance)."""
    from scipy.stats import ks_2samp

    area_ours, aspect_ours = ours_stats
    rows = []
    for name, call in sources.items():
        probe = Probe(img)
        for _ in range(n):
            call(probe)
        area, aspect = _box_stats(probe.crops, size, size)
        ks_area = ks_2samp(area, area_ours).statistic
        ks_aspect = ks_2samp(np.log(aspect), np.log(aspect_ours)).statistic
        rows.append(Row(f"patch area and aspect: {name}", max(ks_area, ks_aspect), "info",
                        f"{n} draws each at {size} px; area official {_fmt(area)}, ours {_fmt(area_ours)}; "
                        f"aspect w/h official {_fmt(aspect)}, ours {_fmt(aspect_ours)}; diff = KS distance"))  # fmt: skip
    return rows


def _jitter_row(cp_ahl, cm_ahl) -> Row:
    """The colour jitter of the official AHL CutPaste and CutMix vs ours."""
    jitter = cp_ahl.CutPaste().colorJitter
    jit_cm = cm_ahl.CutMix(a_img=None).colorJitter
    return Row("colour jitter of the patch", None, "info",
               f"official CutPaste and CutMix: ColorJitter brightness {jitter.brightness}, contrast "
               f"{jitter.contrast}, saturation {jitter.saturation}, hue {jitter.hue} (AHL CutMix: "
               f"{'same' if jit_cm is not None else 'none'}); ours: cutpaste and cutmix {ours.COLOR_JITTER} on all "
               "four")  # fmt: skip


def _pseudo_rotation_row(mvtec_dra, size: int) -> Row:
    """The rotations in the official DRA training transforms vs ours."""
    fake = SimpleNamespace(args=SimpleNamespace(img_size=size))
    pseudo = mvtec_dra.MVTecAD.transform_pseudo(fake)
    train_tf = mvtec_dra.MVTecAD.transform_train(fake)
    rot = next(t for t in pseudo.transforms if type(t).__name__ == "RandomRotation")
    rot_train = next(t for t in train_tf.transforms if type(t).__name__ == "RandomRotation")
    return Row("rotation of pseudo anomalies (DRA base training)", None, "info",
               f"official DRA transform_pseudo: CutMix then RandomRotation{tuple(rot.degrees)} "
               f"({rot.interpolation.value}) of the whole image; transform_train: "
               f"RandomRotation{tuple(rot_train.degrees)} ({rot_train.interpolation.value}); ours: "
               "rotation uniform in [-base.rotation, base.rotation] of every batch image, "
               "base.rotation_interpolation (default nearest)")  # fmt: skip


def _cached_rotation_row(img) -> Row:
    """Ours' cached CutPaste/CutMix (features.pseudo_rotation = 180, the default): is the whole image rotated?
    Pixels changed outside the 15 % patch say."""
    changed = []
    arr = np.asarray(img)
    maker = ours.PseudoAnomalyMaker([arr, np.asarray(img)[::-1].copy()], [arr], rotation=180.0)
    for k in range(200):
        for family in ("cutpaste", "cutmix"):
            made = maker.make(family, 0, np.random.default_rng(k))
            changed.append(float((made != arr).any(axis=2).mean()))
    rotated = np.mean([c > 0.15 for c in changed])
    return Row("rotation of ours' cached CutPaste/CutMix", None, "info",
               f"features.pseudo_rotation = 180: {rotated:.0%} of 400 pseudo anomalies change more than the 15 % "
               f"patch (the whole image is rotated, as in the official feature scripts)")  # fmt: skip


def generators(dra_root: Path, ahl_root: Path, n: int = 2000) -> list[Row]:
    """The official CutPaste/CutMix generators (DRA and AHL datasets/) and ours: patch geometry, colour jitter,
    rotation."""
    from PIL import Image

    size = 128
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8))
    ours_stats = _our_patch_stats(size, n)
    random.seed(0)
    torch.manual_seed(0)
    with Patches():
        (cm_dra,) = import_official(dra_root, "datasets.cutmix")
        (mvtec_dra,) = import_official(dra_root, "datasets.mvtecad")
        cp_ahl, cm_ahl = import_official(ahl_root, "datasets.cutpaste", "datasets.cutmix")
        sources = {
            "CutPaste (AHL datasets/cutpaste.py)": lambda probe: cp_ahl.CutPaste()(probe),
            "DRA pseudo anomaly (DRA datasets/cutmix.py, same image)": lambda probe: cm_dra.CutMix()(probe),
            "CutMix (AHL datasets/cutmix.py, another image)": lambda probe: cm_ahl.CutMix(a_img=probe)(probe),
        }
        rows = _patch_rows(sources, img, size, n, ours_stats)
        rows.append(_jitter_row(cp_ahl, cm_ahl))
        rows.append(_pseudo_rotation_row(mvtec_dra, size))
    rows.append(_static_rotation(ahl_root))
    rows.append(_cached_rotation_row(img))
    rows.append(_rotation_interpolation(dra_root))
    return rows


def _static_rotation(ahl_root: Path) -> Row:
    """The official AHL feature scripts import cv2 and a class their repository lacks (modeling.net.SemiADNet),
    so they cannot be imported; their transform pipelines are read from the source."""
    found = []
    for script in ("cutpaste_feature_extraction.py", "cutmix_feature_extraction.py", "DREAM_feature_extraction.py"):
        tree = ast.parse((ahl_root / "datasets" / script).read_text())
        calls = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                fn = ast.unparse(node.func)
                if fn.endswith(("RandomRotation", "Affine", "CutPaste", "CutMix")):
                    calls.append(ast.unparse(node))
        found.append(f"{script}: {', '.join(sorted(set(calls)))}")
    return Row("official AHL feature-script pipelines (read from source)", None, "info", "; ".join(found))


def _rotation_interpolation(dra_root: Path) -> Row:
    """The official DRA RandomRotation and ours, both by 30 degrees, on a photo: how much interpolation differs."""
    import skimage.data
    from PIL import Image

    image = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((128, 128)))
    with Patches() as p:
        (mvtec_dra,) = import_official(dra_root, "datasets.mvtecad")
        tf = mvtec_dra.MVTecAD.transform_train(SimpleNamespace(args=SimpleNamespace(img_size=128)))
        rot = next(t for t in tf.transforms if type(t).__name__ == "RandomRotation")
        p.setattr(type(rot), "get_params", staticmethod(lambda degrees: 30.0))
        official = np.asarray(rot(Image.fromarray(image)))

    class Fixed:
        @staticmethod
        def uniform(a, b):
            return 30.0

    mine = ours.rotate(image[None], 180.0, Fixed())[0]
    inside = np.zeros(image.shape[:2], bool)
    inside[32:96, 32:96] = True  # away from the border, where the fill differs only by interpolation
    d = float(np.abs(official.astype(float) - mine.astype(float))[inside].mean())
    return Row("rotation interpolation (30 degrees, 128 px photo)", d, "info",
               f"official RandomRotation {rot.interpolation.value} vs ours (default nearest): mean |diff| {d:.2f} grey levels "
               "in the centre (of 255)")  # fmt: skip
