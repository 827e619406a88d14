"""The deployment threshold: the rules on hand-computed scores, the validation slice, the metrics at a threshold."""

from __future__ import annotations

import numpy as np
import pytest

from ahl.core.errors import UserError
from ahl.data.mvtec import read_subset
from ahl.data.protocol import ProtocolConfig, make_split
from ahl.evaluation.threshold import (
    ThresholdConfig,
    at_threshold,
    choose,
    f1_threshold,
    fpr_threshold,
    metrics_at_threshold,
)

FPR = ThresholdConfig(rule="fpr", target_fpr=0.01, batch_size=8)


def test_fpr_rule_on_100_normals_flags_exactly_one():
    normal = np.arange(100, dtype=np.float32)[::-1].copy()  # 99 .. 0
    assert fpr_threshold(normal, 0.01) == 98.0  # k = 1 normal may score above: the 2nd highest
    assert fpr_threshold(normal, 0.0) == 99.0  # none may: the highest
    assert fpr_threshold(normal, 0.05) == 94.0
    assert fpr_threshold(normal, 0.019) == 98.0  # floor(1.9) = 1
    entry = choose(FPR, normal, np.zeros(0), "base")
    assert entry["threshold"] == 98.0 and entry["decision"] == "score > threshold"
    assert entry["validation"]["fpr"] == 0.01 and entry["validation"]["fp"] == 1
    assert entry["validation"]["normal"] == 100 and entry["validation"]["anomaly"] == 0


def test_ties_at_the_threshold_are_not_flagged():
    normal = np.r_[np.full(2, 99.0), np.arange(98.0)]  # the two highest tie
    assert fpr_threshold(normal, 0.01) == 99.0  # the 2nd highest is 99 as well: nothing is above it
    assert at_threshold(np.zeros(100), normal, 99.0)["fpr"] == 0.0


def test_f1_rule_by_hand():
    normal, anomaly = np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.35, 0.5, 0.6])
    # t=0.4: tp 2, fp 0, fn 1 -> F1 0.8; t=0.3: tp 3, fp 1 -> 6/7; t=0.2: tp 3, fp 2 -> 0.75
    assert f1_threshold(normal, anomaly) == 0.3
    # below every score flags all: F1 4/5 beats flagging only 0.6 (2/3) and 0.5 (F1 0.5)
    assert f1_threshold(np.array([0.5]), np.array([0.4, 0.6])) == np.nextafter(0.4, -np.inf)
    entry = choose(ThresholdConfig("f1", 0.01, 8), normal, anomaly, "ahl")
    assert entry["threshold"] == 0.3 and entry["validation"]["f1"] == pytest.approx(6 / 7)


def test_metrics_at_a_threshold_by_hand():
    labels, scores = np.array([0, 0, 0, 1, 1]), np.array([0.1, 0.6, 0.2, 0.7, 0.3])
    m = at_threshold(labels, scores, 0.5)  # predicted 0 1 0 1 0: tp 1, fp 1, tn 2, fn 1
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (1, 1, 2, 1)
    assert (m["precision"], m["recall"], m["f1"]) == (0.5, 0.5, 0.5) and m["fpr"] == pytest.approx(1 / 3)
    none = at_threshold(labels, scores, 1.0)  # nothing flagged: precision undefined, recall and F1 0
    assert none["precision"] is None and none["recall"] == 0.0 and none["f1"] == 0.0 and none["fpr"] == 0.0
    out = metrics_at_threshold(labels, scores, {"threshold": 0.5, "rule": "fpr"})
    assert out["rule"] == "fpr" and out["value"] == 0.5 and out["f1"] == 0.5


