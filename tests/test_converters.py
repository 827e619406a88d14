"""The converters on tiny fixtures that mimic each dataset's real raw layout, and on the real ELPV package."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.model_selection import train_test_split

from ahl.core.errors import UserError
from ahl.data import converters as conv
from ahl.data.datasets import DATASETS, resolve
from ahl.data.download import obtain
from ahl.data.embedded import EmbeddedConfig, build_embedded
from ahl.data.mvtec import load_image, read_subset

RNG = np.random.default_rng(0)


def _img(path: Path, w: int = 32, h: int = 32, mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (h, w) if mode == "L" else (h, w, 3)
    Image.fromarray(RNG.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


def _mask(path: Path, w: int, h: int, rows: slice, cols: slice, value: int = 255) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((h, w), np.uint8)
    arr[rows, cols] = value
    Image.fromarray(arr).save(path)
    return path


def _layout(subset: Path) -> dict[str, list[str]]:
    """'train/good', 'test/<class>', 'ground_truth/<class>' -> sorted file names."""
    return {
        f"{split.name}/{cls.name}": sorted(p.name for p in cls.iterdir())
        for split in sorted(subset.iterdir())
        for cls in sorted(split.iterdir())
    }


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _check_split(lay: dict[str, list[str]], n_normals: int) -> None:
    n_test = math.ceil(n_normals * 0.25)
    assert len(lay["test/good"]) == n_test
    assert len(lay["train/good"]) == n_normals - n_test
    assert not set(lay["train/good"]) & set(lay["test/good"])


def _masks_match(lay: dict[str, list[str]], cls: str) -> None:
    assert lay[f"ground_truth/{cls}"] == sorted(n.replace(".png", "_mask.png") for n in lay[f"test/{cls}"])


# ------------------------------------------------------------------------------------------------ raw fixtures
def make_mvtec(raw: Path) -> Path:
    top = raw / "mvtec_anomaly_detection"
    (top / "license.txt").parent.mkdir(parents=True)
    (top / "license.txt").write_text("CC BY-NC-SA 4.0")
    for cat, defect in (("bottle", "broken_large"), ("carpet", "hole")):
        for i in range(4):
            _img(top / cat / "train" / "good" / f"{i:03d}.png", mode="RGB")
        for i in range(2):
            _img(top / cat / "test" / "good" / f"{i:03d}.png", mode="RGB")
            _img(top / cat / "test" / defect / f"{i:03d}.png", mode="RGB")
            _mask(top / cat / "ground_truth" / defect / f"{i:03d}_mask.png", 32, 32, slice(4, 9), slice(4, 9))
    return raw


AITEX_TILE = 32  # the real strips are 4096x256 (tile 256); these are 512x32 with the same 16-tile geometry


def make_aitex(raw: Path) -> Path:
    w, h = 16 * AITEX_TILE, AITEX_TILE
    for fabric, name in (("2311694-2040n7u", "0001_000_05"), ("2311694-2040n7u", "0002_000_05"),
                         ("2306894-210033u", "0003_000_04")):
        _img(raw / "NODefect_images" / fabric / f"{name}.png", w, h)
    defects = raw / "Defect_images" / "Defect_images"
    masks = raw / "Mask_images" / "Mask_images"
    _img(defects / "0001_002_00.png", w, h)  # Broken_end across tiles 3 and 4 (x 100..140)
    _mask(masks / "0001_002_00_mask.png", w, h, slice(10, 20), slice(100, 140))
    _img(defects / "0044_019_04.png", w, h)  # Fuzzyball in tile 0
    _mask(masks / "0044_019_04_mask.png", w, h, slice(0, 5), slice(0, 5))
    return raw


def make_sdd(raw: Path) -> Path:
    w, h = 20, 61  # cut at 61//3 = 20 and 122//3 = 40: pieces of height 20, 20, 21
    top = raw / "KolektorSDD"
    for kos, part, rows in (("kos01", "Part0", None), ("kos01", "Part1", None), ("kos02", "Part0", slice(25, 30)),
                            ("kos02", "Part3", None), ("kos10", "Part7", slice(38, 43))):
        _img(top / kos / f"{part}.jpg", w, h)
        _mask(top / kos / f"{part}_label.bmp", w, h, rows or slice(0, 0), slice(5, 10))
    (top / "kos01" / "Thumbs.db").write_bytes(b"junk")
    return raw


def make_elpv(raw: Path) -> Path:
    rows = [(0.0, "mono")] * 7 + [(0.0, "poly")] * 6 + [(1.0, "mono")] * 3 + [(1.0, "poly")] * 2
    rows += [(0.3333333333333333, "poly"), (0.6666666666666666, "mono")]
    lines = []
    for i, (p, t) in enumerate(rows, 1):
        _img(raw / "elpv-dataset" / "images" / f"cell{i:04d}.png")
        lines.append(f"images/cell{i:04d}.png  {p:<19} {t}")
    (raw / "elpv-dataset" / "labels.csv").write_text("\n".join(lines) + "\n")
    return raw


def make_optical(raw: Path) -> Path:
    for k in range(1, 11):
        for split in ("Train", "Test"):
            d = raw / f"Class{k}" / f"Class{k}" / split
            rows = ["1"]
            for i, defective in ((1, False), (2, False), (3, True)):
                _img(d / f"{i:04d}.PNG")
                if defective:
                    _mask(d / "Label" / f"{i:04d}_label.PNG", 32, 32, slice(3, 8), slice(3, 8))
                    rows.append(f"{i}\t1\t{i:04d}.PNG\t0\t{i:04d}_label.PNG")
                else:
                    rows.append(f"{i}\t0\t{i:04d}.PNG\t0\t0")
            (d / "Label").mkdir(exist_ok=True)
            (d / "Label" / "Labels.txt").write_text("\n".join(rows) + "\n")
    return raw


def make_mastcam(raw: Path) -> Path:
    for i in range(5):
        _img(raw / "train_typical" / f"sol{i:05d}.png", mode="RGB")
    for i in range(2):
        _img(raw / "test_typical" / f"sol{10 + i:05d}.png", mode="RGB")
        _img(raw / "test_novel" / "bedrock" / f"sol{20 + i:05d}.png", mode="RGB")
        _img(raw / "test_novel" / "veins" / f"sol{30 + i:05d}.jpg", mode="RGB")
    return raw


BRAIN_NORMALS = ["1 no.jpeg", "N2.JPG", "No3.jpg", "no 4.jpg", "N5.jpg", "No6.jpg", "7 no.jpg", "N8.jpg"]


def make_brainmri(raw: Path) -> Path:
    top = raw / "brain_tumor_dataset"
    for name in BRAIN_NORMALS:
        _img(top / "no" / name)
    for name in ("Y1.jpg", "Y2.JPG", "Y3.png"):
        _img(top / "yes" / name)
    return raw


def make_headct(raw: Path) -> Path:
    labels = [0] * 8 + [1] * 4
    RNG.shuffle(labels)
    lines = ["id, hemorrhage"]
    for i, y in enumerate(labels):
        _img(raw / "head_ct" / "head_ct" / f"{i:03d}.png")
        lines.append(f"{i},{y}")
    (raw / "labels.csv").write_text("\n".join(lines) + "\n")
    return raw


def make_hyperkvasir(raw: Path) -> Path:
    top = raw / "hyper-kvasir" / "labeled-images"
    uid = iter(f"{i:08x}-0000-4000-8000-{i:012x}" for i in range(100))
    for landmark, n in (("pylorus", 3), ("retroflex-stomach", 2), ("z-line", 4)):
        for _ in range(n):
            _img(top / "upper-gi-tract" / "anatomical-landmarks" / landmark / f"{next(uid)}.jpg", mode="RGB")
    for finding, n in (("barretts", 1), ("esophagitis-a", 2), ("esophagitis-b-d", 2)):
        for _ in range(n):
            _img(top / "upper-gi-tract" / "pathological-findings" / finding / f"{next(uid)}.jpg", mode="RGB")
    _img(top / "lower-gi-tract" / "pathological-findings" / "polyps" / f"{next(uid)}.jpg", mode="RGB")
    return raw


def make_embedded(raw: Path) -> Path:
    build_embedded(raw, EmbeddedConfig(image_size=64, n_train=4, n_test_good=2, n_per_defect=1, seed=0), ["brick"])
    return raw


# Every registered dataset -> (its raw fixture, a subset the fixture holds); test_every_dataset_has_a_fixture
# keeps this in step with the registry.
FIXTURES = {
    "embedded": (make_embedded, "brick"),
    "mvtec": (make_mvtec, "bottle"),
    "aitex": (make_aitex, "AITEX"),
    "sdd": (make_sdd, "SDD"),
    "elpv": (make_elpv, "elpv"),
    "optical": (make_optical, "optical"),
    "mastcam": (make_mastcam, "mastcam"),
    "brainmri": (make_brainmri, "brainmri"),
    "headct": (make_headct, "headct"),
    "hyperkvasir": (make_hyperkvasir, "hyperkvasir"),
}


def _converter(name: str):
    return DATASETS[name].converter


# ---------------------------------------------------------------------------------------------- per dataset
def test_every_dataset_has_a_fixture():
    assert set(FIXTURES) == set(DATASETS)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_registered_converter_converts_its_fixture(name, tmp_path):
    """The converter an entry names reads that dataset's raw layout: a wrong or swapped converter fails here."""
    make, subset = FIXTURES[name]
    DATASETS[name].convert(make(tmp_path / "raw"), tmp_path / "out", seed=42)
    converted = read_subset(tmp_path / "out", subset)  # the MVTec layout, checked
    assert converted.train_good and converted.test_good and converted.anomalies
    assert resolve(subset).dataset == name


