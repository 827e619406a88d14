"""Your own dataset (data.local holding NAME/): both layouts convert; each mistake is one line naming the folder."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import hostile_names, tree_digest
from hypothesis import HealthCheck, given, settings
from PIL import Image

from ahl.core.errors import UserError
from ahl.data import own
from ahl.data.datasets import select, selected_dataset
from ahl.data.mvtec import read_subset
from ahl.data.protocol import ProtocolConfig

M2 = ProtocolConfig(n_anomalies=2, test_set_m=2)


def make_own(small: Path, local: Path, name: str = "mine", layout: str = "mvtec") -> Path:
    """``local/name`` from the embedded demo's brick subset, in MVTec layout or in the folder layout."""
    target = local / name
    if layout == "mvtec":
        shutil.copytree(small / "brick", target)
        return local
    (target / "good").mkdir(parents=True)
    for split in ("train", "test"):
        for f in sorted((small / "brick" / split / "good").iterdir()):
            shutil.copy(f, target / "good" / f"{split}_{f.name}")
    for defect in sorted((small / "brick" / "test").iterdir()):
        if defect.name != "good":
            shutil.copytree(defect, target / defect.name)
    shutil.copytree(small / "brick" / "ground_truth", target / "ground_truth")
    return local


@pytest.mark.parametrize("layout", ["mvtec", "folder"])
def test_both_layouts_select_and_convert_to_the_mvtec_layout(small_dataset, tmp_path, layout):
    local = make_own(small_dataset, tmp_path / "mydata", layout=layout)
    selected = select("mine", local, M2)
    assert selected == {"dataset": "local", "source": "local", "classname": "mine"}
    selected_dataset(selected).convert(local, tmp_path / "out", seed=42)
    subset = read_subset(tmp_path / "out", "mine")
    assert subset.anomaly_classes == ["crack", "foreign", "hole", "scratch", "stain"]
    assert sum(len(v) for v in subset.anomalies.values()) == 25
    assert len(subset.train_good) + len(subset.test_good) == 18
    if layout == "folder":  # 3:1 by data.split_seed, reproducibly
        assert (len(subset.train_good), len(subset.test_good)) == (13, 5)
        selected_dataset(selected).convert(local, tmp_path / "again", seed=42)
        assert read_subset(tmp_path / "again", "mine").train_good == subset.train_good
    masks = sorted((tmp_path / "out" / "mine" / "ground_truth" / "crack").iterdir())
    assert len(masks) == 5 and masks[0].name.endswith("_mask.png")


def test_mixed_sizes_and_modes_are_converted_with_a_warning(small_dataset, tmp_path, caplog):
    local = make_own(small_dataset, tmp_path / "mydata")
    odd = sorted((local / "mine" / "train" / "good").iterdir())[0]
    with Image.open(odd) as im:
        im.convert("L").resize((80, 48)).save(odd)
    with caplog.at_level(logging.WARNING):
        selected_dataset(select("mine", local, M2)).convert(local, tmp_path / "out", seed=42)
    assert "1 of 43 images are not 64x64" in caplog.text and "mixed modes" in caplog.text
    with Image.open(tmp_path / "out" / "mine" / "train" / "good" / odd.name) as im:
        assert (im.size, im.mode) == ((64, 64), "RGB")


def test_a_mask_of_another_size_than_its_image_is_one_line_naming_both(small_dataset, tmp_path):
    """Was: resized to fit without a word. A mask of its image's size still follows the image to the subset's
    size (nearest neighbour)."""
    local = make_own(small_dataset, tmp_path / "mydata")
    crack = sorted((local / "mine" / "test" / "crack").iterdir())
    mask = local / "mine" / "ground_truth" / "crack" / f"{crack[0].stem}_mask.png"
    with Image.open(mask) as im:
        im.resize((32, 32)).save(mask)
    with pytest.raises(UserError) as err:
        selected_dataset(select("mine", local, M2)).convert(local, tmp_path / "out", seed=42)
    message = str(err.value)
    shown_mask, shown_image = (Path("data.local") / f.relative_to(local) for f in (mask, crack[0]))
    assert f"{shown_mask} is 32x32 but its image {shown_image} is 64x64" in message and "\n" not in message
    assert not (tmp_path / "out" / "mine").exists()
    with Image.open(crack[0]) as im:  # the image at 32x32 too: both are resized to the subset's 64x64
        im.resize((32, 32)).save(crack[0])
    selected_dataset(select("mine", local, M2)).convert(local, tmp_path / "out", seed=42)
    with Image.open(tmp_path / "out" / "mine" / "ground_truth" / "crack" / mask.name) as im:
        assert im.size == (64, 64)


