"""compute_metrics (the papers' headline numbers, with the seen/unseen split) against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from ahl.evaluation.image_metrics import auc_roc_pr, compute_metrics

# 3 normals, 2 anomalies of the seen class "a", 1 of the unseen class "b" (a class with one sample).
LABELS = [0, 0, 0, 1, 1, 1]
CLASSES = ["good", "good", "good", "a", "a", "b"]
SEEN = [False, False, False, True, True, False]
SCORES = [0.1, 0.4, 0.35, 0.8, 0.3, 0.9]


def test_overall_seen_unseen_and_per_class_by_hand():
    m = compute_metrics(LABELS, SCORES, CLASSES, SEEN)
    # anomaly-normal pairs ranked right: 0.8 beats 3 normals, 0.3 beats 1 (0.1), 0.9 beats 3 -> 7 of 9
    assert m["auc_roc"] == pytest.approx(7 / 9)
    # ranking 0.9+ 0.8+ 0.4- 0.35- 0.3+ 0.1-: precision at the positives 1/1, 2/2, 3/5
    assert m["auc_pr"] == pytest.approx((1 + 1 + 3 / 5) / 3)
    assert m["seen_auc_roc"] == pytest.approx(4 / 6)  # class a only: 3 + 1 of 6 pairs
    assert m["seen_auc_pr"] == pytest.approx((1 + 2 / 4) / 2)  # 0.8+ 0.4- 0.35- 0.3+ 0.1-
    assert m["unseen_auc_roc"] == 1.0 and m["unseen_auc_pr"] == 1.0
    assert m["per_class_auc_roc"] == {"a": pytest.approx(4 / 6), "b": 1.0}
    assert m["n_test"] == {"normal": 3, "seen": 2, "unseen": 1}


def test_no_unseen_classes_leaves_the_unseen_entries_out():
    m = compute_metrics(LABELS, SCORES, CLASSES, [False, False, False, True, True, True])
    assert "unseen_auc_roc" not in m and "unseen_auc_pr" not in m
    assert m["seen_auc_roc"] == pytest.approx(7 / 9) and m["n_test"]["unseen"] == 0


def test_only_normals_has_no_auc_and_non_finite_scores_are_an_error():
    assert auc_roc_pr([0, 0], [0.1, 0.2]) is None
    m = compute_metrics([0, 0], [0.1, 0.2], ["good", "good"], [False, False])
    assert "auc_roc" not in m and m["per_class_auc_roc"] == {}
    with pytest.raises(ValueError, match="non-finite"):
        compute_metrics(LABELS, [*SCORES[:-1], np.nan], CLASSES, SEEN)


def test_ties_count_half():
    assert auc_roc_pr([0, 1], [0.5, 0.5])["auc_roc"] == 0.5
