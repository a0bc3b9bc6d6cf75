"""Verbalise/parse round trips, strictness on garbage, candidates for constrained decoding."""

from __future__ import annotations

import pytest

from egmf.labels import Verbaliser


@pytest.mark.parametrize("dataset", ["meld", "cherma", "demo_cls_en", "demo_cls_zh"])
def test_class_round_trip(dataset):
    v = Verbaliser.for_dataset(dataset)
    for name in v.spec.labels:
        assert v.parse(v.verbalise(name)) == name
        assert v.parse(f" {v.verbalise(name)}。") == name
    assert [v.candidate_label(i) for i in range(len(v.candidates()))] == list(v.spec.labels)


def test_chinese_words_and_custom_words():
    assert Verbaliser.for_dataset("cherma").verbalise("joy") == "高兴"
    v = Verbaliser.for_dataset("meld", {"joy": "happy"})
    assert v.verbalise("joy") == "happy" and v.parse("Happy") == "joy" and v.parse("joy") is None
    with pytest.raises(ValueError, match="unknown classes"):
        Verbaliser.for_dataset("meld", {"happiness": "happy"})
    with pytest.raises(ValueError, match="not distinct"):
        Verbaliser.for_dataset("meld", {"joy": "anger"})


def test_garbage_is_unparseable_not_a_class():
    v = Verbaliser.for_dataset("meld")
    for answer in ("", "banana", "joyful", "I feel joy", "3"):
        assert v.parse(answer) is None, answer
    assert v.parse("joy, mostly") == "joy"


@pytest.mark.parametrize(
    "dataset,value,text",
    [
        ("mosei", 0.6, "+0.6"),
        ("mosei", -1.24, "-1.2"),
        ("mosei", 0.0, "+0.0"),
        ("mosei", -0.04, "+0.0"),
        ("mosei", 5.0, "+3.0"),
        ("sims2", -1.0, "-1.0"),
        ("sims2", 0.25, "+0.2"),
    ],
)
def test_scores_are_signed_one_decimal(dataset, value, text):
    v = Verbaliser.for_dataset(dataset)
    assert v.verbalise(value) == text
    assert v.parse(text) == pytest.approx(round(min(max(value, -3), 3) if dataset == "mosei" else value, 1))


def test_score_parsing_is_lenient_on_form_strict_on_content():
    v = Verbaliser.for_dataset("mosei")
    assert v.parse(" −1.5 ") == -1.5 and v.parse("2") == 2.0 and v.parse("+7.5") == 3.0  # clipped to range
    assert v.parse("positive") is None and v.parse("") is None


def test_score_candidates_cover_the_range_in_tenths():
    mosei, sims = Verbaliser.for_dataset("mosei"), Verbaliser.for_dataset("sims2")
    assert len(mosei.candidates()) == 61 and mosei.candidates()[0] == "-3.0" and mosei.candidates()[30] == "+0.0"
    assert len(sims.candidates()) == 21 and sims.candidate_label(20) == 1.0
    assert all(sims.parse(c) == sims.candidate_label(i) for i, c in enumerate(sims.candidates()))
