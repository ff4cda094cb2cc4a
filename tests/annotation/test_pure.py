"""Rounds as data, consensus and agreement: pure functions, checked on hand-computed cases."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from annotation import schema as S
from annotation.agreement import gold_accuracy, round_agreement
from annotation.consensus import decide
from annotation.rounds import AnnotationError, ConsensusRule, get_round
from pipeline.schema import ID

# a keeps i1 i2 i4, b keeps i1 i4: agree on 3 of 4 items.
VOTES = [("i1", "a", "keep"), ("i1", "b", "keep"), ("i2", "a", "keep"), ("i2", "b", "reject"),
         ("i3", "a", "reject"), ("i3", "b", "reject"), ("i4", "a", "keep"), ("i4", "b", "keep")]


def test_agreement_matches_the_hand_computed_kappas():
    result = round_agreement(VOTES, ["keep", "reject"])
    assert result.percent_agreement == pytest.approx(0.75)
    # Cohen: p_o = 3/4, p_e = 3/4*2/4 + 1/4*2/4 = 1/2  ->  (0.75 - 0.5) / 0.5
    assert result.pairs[0].cohen_kappa == pytest.approx(0.5)
    # Fleiss: p_keep = 5/8, P_e = 25/64 + 9/64 = 34/64, P_bar = 3/4  ->  (48/64 - 34/64) / (30/64)
    assert result.fleiss_kappa == pytest.approx(14 / 30)
    assert round_agreement([("i1", "a", "keep"), ("i1", "b", "keep")], ["keep", "reject"]).fleiss_kappa is None


def test_gold_accuracy_flags_an_annotator_below_the_threshold():
    acc = gold_accuracy(VOTES, {"i1": "keep", "i2": "reject", "i3": "reject"}, min_accuracy=0.7)
    assert (acc["a"].n_correct, acc["a"].n_gold, acc["a"].flagged) == (2, 3, True)
    assert (acc["b"].accuracy, acc["b"].flagged) == (1.0, False)


@pytest.mark.parametrize(
    "rule, expected",
    [(ConsensusRule(kind="any"), [True, True, False]), (ConsensusRule(kind="all"), [True, False, False]),
     (ConsensusRule(kind="majority"), [True, False, False]), (ConsensusRule(kind="at_least", k=2), [True, False, False])],
)
def test_consensus_rules(rule, expected):
    assert [rule.keeps(p, 2) for p in (2, 1, 0)] == expected


def test_rule_and_round_validation():
    with pytest.raises(ValueError):
        ConsensusRule(kind="at_least")
    with pytest.raises(AnnotationError):
        get_round("expert")
    with pytest.raises(ValueError, match="not a control"):
        get_round("generalist", decision_field="nope")


def _row(pool_id, who, answers, reason=None, gold=False):
    return {ID: pool_id, S.TASK_ID: 1, S.PROJECT_ID: 1, S.ANNOTATION_ID: 1, S.ANNOTATOR: who,
            S.ANSWERS: json.dumps(answers), S.DECISION: answers.get("decision"), S.LEAD_TIME: 1.0,
            S.CREATED_AT: None, S.IS_GOLD: gold, S.GOLD_CORRECT: None, S.EXCLUSION_REASON: reason}


def test_specialist_decisions_rank_caption_and_reasons():
    round_ = get_round("specialist", target_size=1)
    good = {"decision": "select", "composition": 5, "lighting": 5, "color_contrast": 5, "subject_background": 5}
    fair = {**good, "composition": 3}
    rows = [
        _row("p1", "a", {**fair, "caption": "short"}), _row("p1", "b", {**fair, "caption": "a longer caption"}),
        _row("p2", "a", {**good, "caption": "best"}), _row("p2", "b", {**good, "caption": "by the trusted one"}),
        _row("p3", "a", good), _row("p3", "b", {"decision": "reject"}),
        _row("p4", "a", good), _row("p4", "b", good),  # selected by all, but nobody wrote a caption
        _row("p5", "a", good, reason="skipped"),
    ]
    d = decide(pa.Table.from_pylist(rows, schema=S.ANNOTATIONS_SCHEMA), ["p1", "p2", "p3", "p4", "p5"], round_,
               trust={"a": 0.5, "b": 1.0})
    by = {r[ID]: r for r in d.table.to_pylist()}
    assert by["p2"][S.KEEP] and by["p2"]["caption"] == "by the trusted one"
    assert (by["p1"][S.REASON], by["p3"][S.REASON], by["p4"][S.REASON], by["p5"][S.REASON]) == (
        "over_target", "consensus_reject", "no_caption", "no_valid_annotations")
    assert by["p1"][S.RANK_SCORE] == pytest.approx(4.5)
    assert (d.kept, d.shortfall) == (1, 0)
    assert decide(pa.Table.from_pylist(rows, schema=S.ANNOTATIONS_SCHEMA), ["p1", "p2"],
                  get_round("specialist", target_size=5)).shortfall == 3


def test_answers_round_trip_through_label_studio_results():
    round_ = get_round("specialist")
    answers = {"decision": "select", "composition": 4, "caption": "a cat on a mat"}
    parsed, missing = round_.answers_from_result(round_.result_from_answers(answers))
    assert parsed == answers
    assert "lighting" in missing and "caption" not in missing
    with pytest.raises(AnnotationError):
        round_.result_from_answers({"decision": "maybe"})
