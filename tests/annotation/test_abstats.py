"""A/B aggregation (annotation/abstats.py): each rule against a hand-computed table."""

from __future__ import annotations

import pytest

from annotation.abstats import (
    ABStatsError,
    PositionBias,
    comparison_summary,
    margin_rule,
    pair_outcomes,
    plurality,
    position_bias,
    repeat_consistency,
    to_vote,
)
from annotation.rounds import AnnotationError


def test_to_vote_turns_a_side_into_a_checkpoint():
    assert [to_vote(side, "a") for side in ("left", "right", "tie")] == ["a", "b", "tie"]
    assert [to_vote(side, "b") for side in ("left", "right", "tie")] == ["b", "a", "tie"]


def test_emu_faithfulness_both_and_neither_count_as_tie():
    # Emu §4.1, text faithfulness, 3 annotators; "both"/"neither" are ties.
    #   pair  left  sides                    votes (checkpoint terms)  a b tie  plurality
    #   f1    a     left, both, neither      a, tie, tie               1 0 2    tie
    #   f2    b     right, right, both       a, a, tie                 2 0 1    a
    #   f3    b     left, neither, right     b, tie, a                 1 1 1    tie (three-way top)
    #   f4    a     right, right, left       b, b, a                   1 2 0    b
    #   f5    b     both, neither, left      tie, tie, b               0 1 2    tie
    table = {
        "f1": ("a", ["left", "both", "neither"]),
        "f2": ("b", ["right", "right", "both"]),
        "f3": ("b", ["left", "neither", "right"]),
        "f4": ("a", ["right", "right", "left"]),
        "f5": ("b", ["both", "neither", "left"]),
    }
    votes = [
        (pair, f"u{i}", to_vote(side, left)) for pair, (left, sides) in table.items() for i, side in enumerate(sides)
    ]
    assert pair_outcomes(votes) == {"f1": "tie", "f2": "a", "f3": "tie", "f4": "b", "f5": "tie"}


@pytest.mark.parametrize(
    "n_a, n_b, n_tie, expected",
    [
        (3, 1, 1, "a"),  # clear majority
        (1, 2, 2, "tie"),  # b tied at the top with the ties: no clear preference
        (2, 2, 1, "tie"),  # a and b tied at the top
        (2, 1, 2, "tie"),  # a tied at the top with the ties
        (1, 1, 3, "tie"),
        (0, 1, 0, "b"),
    ],
)
def test_plurality_on_emu_appeal_tables_of_five_votes(n_a, n_b, n_tie, expected):
    assert plurality(n_a, n_b, n_tie) == expected


def test_playground_margin_rule_and_plurality_disagree_where_the_margin_matters():
    # Playground v2.5 §3.1, 7 votes per pair; a win needs a >= 2-vote margin, tie votes count for no side.
    #   pair  a b tie  plurality  margin (a - b)
    #   p1    4 3 0    a          tie (1)
    #   p2    5 2 0    a          a   (3)
    #   p3    3 3 1    tie        tie (0)
    #   p4    2 4 1    b          b   (-2)
    #   p5    3 1 3    tie        a   (2): a and the ties share the top, but a leads b by 2
    #   p6    1 2 4    tie        tie (-1)
    table = {"p1": (4, 3, 0), "p2": (5, 2, 0), "p3": (3, 3, 1), "p4": (2, 4, 1), "p5": (3, 1, 3), "p6": (1, 2, 4)}
    votes = []
    for pair, counts in table.items():
        ballot = [v for v, n in zip(("a", "b", "tie"), counts) for _ in range(n)]
        votes += [(pair, f"u{i}", v) for i, v in enumerate(ballot)]
    assert pair_outcomes(votes, rule="plurality") == {
        "p1": "a", "p2": "a", "p3": "tie", "p4": "b", "p5": "tie", "p6": "tie"}
    assert pair_outcomes(votes, rule="margin") == {
        "p1": "tie", "p2": "a", "p3": "tie", "p4": "b", "p5": "a", "p6": "tie"}
    assert pair_outcomes(votes, rule="margin", margin=3) == {
        "p1": "tie", "p2": "a", "p3": "tie", "p4": "tie", "p5": "tie", "p6": "tie"}
    assert margin_rule(4, 3, margin=1) == "a"


