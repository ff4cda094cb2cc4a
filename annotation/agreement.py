"""Inter-annotator agreement and gold (honeypot) accuracy: pure functions of the decisions made.

Label Studio's community edition computes none of this, so we do, from the annotations table:
percent agreement and Fleiss' kappa for the round, Cohen's kappa and percent agreement for each pair of
annotators, and each annotator's accuracy on the gold tasks (the kappas come from statsmodels).
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping

import numpy as np
from statsmodels.stats.inter_rater import aggregate_raters, cohens_kappa, fleiss_kappa, to_table

#: (item, annotator, label) for one valid decision
Vote = tuple[str, str, str]


@dataclass(frozen=True)
class PairAgreement:
    annotator_a: str
    annotator_b: str
    n_items: int
    percent_agreement: float
    cohen_kappa: float | None  # None when undefined (both gave one and the same label throughout)


@dataclass(frozen=True)
class RoundAgreement:
    n_items: int  # items with at least two votes
    percent_agreement: float | None  # mean over items of the share of agreeing rater pairs
    fleiss_kappa: float | None
    fleiss_n_items: int  # Fleiss needs the same number of raters per item: items with the modal count
    pairs: tuple[PairAgreement, ...]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GoldAccuracy:
    annotator: str
    n_gold: int
    n_correct: int
    accuracy: float
    flagged: bool  # accuracy below the round's min_gold_accuracy


def _finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def _by_item(votes: Iterable[Vote]) -> dict[str, dict[str, str]]:
    items: dict[str, dict[str, str]] = defaultdict(dict)
    for item, annotator, label in votes:
        items[item][annotator] = label
    return items


def percent_agreement(labels: list[str]) -> float:
    """Share of the pairs of raters of one item that gave the same label."""
    pairs = list(itertools.combinations(labels, 2))
    return sum(a == b for a, b in pairs) / len(pairs)


def round_agreement(votes: Iterable[Vote], categories: Iterable[str]) -> RoundAgreement:
    items = {k: v for k, v in _by_item(votes).items() if len(v) >= 2}
    categories = list(categories)
    if not items:
        return RoundAgreement(0, None, None, 0, ())
    overall = float(np.mean([percent_agreement(list(v.values())) for v in items.values()]))

    counts = defaultdict(int)
    for v in items.values():
        counts[len(v)] += 1
    modal = max(counts, key=lambda n: (counts[n], n))
    code = {c: i for i, c in enumerate(categories)}
    rows = [[code[label] for label in v.values()] for v in items.values() if len(v) == modal]
    table, _ = aggregate_raters(np.array(rows), n_cat=len(categories))
    # A kappa is 0/0 when every vote is the same label: reported as None rather than warned about.
    with np.errstate(invalid="ignore", divide="ignore"):
        fleiss = _finite(fleiss_kappa(table, method="fleiss"))

    pairs = []
    annotators = sorted({a for v in items.values() for a in v})
    for a, b in itertools.combinations(annotators, 2):
        shared = [(v[a], v[b]) for v in items.values() if a in v and b in v]
        if not shared:
            continue
        agree = sum(x == y for x, y in shared) / len(shared)
        confusion, _ = to_table(np.array([[code[x], code[y]] for x, y in shared]), bins=len(categories))
        with np.errstate(invalid="ignore", divide="ignore"):
            kappa = _finite(cohens_kappa(confusion, return_results=False))
        pairs.append(PairAgreement(a, b, len(shared), agree, kappa))
    return RoundAgreement(len(items), overall, fleiss, len(rows), tuple(pairs))


def gold_accuracy(
    votes: Iterable[Vote], gold_answers: Mapping[str, str], min_accuracy: float
) -> dict[str, GoldAccuracy]:
    """Each annotator's accuracy on the gold items they answered; flagged below ``min_accuracy``."""
    answered: dict[str, list[bool]] = defaultdict(list)
    for item, annotator, label in votes:
        if item in gold_answers:
            answered[annotator].append(label == gold_answers[item])
    result = {}
    for annotator, marks in sorted(answered.items()):
        accuracy = sum(marks) / len(marks)
        result[annotator] = GoldAccuracy(annotator, len(marks), sum(marks), accuracy, accuracy < min_accuracy)
    return result
