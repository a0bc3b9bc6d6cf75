"""Metrics against hand-computed values (definitions: docs/method.md), ties at 0, np.round's ties-to-even, clipping."""

from __future__ import annotations

import math

import pytest

from egmf.datasets import get_spec
from egmf.metrics import metric_names, score


def test_classification_acc_and_weighted_f1():
    targets = ["joy", "joy", "anger", "neutral"]
    preds = ["joy", "anger", "anger", "neutral"]
    m = score("meld", preds, targets)
    assert m["acc"] == 0.75
    # per class F1: joy 2/3 (p=1, r=.5), anger 2/3 (p=.5, r=1), neutral 1; weights 2,1,1
    assert m["wf1"] == pytest.approx((2 * 2 / 3 + 1 * 2 / 3 + 1 * 1) / 4)


def test_unparseable_class_counts_as_wrong_not_as_a_class():
    m = score("cherma", ["joy", None], ["joy", "anger"])
    assert m["acc"] == 0.5
    # joy: p=1, r=1 -> 1; anger: never predicted -> 0; weights 1, 1
    assert m["wf1"] == pytest.approx(0.5)


def test_mosei_has0_and_non0_treat_zero_differently():
    truth = [0.0, 0.0, 1.2, -0.4]
    preds = [0.0, -0.2, 0.4, 0.6]
    m = score("mosei", preds, truth)
    # has0: positive means >= 0. truth T,T,T,F; preds T,F,T,T -> 2 of 4 right
    assert m["has0_acc2"] == 0.5
    # non0: drop truths == 0 -> truth [1.2, -0.4] (T, F), preds [0.4, 0.6] (T, T) -> 1 of 2
    assert m["non0_acc2"] == 0.5
    # non0_f1: class T: p=.5, r=1 -> 2/3 (support 1); class F: never predicted -> 0 (support 1)
    assert m["non0_f1"] == pytest.approx(1 / 3)
    assert m["mae"] == pytest.approx((0 + 0.2 + 0.8 + 1.0) / 4)


def test_mosei_rounding_ties_go_to_even_and_clipping():
    # np.round: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -2.5 -> -2, -0.5 -> -0 (== 0)
    truth = [0.0, 2.0, 2.0, -2.0, 0.0, 3.0]
    preds = [0.5, 1.5, 2.5, -2.5, -0.5, 2.6]
    m = score("mosei", preds, truth)
    # acc7 (clip [-3, 3]): 0=0 Y, 2=2 Y, 2=2 Y, -2=-2 Y, 0=0 Y, round(2.6)=3 vs 3 Y -> 6/6
    assert m["acc7"] == 1.0
    # acc5 (clip [-2, 2]): 2.6 -> 2 and 3 -> 2: also equal -> 6/6; now one that only clipping makes equal:
    assert m["acc5"] == 1.0
    m = score("mosei", [2.9, -3.0], [2.0, -2.4])
    assert m["acc5"] == 1.0  # clip 2.9 -> 2 == 2; -3 -> -2 == round(-2.4) = -2
    assert m["acc7"] == 0.0  # round(2.9) = 3 != 2; -3 != round(-2.4) = -2


def test_mosei_corr_is_pearson_and_nan_when_constant():
    m = score("mosei", [1.0, 2.0, 3.0], [2.0, 4.0, 6.5])
    # dx = -1, 0, 1; dy = -13/6, -1/6, 7/3: sum dx dy = 4.5, sum dx^2 = 2, sum dy^2 = 61/6
    assert m["corr"] == pytest.approx(4.5 / math.sqrt(2 * 61 / 6))
    assert math.isnan(score("mosei", [1.0, 1.0], [0.0, 2.0])["corr"])


def test_sims_bins_are_open_left_closed_right():
    # acc2 bins (-1.01, 0], (0, 1.01]: zero is negative
    truth = [0.0, 0.1, -0.1, 0.7, -1.0]
    preds = [-0.2, 0.0, -0.1, 0.8, -1.6]  # -1.6 clips to -1.0
    m = score("sims2", preds, truth)
    # acc2: 0->neg/neg Y, 0.1 pos vs 0.0 neg N, Y, Y, Y -> 4/5
    assert m["acc2"] == 0.8
    # acc3 bins (-1.01,-0.1], (-0.1,0.1], (0.1,1.01]:
    # truth: 0->mid, 0.1->mid, -0.1->low, 0.7->high, -1->low; preds: -0.2 low, 0 mid, -0.1 low, 0.8 high, -1 low
    assert m["acc3"] == 0.8
    # acc5 bins (-1.01,-0.7], (-0.7,-0.1], (-0.1,0.1], (0.1,0.7], (0.7,1.01]:
    # truth: 0->2, 0.1->2, -0.1->1, 0.7->3, -1->0; preds: -0.2->1, 0->2, -0.1->1, 0.8->4, -1->0 -> 3/5
    assert m["acc5"] == 0.6
    assert m["mae"] == pytest.approx((0.2 + 0.1 + 0 + 0.1 + 0) / 5)  # after clipping


def test_sims_f1_is_weighted_on_acc2_bins():
    m = score("sims2", [0.5, 0.5, -0.5, 0.0], [0.3, -0.3, -0.2, 0.0])
    # truth bins 1,0,0,0; preds 1,1,0,0. class 1: p=.5 r=1 -> 2/3 (support 1); class 0: p=1 r=2/3 -> .8 (support 3)
    assert m["f1"] == pytest.approx((2 / 3 + 3 * 0.8) / 4)


def test_demo_sets_use_the_matching_family():
    assert set(score("demo_reg_en", [1.0, -1.0], [0.5, -2.0])) >= {"has0_acc2", "acc7"}
    assert set(score("demo_reg_zh", [0.5, -0.5], [0.5, -0.2])) >= {"acc3", "f1"}
    assert set(score("demo_cls_zh", ["joy"], ["joy"])) == {"acc", "wf1"}


def test_bad_inputs_say_what_is_wrong():
    with pytest.raises(ValueError, match="2 predictions for 1 targets"):
        score("meld", ["joy", "joy"], ["joy"])
    with pytest.raises(ValueError, match="unparseable answers"):
        score("mosei", [None, 1.0], [0.0, 1.0])


@pytest.mark.parametrize("dataset", ["meld", "cherma", "mosei", "sims2", "demo_cls_en", "demo_reg_zh"])
def test_metric_names_are_what_score_returns(dataset):
    spec = get_spec(dataset)
    preds = list(spec.labels[:2]) if spec.labels else [0.5, -0.5]
    assert tuple(score(dataset, preds, preds)) == metric_names(dataset)
