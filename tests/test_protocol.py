"""The open-set protocol: general and hard settings, M = 1 on M = 10's test set, contamination, errors."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image

from ahl.core.errors import UserError
from ahl.data.mvtec import load_image, read_subset
from ahl.data.protocol import ProtocolConfig, Split, make_split


def test_general_setting_seen_from_sorted_seeded_shuffle(small_dataset):
    subset = read_subset(small_dataset, "brick")
    split = make_split(subset, ProtocolConfig(n_anomalies=10, test_set_m=10), seed=3)
    seen = [s.file for s in split.train_anomalies]
    assert len(seen) == 10 and len(split.train_normals) == 12
    test_files = {s.file for s in split.test}
    assert not test_files & set(seen)
    n_anomalies = sum(len(v) for v in subset.anomalies.values())
    assert sum(s.label for s in split.test) == n_anomalies - 10
    assert split.seen_classes == sorted({s.cls for s in split.train_anomalies})
    for s in split.test:
        assert s.seen == (s.label == 1 and s.cls in split.seen_classes)
    # deterministic in the seed, different for another seed
    assert make_split(subset, ProtocolConfig(), seed=3).to_dict() == split.to_dict()
    assert [s.file for s in make_split(subset, ProtocolConfig(), seed=4).train_anomalies] != seen


def test_m1_uses_the_test_set_of_m10(small_dataset):
    subset = read_subset(small_dataset, "brick")
    m10 = make_split(subset, ProtocolConfig(n_anomalies=10), seed=0)
    m1 = make_split(subset, ProtocolConfig(n_anomalies=1), seed=0)
    assert [s.file for s in m1.test] == [s.file for s in m10.test]
    assert [s.file for s in m1.train_anomalies] == [s.file for s in m10.train_anomalies][:1]
    assert len(m1.seen_classes) == 1


def test_hard_setting_tests_only_other_classes(small_dataset):
    subset = read_subset(small_dataset, "grass")
    split = make_split(subset, ProtocolConfig(n_anomalies=3, known_class="hole"), seed=0)
    assert split.setting == "hard" and split.seen_classes == ["hole"]
    assert {s.cls for s in split.train_anomalies} == {"hole"}
    test_classes = {s.cls for s in split.test if s.label == 1}
    assert "hole" not in test_classes and test_classes == set(subset.anomaly_classes) - {"hole"}
    assert not any(s.seen for s in split.test)


def test_contamination_moves_test_anomalies_into_training(small_dataset):
    subset = read_subset(small_dataset, "brick")
    clean = make_split(subset, ProtocolConfig(n_anomalies=2, test_set_m=2), seed=0)
    dirty = make_split(subset, ProtocolConfig(n_anomalies=2, test_set_m=2, contamination=0.25), seed=0)
    contaminated = [s for s in dirty.train if s.contaminated]
    assert len(contaminated) == 3 and all(s.label == 0 and s.cls != "good" for s in contaminated)
    assert not {s.file for s in contaminated} & {s.file for s in dirty.test}
    assert len(dirty.test) == len(clean.test) - 3


def test_split_roundtrip(small_dataset):
    split = make_split(read_subset(small_dataset, "brick"), ProtocolConfig(n_anomalies=1), seed=0, classname="brick")
    assert Split.from_dict(split.to_dict()).to_dict() == split.to_dict()


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(n_anomalies=30, test_set_m=10), "n_anomalies=30.*has 25"),
        (dict(n_anomalies=6, known_class="hole"), "class 'hole'.*only 5"),
        (dict(n_anomalies=1, known_class="dent"), "known_class='dent'.*crack, foreign, hole, scratch, stain"),
    ],
)
def test_protocol_errors_name_the_value_and_fix(small_dataset, config, match):
    with pytest.raises(UserError, match=match):
        make_split(read_subset(small_dataset, "brick"), ProtocolConfig(**config), seed=0, classname="brick")


def test_bad_config_values():
    with pytest.raises(UserError, match="n_anomalies must be >= 1"):
        ProtocolConfig(n_anomalies=0)
    with pytest.raises(UserError, match="contamination"):
        ProtocolConfig(contamination=0.7)


def test_layout_errors(small_dataset, tmp_path):
    with pytest.raises(UserError, match="missing folder .*carpet.*subsets present: \\['brick', 'grass', 'gravel'\\]"):
        read_subset(small_dataset, "carpet")
    broken = tmp_path / "root"
    shutil.copytree(small_dataset / "brick", broken / "brick")
    for f in (broken / "brick" / "test" / "hole").iterdir():
        f.unlink()
    with pytest.raises(UserError, match="empty folder .*test/hole"):
        read_subset(broken, "brick")
    shutil.rmtree(broken / "brick" / "train")
    with pytest.raises(UserError, match="missing folder .*train/good"):
        read_subset(broken, "brick")


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot read image .*bad.png"):
        load_image(bad, 32)
    good = tmp_path / "grey.png"
    Image.new("L", (10, 20), 7).save(good)
    assert load_image(good, 32).shape == (32, 32, 3)
