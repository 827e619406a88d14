"""The embedded demo dataset: MVTec layout, masks, determinism from the seed, validation and atomic writing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.morphology import dilation, disk

from ahl.core.errors import UserError
from ahl.data import embedded
from ahl.data.embedded import DEFECTS, SUBSETS, EmbeddedConfig, build_embedded

SMALL = EmbeddedConfig(image_size=64, n_train=6, n_test_good=3, n_per_defect=2, seed=0)


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("embedded") / "data"
    build_embedded(out, SMALL)
    return out


def test_layout_and_counts(small: Path) -> None:
    assert sorted(p.name for p in small.iterdir()) == sorted(SUBSETS)
    assert len(DEFECTS) >= 4
    for subset in SUBSETS:
        root = small / subset
        assert sorted(p.name for p in (root / "train/good").iterdir()) == [f"{i:03d}.png" for i in range(6)]
        assert len(list((root / "test/good").glob("*.png"))) == 3
        assert sorted(p.name for p in (root / "test").iterdir()) == sorted(["good", *DEFECTS])
        assert sorted(p.name for p in (root / "ground_truth").iterdir()) == sorted(DEFECTS)
        for defect in DEFECTS:
            assert len(list((root / "test" / defect).glob("*.png"))) == 2
    # nothing but the dataset, and no temporary directory left next to it
    assert [p.name for p in small.parent.iterdir()] == ["data"]


def test_images_are_rgb_and_distinct(small: Path) -> None:
    images = sorted(small.glob("*/test/*/*.png")) + sorted(small.glob("*/train/good/*.png"))
    for path in images:
        with Image.open(path) as im:
            assert im.mode == "RGB" and im.size == (64, 64)
    digests = [hashlib.sha256(np.asarray(Image.open(p)).tobytes()).hexdigest() for p in images]
    assert len(set(digests)) == len(digests)


def test_masks_match_defect_images(small: Path) -> None:
    for subset in SUBSETS:
        root = small / subset
        masks = sorted((root / "ground_truth").rglob("*.png"))
        defect_images = sorted(p for p in (root / "test").rglob("*.png") if p.parent.name != "good")
        assert len(masks) == len(defect_images)
        for image_path in defect_images:
            mask_path = root / "ground_truth" / image_path.parent.name / f"{image_path.stem}_mask.png"
            with Image.open(mask_path) as m:
                assert m.mode == "L" and m.size == (64, 64)
                mask = np.asarray(m)
            assert set(np.unique(mask)) <= {0, 255}
            assert 0 < (mask > 0).mean() < 0.2, mask_path
        assert not (root / "ground_truth" / "good").exists()  # masks only for defects


@pytest.mark.parametrize("defect", DEFECTS)
def test_defect_is_visible_inside_its_mask_and_nowhere_else(defect: str) -> None:
    photos = embedded._load_photos(SUBSETS)
    for subset in SUBSETS:
        src = embedded._sources(subset, photos)
        for i in range(3):
            rng = embedded._rng(0, i)
            normal = embedded._normal(rng, src, 64)
            image, mask = embedded.DEFECT_DRAWERS[defect](rng, normal.copy(), src)
            change = np.abs(image - normal).max(axis=2)  # (H, W)
            assert mask.dtype == bool and mask.shape == (64, 64) and mask.any()
            assert change[mask].mean() > 0.04, (subset, i)  # about 10 grey levels on average, or more
            far = ~dilation(mask, disk(3))  # soft edges may spill a pixel or two past the mask
            assert change[far].max() < 0.01, (subset, i)


def test_same_seed_is_byte_identical_and_other_seed_differs(small: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    build_embedded(again, SMALL)
    assert _hashes(again) == _hashes(small)
    other = tmp_path / "other"
    build_embedded(other, EmbeddedConfig(image_size=64, n_train=6, n_test_good=3, n_per_defect=2, seed=1))
    a, b = _hashes(small), _hashes(other)
    assert a.keys() == b.keys()
    assert sum(a[k] != b[k] for k in a) == len(a)


def test_subset_selection_and_rebuild_replace_output(small: Path, tmp_path: Path) -> None:
    out = tmp_path / "data"
    (out / "stale").mkdir(parents=True)
    build_embedded(out, SMALL, subsets=["gravel"])
    assert [p.name for p in out.iterdir()] == ["gravel"]
    # a subset's images do not depend on which other subsets are built
    assert _hashes(out / "gravel") == _hashes(small / "gravel")


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"n_train": 0}, "n_train"),
        ({"n_test_good": -1}, "n_test_good"),
        ({"n_per_defect": 0}, "n_per_defect"),
        ({"image_size": 32}, "image_size"),
        ({"seed": -3}, "seed"),
        ({"n_train": 2.5}, "n_train"),
    ],
)
def test_bad_config_is_a_user_error(kwargs: dict, named: str) -> None:
    with pytest.raises(UserError, match=named):
        EmbeddedConfig(**kwargs)


def test_unknown_subset_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="carpet"):
        build_embedded(tmp_path / "data", SMALL, subsets=["brick", "carpet"])
    assert not (tmp_path / "data").exists()


def test_failure_midway_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setitem(embedded.DEFECT_DRAWERS, "crack", broken)
    with pytest.raises(RuntimeError, match="boom"):
        build_embedded(tmp_path / "data", SMALL)
    assert list(tmp_path.iterdir()) == []