def _error(local: Path, name: str = "mine", protocol: ProtocolConfig = M2) -> str:
    with pytest.raises(UserError) as err:
        select(name, local, protocol)
    message = str(err.value)
    assert "\n" not in message and "data/raw" not in message and "data/mvtec" not in message
    return message


def test_missing_train_good_names_the_folder(small_dataset, tmp_path):
    local = make_own(small_dataset, tmp_path / "mydata")
    shutil.rmtree(local / "mine" / "train" / "good")
    assert f"no images in {local / 'mine' / 'train' / 'good'}; fix it in data.local" in _error(local)


def test_no_anomalies(small_dataset, tmp_path):
    local = make_own(small_dataset, tmp_path / "mydata", layout="folder")
    for defect in ("crack", "foreign", "hole", "scratch", "stain"):
        shutil.rmtree(local / "mine" / defect)
    assert f"your dataset {local / 'mine'} has no anomalies: put each defect class's images in" in _error(local)


def test_fewer_anomalies_than_m(small_dataset, tmp_path):
    local = make_own(small_dataset, tmp_path / "mydata")
    message = _error(local, protocol=ProtocolConfig(n_anomalies=30, test_set_m=10))
    assert "holds 25 anomalies but protocol.n_anomalies=30" in message and "-S protocol.n_anomalies=N" in message


def test_no_normal_folder_and_no_such_name(small_dataset, tmp_path):
    local = make_own(small_dataset, tmp_path / "mydata", layout="folder")
    (local / "mine" / "good").rename(local / "mine" / "ok")
    assert "has no train/good/, good/ or normal/ folder: say which images are normal" in _error(local)
    assert f"data.local = {local} holds no folder other/" in _error(local, "other")
    assert "unknown classname 'other'" in _error(None, "other") and "data.local" in _error(None, "other")


def test_a_registered_name_wins_unless_data_local_holds_it(small_dataset, tmp_path, caplog):
    assert select("brick", None, M2) == {"dataset": "embedded", "source": "embedded"}
    assert select("brick", tmp_path, M2) == {"dataset": "embedded", "source": "embedded"}  # no brick/ there
    local = make_own(small_dataset, tmp_path / "mydata", name="brick")
    with caplog.at_level(logging.WARNING):
        assert select("brick", local, M2)["dataset"] == own.OWN
    assert "'brick' is also a registered subset; using your folder" in caplog.text


@pytest.mark.pipeline
def test_your_own_folder_runs_through_the_whole_pipeline(small_dataset, tmp_path_factory):
    """`dvc exp run -S classname=mine -S data.local=...` on a new folder, no code change: every stage runs, and the
    metrics, the split and the thresholds are those of `mine`. The folder layout (the one that needs a split of its
    normals); the MVTec layout differs only in what convert does, tested above."""
    import json

    from conftest import Repo, tiny_params

    local = make_own(small_dataset, tmp_path_factory.mktemp("mydata"), layout="folder")
    repo = Repo(tmp_path_factory.mktemp("own"), tiny_params())
    res = repo.dvc("exp", "run", "-S", "classname=mine", "-S", f"data.local={local}")
    assert {"selection", "download", "convert", "split", "train_base", "calibrate", "evaluate"} <= repo.ran(res.stdout)
    assert json.loads((repo.path / "data/selection.json").read_text())["dataset"] == own.OWN
    metrics = json.loads((repo.path / "results/metrics.json").read_text())
    assert metrics["classname"] == "mine" and 0.0 <= metrics["ahl"]["auc_roc"] <= 1.0
    assert set(metrics["base"]["per_class_auc_roc"]) <= {"crack", "foreign", "hole", "scratch", "stain"}
    assert "f1" in metrics["ahl"]["at_threshold"]
    assert set(json.loads((repo.path / "models/thresholds.json").read_text())) == {"base", "ahl", "runtime", "inputs"}
    assert metrics["base"]["n_test"]["normal"] == 5  # 3:1 of the 18 normals by data.split_seed

    # an edit that breaks the folder is caught by selection, before anything else reruns (it depends on
    # data/local.json, which local_manifest rewrites on every repro)
    for defect in ("crack", "foreign", "hole", "scratch", "stain"):
        shutil.rmtree(local / "mine" / defect, ignore_errors=True)
    res = repo.dvc("exp", "run", "-S", "classname=mine", "-S", f"data.local={local}", check=False)
    assert res.returncode != 0 and "failed to reproduce 'selection'" in res.stderr, res.stdout + res.stderr
    assert "no anomal" in res.stdout + res.stderr and "Traceback" not in res.stdout + res.stderr
    assert repo.ran(res.stdout) == {"local_manifest", "selection"}