def test_mvtec_links_every_category(tmp_path):
    raw = make_mvtec(tmp_path / "raw")
    conv.convert_mvtec(raw, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bottle", "carpet"]
    src = raw / "mvtec_anomaly_detection" / "carpet"
    assert _tree(tmp_path / "out" / "carpet") == _tree(src)
    lay = _layout(tmp_path / "out" / "bottle")
    assert len(lay["train/good"]) == 4 and len(lay["test/good"]) == 2
    _masks_match(lay, "broken_large")
    # hard links where the filesystem allows them: the same inode, no copy
    linked = tmp_path / "out" / "carpet" / "train/good/000.png"
    assert linked.stat().st_ino == (src / "train/good/000.png").stat().st_ino


def test_mvtec_finds_categories_at_any_depth(tmp_path):
    raw = tmp_path / "raw"
    make_mvtec(raw / "deeper" / "still")
    conv.convert_mvtec(raw, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bottle", "carpet"]


def test_mvtec_duplicate_category_is_an_error(tmp_path):
    make_mvtec(tmp_path / "raw" / "a")
    make_mvtec(tmp_path / "raw" / "b")
    with pytest.raises(UserError, match="twice"):
        conv.convert_mvtec(tmp_path / "raw", tmp_path / "out")


def test_aitex_tile_geometry():
    tiles = conv._aitex_tiles(4096, 256)
    assert len(tiles) == 16 and tiles[0] == (0, 0, 256, 256) and tiles[-1] == (3840, 0, 4096, 256)


def test_aitex_tiles_defects_and_normals(tmp_path):
    raw = make_aitex(tmp_path / "raw")
    conv.convert_aitex(raw, tmp_path / "out")
    subset = tmp_path / "out" / "AITEX"
    lay = _layout(subset)
    _check_split(lay, 3 * 16)  # 3 defect-free strips x 16 tiles
    assert "2306894-210033u_0003_000_04_15.png" in lay["train/good"] + lay["test/good"]
    # only the tiles whose mask is non-zero; the 29 clean tiles of the defective strips are discarded
    assert lay["test/Broken_end"] == ["0001_002_00_3.png", "0001_002_00_4.png"]
    assert lay["test/Fuzzyball"] == ["0044_019_04_0.png"]
    assert set(lay) == {"train/good", "test/good", "test/Broken_end", "test/Fuzzyball",
                        "ground_truth/Broken_end", "ground_truth/Fuzzyball"}
    _masks_match(lay, "Broken_end")
    mask = np.asarray(Image.open(subset / "ground_truth/Broken_end/0001_002_00_3_mask.png"))
    assert mask.shape == (AITEX_TILE, AITEX_TILE) and set(np.unique(mask)) == {0, 255}
    assert mask[10:20, 100 - 96 :].all() and not mask[:10].any()  # tile 3 spans x 96..127
    tile = np.asarray(Image.open(subset / "test/Broken_end/0001_002_00_4.png"))
    strip = np.asarray(Image.open(raw / "Defect_images/Defect_images/0001_002_00.png"))
    assert np.array_equal(tile, strip[:, 128:160])  # pixels kept, only PNG-encoded


def test_aitex_missing_mask_and_unknown_code(tmp_path):
    raw = make_aitex(tmp_path / "raw")
    (raw / "Mask_images/Mask_images/0044_019_04_mask.png").unlink()
    with pytest.raises(UserError, match="0044_019_04_mask.png"):
        conv.convert_aitex(raw, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    raw = make_aitex(tmp_path / "raw2")
    _img(raw / "Defect_images/Defect_images/0005_999_00.png", 16 * AITEX_TILE, AITEX_TILE)
    with pytest.raises(UserError, match="0005_999_00"):
        conv.convert_aitex(raw, tmp_path / "out")


def test_sdd_cuts_three_pieces(tmp_path):
    raw = make_sdd(tmp_path / "raw")
    conv.convert_sdd(raw, tmp_path / "out")
    subset = tmp_path / "out" / "SDD"
    lay = _layout(subset)
    # 5 images x 3 pieces; kos02/Part0 defective in piece 1, kos10/Part7 in pieces 1 and 2 (rows 38..42)
    assert lay["test/defect"] == ["kos02_Part0_1.png", "kos10_Part7_1.png", "kos10_Part7_2.png"]
    _check_split(lay, 15 - 3)
    assert "kos02_Part0_0.png" in lay["train/good"] + lay["test/good"]  # clean pieces of defective images
    _masks_match(lay, "defect")
    sizes = {Image.open(subset / "test/defect" / n).size for n in ("kos10_Part7_1.png", "kos10_Part7_2.png")}
    assert sizes == {(20, 20), (20, 21)}
    mask = np.asarray(Image.open(subset / "ground_truth/defect/kos02_Part0_1_mask.png"))
    assert mask[5:10, 5:10].all() and mask.sum() == 25 * 255  # rows 25..29 are rows 5..9 of piece 1


def test_sdd_missing_label(tmp_path):
    raw = make_sdd(tmp_path / "raw")
    (raw / "KolektorSDD/kos01/Part1_label.bmp").unlink()
    with pytest.raises(UserError, match="Part1_label.bmp"):
        conv.convert_sdd(raw, tmp_path / "out")


def test_elpv_probabilities_and_types(tmp_path):
    raw = make_elpv(tmp_path / "raw")
    conv.convert_elpv(raw, tmp_path / "out")
    lay = _layout(tmp_path / "out" / "elpv")
    assert set(lay) == {"train/good", "test/good", "test/mono", "test/poly"}
    _check_split(lay, 13)
    assert lay["test/mono"] == ["cell0014.png", "cell0015.png", "cell0016.png"]
    assert lay["test/poly"] == ["cell0017.png", "cell0018.png"]
    everything = [n for names in lay.values() for n in names]
    assert "cell0019.png" not in everything and "cell0020.png" not in everything  # 1/3 and 2/3: left out
    # the split is train_test_split on the sorted normals, random_state = seed
    normals = [f"cell{i:04d}.png" for i in range(1, 14)]
    train, test = train_test_split(normals, test_size=0.25, random_state=42)
    assert lay["train/good"] == sorted(train) and lay["test/good"] == sorted(test)


def test_optical_classes_and_masks(tmp_path):
    raw = make_optical(tmp_path / "raw")
    conv.convert_optical(raw, tmp_path / "out")
    lay = _layout(tmp_path / "out" / "optical")
    _check_split(lay, 10 * 2 * 2)
    assert sorted(k for k in lay if k.startswith("test/") and k != "test/good") == [f"test/Class{i}" for i in range(10)]
    assert lay["test/Class0"] == ["Class1_Test_0003.png", "Class1_Train_0003.png"]
    assert lay["test/Class9"] == ["Class10_Test_0003.png", "Class10_Train_0003.png"]
    for i in range(10):
        _masks_match(lay, f"Class{i}")
    assert "Class7_Train_0001.png" in lay["train/good"] + lay["test/good"]


def test_optical_missing_class(tmp_path):
    raw = make_optical(tmp_path / "raw")
    (raw / "Class10/Class10/Test/Label/Labels.txt").unlink()
    with pytest.raises(UserError, match="Class10/Test"):
        conv.convert_optical(raw, tmp_path / "out")


def test_mastcam_keeps_its_split(tmp_path):
    raw = make_mastcam(tmp_path / "raw")
    conv.convert_mastcam(raw, tmp_path / "out")
    lay = _layout(tmp_path / "out" / "mastcam")
    assert lay == {
        "train/good": [f"sol{i:05d}.png" for i in range(5)],
        "test/good": ["sol00010.png", "sol00011.png"],
        "test/bedrock": ["sol00020.png", "sol00021.png"],
        "test/veins": ["sol00030.png", "sol00031.png"],  # JPEG re-encoded as PNG
    }
    assert Image.open(tmp_path / "out/mastcam/test/veins/sol00030.png").format == "PNG"


def test_brainmri(tmp_path):
    raw = make_brainmri(tmp_path / "raw")
    conv.convert_brainmri(raw, tmp_path / "out")
    lay = _layout(tmp_path / "out" / "brainmri")
    assert set(lay) == {"train/good", "test/good", "test/tumor"}
    _check_split(lay, len(BRAIN_NORMALS))
    assert lay["test/tumor"] == ["Y1.png", "Y2.png", "Y3.png"]
    train, test = train_test_split(sorted(BRAIN_NORMALS), test_size=0.25, random_state=42)
    assert lay["test/good"] == sorted(Path(n).stem + ".png" for n in test)


def test_unreadable_image_names_the_file(tmp_path):
    raw = make_brainmri(tmp_path / "raw")
    (raw / "brain_tumor_dataset/yes/Y9.jpg").write_bytes(b"not an image")
    with pytest.raises(UserError, match="Y9.jpg"):
        conv.convert_brainmri(raw, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # atomic: nothing half-written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_headct(tmp_path):
    raw = make_headct(tmp_path / "raw")
    conv.convert_headct(raw, tmp_path / "out")
    lay = _layout(tmp_path / "out" / "headct")
    assert set(lay) == {"train/good", "test/good", "test/hemorrhage"}
    _check_split(lay, 8)
    assert len(lay["test/hemorrhage"]) == 4
    labels = dict(line.split(",") for line in (raw / "labels.csv").read_text().split()[2:])
    assert all(labels[str(int(n[:3]))] == "1" for n in lay["test/hemorrhage"])


def test_hyperkvasir(tmp_path):
    raw = make_hyperkvasir(tmp_path / "raw")
    conv.convert_hyperkvasir(raw, tmp_path / "out")
    lay = _layout(tmp_path / "out" / "hyperkvasir")
    assert set(lay) == {"train/good", "test/good", "test/barretts", "test/esophagitis-a", "test/esophagitis-b-d"}
    _check_split(lay, 9)
    assert [len(lay[f"test/{c}"]) for c in ("barretts", "esophagitis-a", "esophagitis-b-d")] == [1, 2, 2]


# ------------------------------------------------------------------------------------------- every converter
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_deterministic_and_overwrites(name, tmp_path):
    make, _ = FIXTURES[name]
    raw = make(tmp_path / "raw")
    _converter(name)(raw, tmp_path / "a", seed=42)
    _converter(name)(raw, tmp_path / "b", seed=42)
    _converter(name)(raw, tmp_path / "b", seed=42)  # a second run replaces the first as a whole
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "raw"]  # no temporary left


@pytest.mark.parametrize("name", ["aitex", "sdd", "elpv", "optical", "brainmri", "headct", "hyperkvasir"])
def test_seed_changes_the_normal_split(name, tmp_path):
    make, subset = FIXTURES[name]
    raw = make(tmp_path / "raw")
    _converter(name)(raw, tmp_path / "a", seed=42)
    _converter(name)(raw, tmp_path / "b", seed=7)
    a, b = _layout(tmp_path / "a" / subset), _layout(tmp_path / "b" / subset)
    assert a["test/good"] != b["test/good"]
    assert {k: v for k, v in a.items() if "good" not in k} == {k: v for k, v in b.items() if "good" not in k}


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_missing_raw_folder_is_a_user_error(name, tmp_path):
    (tmp_path / "raw").mkdir()
    dataset = DATASETS[name]
    with pytest.raises(UserError) as err:
        dataset.convert(tmp_path / "raw", tmp_path / "out", seed=42)
    message = str(err.value)
    assert str(tmp_path / "raw") in message and f"Expected raw layout: {dataset.raw_layout}" in message
    assert dataset.homepage in message
    assert "dvc repro -f download" in message if dataset.build else "data.local" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "name, remove",
    [("aitex", "NODefect_images"), ("elpv", "elpv-dataset/images"), ("mastcam", "test_novel"),
     ("brainmri", "brain_tumor_dataset/yes"), ("headct", "head_ct"),
     ("hyperkvasir", "hyper-kvasir/labeled-images/upper-gi-tract/pathological-findings")],
)
def test_missing_sub_folder_names_it(name, remove, tmp_path):
    import shutil

    make, _ = FIXTURES[name]
    raw = make(tmp_path / "raw")
    shutil.rmtree(raw / remove)
    with pytest.raises(UserError, match=Path(remove).name):
        _converter(name)(raw, tmp_path / "out", seed=42)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- messages point outside DVC outputs
# An instruction to put files somewhere, followed (in the same clause) by a pipeline output folder.
WRITE_INTO_OUTPUT = re.compile(
    r"\b(unpack|put|place|copy|extract|move|save|write|add|replace|delete|remove)\b[^.;:]*\bdata/(raw|mvtec)\b",
    re.IGNORECASE,
)


def _bad_raw_cases(raw: Path) -> list[tuple[str, Path]]:
    """(dataset, raw folder) pairs, each made wrong in one way, under a folder named like the pipeline's."""
    cases = []
    for name in sorted(FIXTURES):
        (raw / f"empty-{name}").mkdir(parents=True)
        cases.append((name, raw / f"empty-{name}"))  # nothing there
    brain = make_brainmri(raw / "unreadable")
    (brain / "brain_tumor_dataset/yes/Y9.jpg").write_bytes(b"not an image")
    sdd = make_sdd(raw / "label-size")
    _mask(sdd / "KolektorSDD/kos01/Part0_label.bmp", 10, 10, slice(0, 0), slice(0, 0))
    elpv = make_elpv(raw / "bad-labels")
    (elpv / "elpv-dataset/labels.csv").write_text("images/cell0001.png nonsense\n")
    headct = make_headct(raw / "missing-image")
    (headct / "head_ct/head_ct/000.png").unlink()
    make_mvtec(raw / "twice" / "a")
    make_mvtec(raw / "twice" / "b")
    return cases + [("brainmri", brain), ("sdd", sdd), ("elpv", elpv), ("headct", headct), ("mvtec", raw / "twice")]


def test_raw_data_errors_point_at_data_local_never_into_the_outputs(tmp_path):
    """Files put into data/raw or data/mvtec are deleted by the next `dvc repro`: no message may send users there."""
    data = tmp_path / "data"
    for name, raw in _bad_raw_cases(data / "raw"):
        if DATASETS[name].build is not None:  # built, not the user's to fix (see test_missing_raw_folder_...)
            continue
        for convert in (DATASETS[name].convert, DATASETS[name].converter):
            with pytest.raises(UserError) as err:
                convert(raw, data / "mvtec", seed=42)
            message = str(err.value).replace(str(tmp_path), "")
            assert "data/raw" in message, message  # the raw file or folder is named ...
            assert not WRITE_INTO_OUTPUT.search(message), message  # ... but not as a place to put files
            assert "data.local" in message and "downloads" in message, message
            assert "\n" not in message


def test_unreadable_converted_image_says_rebuild_not_edit(tmp_path):
    bad = tmp_path / "data" / "mvtec" / "brick" / "train" / "good" / "000.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a png")
    with pytest.raises(UserError) as err:
        load_image(bad, 32)
    message = str(err.value).replace(str(tmp_path), "")
    assert "/data/mvtec/brick/train/good/000.png" in message and not WRITE_INTO_OUTPUT.search(message)
    assert "dvc repro -f convert" in message and "data.local" in message


def test_log_counts_only_images(tmp_path, caplog):
    raw = make_mvtec(tmp_path / "raw")
    good = raw / "mvtec_anomaly_detection" / "bottle" / "train" / "good"
    (good / "Thumbs.db").write_bytes(b"junk")
    (good / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.INFO, logger="ahl.data.converters"):
        conv.convert_mvtec(raw, tmp_path / "out")
    assert "bottle: train/good 4, test/good 2, anomalies 2 in 1 classes (broken_large 2)" in caplog.text
    assert (tmp_path / "out/bottle/train/good/notes.txt").is_file()  # still linked, only not counted


# ------------------------------------------------------------------------------------------- 16-bit images
def _gradient16(path: Path) -> np.ndarray:
    """A 16-bit grey ramp over the full range, written by PIL: 64 x 256, column j = j * 257."""
    ramp = np.tile((np.arange(256, dtype=np.uint16) * 257)[None, :], (64, 1))
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"
    return ramp


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_raw_images_keep_their_gradient(suffix, tmp_path):
    raw = make_brainmri(tmp_path / "raw")
    for name in BRAIN_NORMALS:
        (raw / "brain_tumor_dataset/no" / name).unlink()
        _gradient16((raw / "brain_tumor_dataset/no" / name).with_suffix(suffix))
    conv.convert_brainmri(raw, tmp_path / "out")
    written = sorted((tmp_path / "out/brainmri").glob("t*/good/*.png"))
    assert len(written) == len(BRAIN_NORMALS)
    for path in written:
        with Image.open(path) as img:
            assert img.mode == "L"  # 8 bits, scaled: column j of the ramp is j
            assert np.array_equal(np.asarray(img)[0], np.arange(256))
        assert load_image(path, 256)[0, :, 0].tolist() == list(range(256))


# ---------------------------------------------------------------------------------------------- real ELPV
def test_real_elpv_counts_match_the_papers(tmp_path):
    pytest.importorskip("elpv_dataset")
    raw = tmp_path / "raw"
    obtain(DATASETS["elpv"].source(resolve("elpv").source), raw, downloads=tmp_path / "downloads", progress=False)
    conv.convert_elpv(raw, tmp_path / "out")
    lay = _layout(tmp_path / "out" / "elpv")
    counts = {k: len(v) for k, v in lay.items()}
    assert counts == {"train/good": 1131, "test/good": 377, "test/mono": 313, "test/poly": 402}  # 715 anomalies
