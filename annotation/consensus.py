"""From valid annotations to one decision per pool image: pure functions, no I/O.

The round's consensus rule decides keep/reject per image (recall for the generalist round, precision
for the specialist round). When more images pass than the round's target, the best ``target_size`` stay,
ranked by the specialists' mean rating, then the share of annotators who kept the image, then the
automatic aesthetic score; the rest get the reason ``over_target``. When fewer pass, the shortfall is
reported, never padded.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Mapping

import pyarrow as pa

from annotation import schema as S
from annotation.rounds import Round
from pipeline.schema import CAPTION, ID


@dataclass
class Decisions:
    table: pa.Table  # DECISIONS_SCHEMA
    kept: int
    target: int
    passed_consensus: int
    not_kept_by_reason: dict[str, int] = field(default_factory=dict)

    @property
    def shortfall(self) -> int:
        """How many images short of the target the round is (0 when it met it)."""
        return max(self.target - self.kept, 0)


def _best_caption(candidates: list[tuple[str, str]], trust: Mapping[str, float]) -> str | None:
    """Of several specialists' captions, the one by the annotator most accurate on gold, then the
    most detailed (longest); ties broken by the text so the choice is deterministic."""
    if not candidates:
        return None
    return max(candidates, key=lambda c: (trust.get(c[0], 0.0), len(c[1]), c[1]))[1]


def decide(
    annotations: pa.Table,
    pool_ids: list[str],
    round_: Round,
    aesthetic: Mapping[str, float] | None = None,
    trust: Mapping[str, float] | None = None,
) -> Decisions:
    """One DECISIONS_SCHEMA row per id of ``pool_ids``.

    ``annotations``: the round's annotations table; only rows without an exclusion reason and not on
    gold tasks vote. ``aesthetic``: pool id -> automatic aesthetic score (rank tie-break).
    ``trust``: annotator -> gold accuracy (chooses between captions).
    """
    aesthetic = aesthetic or {}
    trust = trust or {}
    votes: dict[str, list[dict]] = defaultdict(list)
    for row in annotations.to_pylist():
        if row[S.EXCLUSION_REASON] is None and not row[S.IS_GOLD]:
            votes[row[ID]].append(row)

    rows = []
    for pool_id in pool_ids:
        cast = votes.get(pool_id, [])
        answers = [json.loads(r[S.ANSWERS]) for r in cast]
        positive = [
            (r[S.ANNOTATOR], a) for r, a in zip(cast, answers) if a.get(round_.decision_field) == round_.positive_value
        ]
        ratings = [
            sum(a[f] for f in round_.rank_fields) / len(round_.rank_fields)
            for a in answers
            if round_.rank_fields and all(f in a for f in round_.rank_fields)
        ]
        keep = round_.consensus.keeps(len(positive), len(cast))
        reason = None if keep else ("no_valid_annotations" if not cast else "consensus_reject")
        caption = None
        if round_.caption_field:
            caption = _best_caption(
                [(who, a[round_.caption_field]) for who, a in positive if a.get(round_.caption_field)], trust
            )
            if keep and caption is None:
                keep, reason = False, "no_caption"
        rows.append(
            {
                ID: pool_id,
                S.N_VOTES: len(cast),
                S.N_POSITIVE: len(positive),
                S.KEEP: keep,
                S.RANK_SCORE: sum(ratings) / len(ratings) if ratings else None,
                CAPTION: caption,
                S.REASON: reason,
            }
        )

    passed = [r for r in rows if r[S.KEEP]]
    if len(passed) > round_.target_size:

        def rank(r: dict) -> tuple:
            score = r[S.RANK_SCORE]
            share = r[S.N_POSITIVE] / r[S.N_VOTES]
            return (
                -(score if score is not None else float("-inf")),
                -share,
                -aesthetic.get(r[ID], float("-inf")),
                r[ID],
            )

        for r in sorted(passed, key=rank)[round_.target_size :]:
            r[S.KEEP], r[S.REASON] = False, "over_target"

    not_kept: dict[str, int] = defaultdict(int)
    for r in rows:
        if not r[S.KEEP]:
            not_kept[r[S.REASON]] += 1
    return Decisions(
        table=pa.Table.from_pylist(rows, schema=S.DECISIONS_SCHEMA),
        kept=sum(r[S.KEEP] for r in rows),
        target=round_.target_size,
        passed_consensus=len(passed),
        not_kept_by_reason=dict(not_kept),
    )