# prompt q1: a, a, tie; q2: b, a; q3: a, tie, b, a  ->  9 pairs: 5 wins, 2 ties, 2 losses
OUTCOMES = {"q1-0": "a", "q1-1": "a", "q1-2": "tie", "q2-0": "b", "q2-1": "a",
            "q3-0": "a", "q3-1": "tie", "q3-2": "b", "q3-3": "a"}
PROMPT_OF = {pair: pair.split("-")[0] for pair in OUTCOMES}


def test_comparison_summary_fractions_net_win_and_sign_test():
    s = comparison_summary(OUTCOMES, PROMPT_OF)
    assert (s.n_pairs, s.n_prompts, s.wins, s.ties, s.losses, s.n_decisive) == (9, 3, 5, 2, 2, 7)
    assert (s.win, s.tie, s.lose) == pytest.approx((5 / 9, 2 / 9, 2 / 9))
    assert s.net_win == pytest.approx(3 / 9)
    # two-sided binomial, 5 of 7: 2 * (C(7,5) + C(7,6) + C(7,7)) / 2^7 = 2 * 29 / 128
    assert s.sign_test_p == pytest.approx(58 / 128)
    point = {"win": s.win, "tie": s.tie, "lose": s.lose, "net_win": s.net_win}
    for name, (low, high) in s.ci.items():
        assert low <= point[name] <= high, name
    assert s.ci["win"][0] < s.ci["win"][1]  # three different prompts: the CI has width
    assert comparison_summary(OUTCOMES, PROMPT_OF, seed=0) == s  # seeded: reproducible
    assert s.to_dict()["ci"]["net_win"] == s.ci["net_win"]


def test_ci_collapses_when_every_prompt_has_the_same_outcomes():
    # every prompt: 2 wins, 1 tie, 1 loss -> every resample of prompts gives 1/2, 1/4, 1/4
    outcomes = {f"q{p}-{k}": v for p in range(5) for k, v in enumerate(("a", "a", "tie", "b"))}
    s = comparison_summary(outcomes, {pair: pair.split("-")[0] for pair in outcomes}, n_boot=200)
    assert s.ci == {"win": (0.5, 0.5), "tie": (0.25, 0.25), "lose": (0.25, 0.25), "net_win": (0.25, 0.25)}


def test_a_single_prompt_has_no_bootstrap_ci():
    s = comparison_summary({"x": "a", "y": "b"}, {"x": "q", "y": "q"})
    assert (s.win, s.lose, s.n_prompts) == (0.5, 0.5, 1)
    assert set(s.ci.values()) == {None}


def test_cluster_bootstrap_is_wider_than_a_pair_bootstrap_when_prompts_correlate():
    # 20 prompts x 10 seeds; the outcome is the prompt's (even prompts: A wins every seed, odd: B does),
    # so there are 20 independent observations, not 200.
    outcomes = {f"q{p}-s{k}": ("a" if p % 2 == 0 else "b") for p in range(20) for k in range(10)}
    by_prompt = {pair: pair.split("-")[0] for pair in outcomes}
    by_pair = {pair: pair for pair in outcomes}  # each pair its own cluster: the naive bootstrap
    cluster = comparison_summary(outcomes, by_prompt, n_boot=1000)
    naive = comparison_summary(outcomes, by_pair, n_boot=1000)
    assert cluster.win == naive.win == 0.5
    width = {name: s.ci["win"][1] - s.ci["win"][0] for name, s in (("cluster", cluster), ("naive", naive))}
    # binomial sd of a share of 1/2: sqrt(1/4 / 20) = 0.11 vs sqrt(1/4 / 200) = 0.035, ~3x wider
    assert width["cluster"] > 2 * width["naive"]