def test_errors_are_one_line():
    with pytest.raises(UserError, match="set protocol.validation_fraction > 0"):
        choose(FPR, np.zeros(0), np.zeros(0), "base")
    with pytest.raises(UserError, match="threshold.rule=f1 needs anomalies that are neither seen"):
        choose(ThresholdConfig("f1", 0.01, 8), np.ones(5), np.zeros(0), "base")
    with pytest.raises(UserError, match="threshold.rule = 'max' must be one of fpr, f1"):
        ThresholdConfig("max", 0.01, 8)
    with pytest.raises(UserError, match=r"threshold.target_fpr must be in \[0, 1\)"):
        ThresholdConfig("fpr", 1.0, 8)
    with pytest.raises(UserError, match="protocol.validation_fraction must be in"):
        ProtocolConfig(validation_fraction=0.5)


@pytest.mark.parametrize("known_class", [None, "hole"])
def test_validation_slice_is_disjoint_from_train_and_test_and_deterministic(small_dataset, known_class):
    subset = read_subset(small_dataset, "brick")
    config = ProtocolConfig(n_anomalies=2, test_set_m=4, known_class=known_class, validation_fraction=0.25)
    split = make_split(subset, config, seed=3)
    train, val, test = ({s.file for s in part} for part in (split.train, split.validation, split.test))
    assert not (train & val) and not (train & test) and not (val & test)
    assert sum(s.label == 0 for s in split.validation) == 3  # round(0.25 * 12)
    assert sum(s.label == 1 for s in split.validation) == (2 if known_class is None else 3)  # spare: 4 - 2; 5 - 2
    assert len(split.train_normals) == 9 and split.summary()["validation_normal"] == 3
    again = make_split(subset, config, seed=3)
    assert again.to_dict() == split.to_dict()
    # the seen anomalies do not depend on the fraction (the slice has its own generator)
    none = make_split(subset, ProtocolConfig(2, 4, known_class, 0.0, 0.0), seed=3)
    assert [s.file for s in none.train_anomalies] == [s.file for s in split.train_anomalies]
    assert [s for s in none.validation if s.label == 0] == [] and len(none.train_normals) == 12
    assert make_split(subset, config, seed=4).validation != split.validation


def test_a_threshold_on_the_highest_normal_says_so_with_its_gaps():
    """N * target_fpr < 1 (the demo: 8 validation normals at 0.01): the threshold is the highest normal's own score,
    and thresholds.json records it with the gaps to the nearest validation scores on each side."""
    normal, anomaly = np.array([0.1, 0.5, 0.9, 0.7, 0.2, 0.3, 0.4, 0.6]), np.array([1.5, 0.95, 3.0])
    entry = choose(FPR, normal, anomaly, "ahl")
    assert entry["threshold"] == 0.9
    firm = entry["firmness"]
    assert firm["on_highest_normal"] is True
    assert firm["gap_below"] == pytest.approx(0.2) and firm["gap_above"] == pytest.approx(0.05)
    many = np.arange(200, dtype=np.float64)  # 200 x 0.01 = 2 normals may lie above: not on the highest normal
    assert choose(FPR, many, np.zeros(0), "ahl")["firmness"] == {"on_highest_normal": False, "gap_below": 1.0,
                                                                 "gap_above": 1.0}  # fmt: skip
    only = choose(FPR, np.array([2.0]), np.zeros(0), "ahl")["firmness"]
    assert only == {"on_highest_normal": True, "gap_below": None, "gap_above": None}


def test_borderline_is_within_the_tolerance_of_the_threshold():
    from ahl.evaluation.decision import TOLERANCE, borderline, checked_threshold, decide

    scores = np.array([1.0, 1.0 + TOLERANCE / 2, 1.0 - TOLERANCE, 1.0 + 2 * TOLERANCE, 0.5])
    assert borderline(scores, 1.0).tolist() == [True, True, True, False, False]
    assert decide(scores, 1.0).tolist() == [False, True, False, True, False]
    assert borderline(scores, None) is None and decide(scores, None) is None
    for bad in (float("nan"), float("inf"), "1.0", True):
        with pytest.raises(UserError, match="is not a finite number"):
            checked_threshold(bad, "--threshold", "give a score")
