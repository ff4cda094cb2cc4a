"""A/B human evaluation: from votes to per-pair outcomes and per-comparison figures. Pure functions, no I/O.

Two checkpoints A (the candidate, e.g. quality-tuned) and B (the baseline) are shown side by side; which
one is on the left is a coin flip (PAIRS ``left``), so an annotator's *side* becomes a *vote* for a
checkpoint with :func:`to_vote`. The rules come from three papers:

- Emu §4.1: visual appeal, 5 annotators per pair choosing "A", "B" or "Tie"; text faithfulness, 3
  annotators choosing "A", "B", "Both" or "Neither", where "Both" and "Neither" count as "Tie"; a pair's
  outcome is the annotators' majority (here :func:`plurality`).
- Playground v2.5 §3.1: each pair seen by >= 7 users, and a pair only "wins" for a model when it is
  preferred by at least a 2-vote margin; a 1-vote margin is a tie (:func:`margin_rule`).
- Pixel-space post-training §4.1: visual flaws A/B ("left wins", "tie", "right wins"), >= 5 annotators,
  the majority decision is used (:func:`plurality`).

A comparison is then reported as Emu's win / tie / lose percentages (Emu Tables 2-3), with a cluster
bootstrap CI over prompts (pairs of one prompt share its difficulty, so they are not independent) and a
sign test on the decisive pairs. Fleiss' kappa and gold accuracy take the same vote tuples:
``annotation.agreement.round_agreement(votes, OUTCOMES)`` and ``annotation.agreement.gold_accuracy``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from typing import Iterable, Literal, Mapping

import numpy as np
from scipy.stats import binomtest, bootstrap

from annotation.agreement import Vote
from annotation.rounds import AnnotationError

Outcome = Literal["a", "b", "tie"]
Side = Literal["left", "right", "tie"]
OUTCOMES: tuple[Outcome, ...] = ("a", "b", "tie")
#: Emu §4.1, text faithfulness: "Both" and "Neither" are considered as "Tie".
TIE_CHOICES = ("tie", "both", "neither")


class ABStatsError(AnnotationError, ValueError):
    """Votes, outcomes or arguments the A/B aggregation cannot use, with the reason."""


def _check_outcome(value: str, where: str) -> None:
    if value not in OUTCOMES:
        raise ABStatsError(f"{where}: vote {value!r} is not one of {OUTCOMES}")


def to_vote(side: Side | Literal["both", "neither"], left: Literal["a", "b"]) -> Outcome:
    """The checkpoint an annotator chose, from the side they clicked and which checkpoint was on the left.

    ``side``: "left", "right" or a tie ("tie", or Emu's "both" / "neither", which count as a tie).
    """
    if left not in ("a", "b"):
        raise ABStatsError(f"left must be 'a' or 'b', got {left!r}")
    if side in TIE_CHOICES:
        return "tie"
    if side == "left":
        return left  # type: ignore[return-value]
    if side == "right":
        return "b" if left == "a" else "a"
    raise ABStatsError(f"side {side!r} is not one of ('left', 'right') or a tie {TIE_CHOICES}")


def _check_counts(**counts: int) -> None:
    for name, n in counts.items():
        if n < 0:
            raise ABStatsError(f"{name} must be >= 0, got {n}")


def plurality(n_a: int, n_b: int, n_tie: int) -> Outcome:
    """The outcome with the most votes (Emu §4.1, pixel-space §4.1: majority decision).

    When the top count is shared (a with b, or a or b with the tie votes) there is no clear preference,
    so the pair is a tie. A pair without votes has no outcome: ValueError (callers count it apart).
    """
    _check_counts(n_a=n_a, n_b=n_b, n_tie=n_tie)
    if n_a + n_b + n_tie == 0:
        raise ABStatsError("plurality of zero votes: a pair without a valid vote has no outcome")
    top = max(n_a, n_b, n_tie)
    leaders = [o for o, n in zip(OUTCOMES, (n_a, n_b, n_tie)) if n == top]
    return leaders[0] if len(leaders) == 1 else "tie"


def margin_rule(n_a: int, n_b: int, margin: int = 2) -> Outcome:
    """Playground v2.5 §3.1: a side wins only with at least ``margin`` more votes than the other (a
    1-vote margin is a tie when ``margin`` is 2); tie votes count for neither side."""
    _check_counts(n_a=n_a, n_b=n_b)
    if margin < 1:
        raise ABStatsError(f"margin must be >= 1, got {margin}")
    if n_a - n_b >= margin:
        return "a"
    if n_b - n_a >= margin:
        return "b"
    return "tie"


def _votes_by_pair(votes: Iterable[Vote]) -> dict[str, dict[str, Outcome]]:
    """pair_id -> annotator -> vote; a second vote by the same annotator on the same pair is an error
    (superseded annotations are excluded before aggregation, so one left here would count twice)."""
    by_pair: dict[str, dict[str, Outcome]] = defaultdict(dict)
    for pair_id, annotator, vote in votes:
        _check_outcome(vote, f"pair {pair_id!r}, annotator {annotator!r}")
        if annotator in by_pair[pair_id]:
            raise ABStatsError(f"annotator {annotator!r} voted twice on pair {pair_id!r}")
        by_pair[pair_id][annotator] = vote
    return by_pair


def pair_outcomes(
    votes: Iterable[Vote], rule: Literal["plurality", "margin"] = "plurality", margin: int = 2
) -> dict[str, Outcome]:
    """One outcome per pair that has at least one vote, by :func:`plurality` or :func:`margin_rule`.

    ``votes``: (pair_id, annotator, vote) with vote in checkpoint terms ("a", "b", "tie").
    """
    if rule not in ("plurality", "margin"):
        raise ABStatsError(f"rule must be 'plurality' or 'margin', got {rule!r}")
    outcomes = {}
    for pair_id, by_annotator in _votes_by_pair(votes).items():
        n = Counter(by_annotator.values())
        if rule == "plurality":
            outcomes[pair_id] = plurality(n["a"], n["b"], n["tie"])
        else:
            outcomes[pair_id] = margin_rule(n["a"], n["b"], margin)
    return outcomes


@dataclass(frozen=True)
class ComparisonSummary:
    n_pairs: int
    n_prompts: int
    wins: int  # pairs A won
    ties: int
    losses: int  # pairs B won
    win: float
    tie: float
    lose: float
    net_win: float  # win - lose
    #: "win" / "tie" / "lose" / "net_win" -> (low, high); None with a single prompt (nothing to resample)
    ci: dict[str, tuple[float, float] | None]
    confidence: float
    sign_test_p: float  # two-sided binomial test of wins vs losses against 1/2
    n_decisive: int  # wins + losses

    def to_dict(self) -> dict:
        return asdict(self)


_WIN_TIE_LOSE = {"a": 0, "tie": 1, "b": 2}  # A is the candidate: "a" is a win


def _fractions(counts: np.ndarray) -> np.ndarray:
    """(..., 3) win/tie/lose counts -> (4, ...) win, tie, lose, net_win fractions."""
    f = counts / counts.sum(axis=-1, keepdims=True)
    return np.stack([f[..., 0], f[..., 1], f[..., 2], f[..., 0] - f[..., 2]])


def comparison_summary(
    outcomes: Mapping[str, Outcome],
    prompt_of: Mapping[str, str],
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> ComparisonSummary:
    """Win / tie / lose fractions of A against B over the pairs in ``outcomes`` (Emu Tables 2-3).

    The CI is a percentile cluster bootstrap over prompts: resample the prompts with replacement and
    take all their pairs, because pairs of one prompt (several seeds) share its difficulty and are not
    independent; a pair-level bootstrap would be too narrow. The sign test is a two-sided binomial test
    of wins against losses on the decisive pairs (ties dropped); p = 1 when no pair is decisive.
    """
    if not outcomes:
        raise ABStatsError("comparison_summary of no pairs: there is no outcome to summarise")
    if n_boot < 1 or not 0 < confidence < 1:
        raise ABStatsError(f"need n_boot >= 1 and 0 < confidence < 1, got {n_boot} and {confidence}")
    per_prompt: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(3, dtype=np.int64))
    for pair_id, outcome in outcomes.items():
        _check_outcome(outcome, f"pair {pair_id!r}")
        if pair_id not in prompt_of:
            raise ABStatsError(f"pair {pair_id!r} has no prompt in prompt_of")
        per_prompt[prompt_of[pair_id]][_WIN_TIE_LOSE[outcome]] += 1
    counts = np.array(list(per_prompt.values()))  # prompts x (win, tie, lose)
    wins, ties, losses = (int(n) for n in counts.sum(axis=0))
    point = _fractions(counts.sum(axis=0))
    names = ("win", "tie", "lose", "net_win")

    if len(counts) < 2:
        ci: dict[str, tuple[float, float] | None] = dict.fromkeys(names)
    else:
        # scipy resamples the prompt indices (the clusters); the statistic pools the pairs of the drawn
        # prompts, so every draw keeps a prompt's pairs together.
        result = bootstrap(
            (np.arange(len(counts)),),
            lambda prompts, axis=-1: _fractions(counts[prompts].sum(axis=-2)),
            n_resamples=n_boot,
            confidence_level=confidence,
            method="percentile",
            vectorized=True,
            rng=np.random.default_rng(seed),
        )
        low, high = result.confidence_interval
        ci = {name: (float(lo), float(hi)) for name, lo, hi in zip(names, low, high)}

    n_decisive = wins + losses
    return ComparisonSummary(
        n_pairs=len(outcomes),
        n_prompts=len(counts),
        wins=wins,
        ties=ties,
        losses=losses,
        win=float(point[0]),
        tie=float(point[1]),
        lose=float(point[2]),
        net_win=float(point[3]),
        ci=ci,
        confidence=confidence,
        sign_test_p=float(binomtest(wins, n_decisive).pvalue) if n_decisive else 1.0,
        n_decisive=n_decisive,
    )


@dataclass(frozen=True)
class PositionBias:
    n_decisive: int  # left + right votes
    left_share: float | None  # None when every vote was a tie
    p_value: float  # two-sided binomial test of left vs right against 1/2
    per_annotator: dict[str, tuple[int, int]]  # annotator -> (n_decisive, n_left)

    def to_dict(self) -> dict:
        return asdict(self)


def position_bias(sides: Iterable[tuple[str, Side]]) -> PositionBias:
    """Do annotators prefer a screen side regardless of the image? With sides drawn by a fair coin, left
    and right wins should be equally likely; ``sides``: (annotator, "left" | "right" | tie)."""
    decisive: dict[str, list[bool]] = defaultdict(list)
    n_votes = 0
    for annotator, side in sides:
        n_votes += 1
        if side in ("left", "right"):
            decisive[annotator].append(side == "left")
        elif side not in TIE_CHOICES:
            raise ABStatsError(f"annotator {annotator!r}: side {side!r} is not left, right or a tie {TIE_CHOICES}")
    if not n_votes:
        raise ABStatsError("position_bias of no votes")
    n_left = sum(sum(marks) for marks in decisive.values())
    n_decisive = sum(len(marks) for marks in decisive.values())
    return PositionBias(
        n_decisive=n_decisive,
        left_share=n_left / n_decisive if n_decisive else None,
        p_value=float(binomtest(n_left, n_decisive).pvalue) if n_decisive else 1.0,
        per_annotator={a: (len(m), sum(m)) for a, m in sorted(decisive.items())},
    )


@dataclass(frozen=True)
class Consistency:
    n: int  # (repeat pair, annotator) that also voted on the original pair
    consistent: int  # of those, the same vote in checkpoint terms
    rate: float | None  # None when no annotator saw both a pair and its repeat
    per_annotator: dict[str, tuple[int, int]]  # annotator -> (n, consistent)

    def to_dict(self) -> dict:
        return asdict(self)


def repeat_consistency(votes: Iterable[Vote], repeat_of: Mapping[str, str]) -> Consistency:
    """How often an annotator gives the same vote (in checkpoint terms) on a pair and on its repeat, shown
    with the sides swapped, so a side habit reads as inconsistency.

    ``votes``: (pair_id, annotator, vote) of the originals and the repeats; ``repeat_of``: repeat pair_id
    -> original pair_id. Only annotators who voted on both count.
    """
    by_pair = _votes_by_pair(votes)
    per_annotator: dict[str, list[bool]] = defaultdict(list)
    for repeat, original in repeat_of.items():
        for annotator, vote in by_pair.get(repeat, {}).items():
            if annotator in by_pair.get(original, {}):
                per_annotator[annotator].append(vote == by_pair[original][annotator])
    n = sum(len(marks) for marks in per_annotator.values())
    consistent = sum(sum(marks) for marks in per_annotator.values())
    return Consistency(
        n=n,
        consistent=consistent,
        rate=consistent / n if n else None,
        per_annotator={a: (len(m), sum(m)) for a, m in sorted(per_annotator.items())},
    )