@pytest.mark.parametrize("what", ["image", "mask"])
@pytest.mark.parametrize("damage", ["not an image", "truncated"])
def test_an_unreadable_file_of_yours_is_named_as_yours_and_nothing_is_written(small_dataset, tmp_path, damage, what):
    """Converted from a copy under data/raw (as the pipeline does), the error names data.local/mine/..., the file
    the user can fix, not the copy."""
    local = make_own(small_dataset, tmp_path / "mydata")
    folder = local / "mine" / ("train/good" if what == "image" else "ground_truth/crack")
    bad = sorted(folder.iterdir())[1]
    data = bad.read_bytes()
    bad.write_bytes(b"these bytes are no image" if damage == "not an image" else data[: len(data) // 2])
    raw = tmp_path / "data" / "raw" / "own"
    shutil.copytree(local, raw)
    with pytest.raises(UserError) as err:
        selected_dataset(select("mine", local, M2)).convert(raw, tmp_path / "out", seed=42)
    message = str(err.value)
    yours = Path("data.local") / bad.relative_to(local)
    assert f"cannot read {yours} of your data" in message and "\n" not in message, message
    assert str(raw) not in message and "raw" not in message.split(" of your data")[0]
    assert not (tmp_path / "out" / "mine").exists()


def test_an_image_above_data_max_pixels_is_skipped_with_its_mask_and_the_rest_converted(
    small_dataset, tmp_path, caplog
):
    """A huge file (here: above a low limit) is refused from its header, with its mask; the others are converted."""
    local = make_own(small_dataset, tmp_path / "mydata")
    big = sorted((local / "mine" / "test" / "crack").iterdir())[0]
    Image.open(big).resize((128, 128)).save(big)
    mask = local / "mine" / "ground_truth" / "crack" / f"{big.stem}_mask.png"
    assert mask.is_file()
    with caplog.at_level(logging.WARNING):
        selected_dataset(select("mine", local, M2), max_pixels=64 * 64).convert(local, tmp_path / "out", seed=42)
    name = Path("data.local") / big.relative_to(local)
    assert f"skipped: {name} is 128 x 128 = 16,384 pixels, above the limit of 4,096 (data.max_pixels)" in caplog.text
    out = tmp_path / "out" / "mine"
    n_crack = len(list((local / "mine" / "test" / "crack").iterdir()))
    assert len(list((out / "test" / "crack").iterdir())) == n_crack - 1
    assert not (out / "ground_truth" / "crack" / mask.name).exists()
    assert len(list((out / "ground_truth" / "crack").iterdir())) == n_crack - 1
    assert len(list((out / "train" / "good").iterdir())) == len(list((local / "mine" / "train" / "good").iterdir()))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(classname=hostile_names(on_disk=False), defect=hostile_names(on_disk=True), folder=hostile_names(on_disk=True))
def test_fuzzed_names_convert_or_give_one_line_and_write_nothing_outside(small_dataset, classname, defect, folder):
    """Own data whose classname (any string), folder name and defect name are hostile: selection and convert
    either work or stop with a one-line UserError, and nothing outside the temporary project changes."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        outside = root / "outside"
        shutil.copytree(small_dataset / "brick", outside / "brick")
        project = root / "project"
        local = project / folder
        brick = small_dataset / "brick"
        target = local / classname if path_like_ok(classname) else local / "mine"
        for split in ("train/good", "test/good"):
            shutil.copytree(brick / split, target / split)
        shutil.copytree(brick / "test" / "crack", target / "test" / defect)
        before = tree_digest(outside)
        try:
            selected = select(classname, local, M2)
            selected_dataset(selected).convert(local, project / "data" / "mvtec", seed=42)
        except UserError as err:
            assert "\n" not in str(err) and "\r" not in str(err), repr(str(err))
        assert tree_digest(outside) == before
        written = [p for p in root.rglob("*") if not (p.is_relative_to(project) or p.is_relative_to(outside))]
        assert written == [], written


def path_like_ok(name: str) -> bool:
    return "/" not in name and "\x00" not in name and name not in (".", "..", "") and len(name.encode()) <= 100