def test_sign_test_on_decisive_pairs_only():
    # 9 wins, 1 loss, 4 ties: two-sided binomial p = 2 * (C(10,9) + C(10,10)) / 2^10 = 22 / 1024
    outcomes = {f"w{i}": "a" for i in range(9)} | {"l0": "b"} | {f"t{i}": "tie" for i in range(4)}
    s = comparison_summary(outcomes, {pair: pair for pair in outcomes}, n_boot=100)
    assert (s.n_decisive, s.sign_test_p) == (10, 0.021484375)
    all_ties = comparison_summary({"t0": "tie", "t1": "tie"}, {"t0": "q0", "t1": "q1"}, n_boot=100)
    assert (all_ties.n_decisive, all_ties.sign_test_p, all_ties.net_win) == (0, 1.0, 0.0)


def test_position_bias_left_share_and_binomial_p():
    # u1: 5 left, 1 right, 2 ties; u2: 3 left, 1 right, 1 tie -> 8 left of 10 decisive
    sides = [("u1", "left")] * 5 + [("u1", "right")] + [("u1", "tie")] * 2
    sides += [("u2", "left")] * 3 + [("u2", "right"), ("u2", "tie")]
    bias = position_bias(sides)
    assert (bias.n_decisive, bias.left_share) == (10, 0.8)
    # 2 * (C(10,8) + C(10,9) + C(10,10)) / 2^10 = 2 * 56 / 1024
    assert bias.p_value == pytest.approx(0.109375)
    assert bias.per_annotator == {"u1": (6, 5), "u2": (4, 3)}
    assert position_bias([("u1", "tie"), ("u2", "both")]) == PositionBias(0, None, 1.0, {})  # ties only


def test_repeat_consistency_per_annotator_with_sides_swapped():
    # o1 shows A left, its repeat r1 shows A right (and likewise o2: B left, r2: B right).
    left = {"o1": "a", "r1": "b", "o2": "b", "r2": "a"}
    clicks = [
        ("o1", "x", "left"), ("r1", "x", "right"),  # x: A both times -> consistent
        ("o2", "x", "right"), ("r2", "x", "tie"),  # x: A then tie -> inconsistent
        ("o1", "lefty", "left"), ("r1", "lefty", "left"),  # lefty: A then B -> inconsistent (a side habit)
        ("o2", "lefty", "left"),  # lefty saw no r2: not counted
        ("r2", "z", "left"),  # z never saw o2: not counted
    ]
    votes = [(pair, who, to_vote(side, left[pair])) for pair, who, side in clicks]
    c = repeat_consistency(votes, {"r1": "o1", "r2": "o2"})
    assert (c.n, c.consistent) == (3, 1)
    assert c.rate == pytest.approx(1 / 3)
    assert c.per_annotator == {"lefty": (1, 0), "x": (2, 1)}
    assert repeat_consistency(votes, {}).rate is None


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: to_vote("up", "a"), "side 'up'"),
        (lambda: to_vote("left", "c"), "left must be"),
        (lambda: plurality(0, 0, 0), "zero votes"),
        (lambda: plurality(-1, 2, 0), "n_a must be >= 0"),
        (lambda: margin_rule(3, 1, margin=0), "margin must be >= 1"),
        (lambda: pair_outcomes([("p", "u", "A")]), "vote 'A'"),
        (lambda: pair_outcomes([("p", "u", "a"), ("p", "u", "b")]), "voted twice"),
        (lambda: pair_outcomes([("p", "u", "a")], rule="mean"), "rule must be"),
        (lambda: comparison_summary({}, {}), "no pairs"),
        (lambda: comparison_summary({"p": "win"}, {"p": "q"}), "vote 'win'"),
        (lambda: comparison_summary({"p": "a"}, {}), "no prompt"),
        (lambda: position_bias([]), "no votes"),
        (lambda: position_bias([("u", None)]), "side None"),
        (lambda: repeat_consistency([("p", "u", "x")], {}), "vote 'x'"),
    ],
)
def test_bad_input_raises_a_clear_error(call, message):
    with pytest.raises(ABStatsError, match=message) as error:
        call()
    assert isinstance(error.value, AnnotationError) and isinstance(error.value, ValueError)
