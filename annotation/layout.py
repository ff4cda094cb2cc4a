"""Where the annotation rounds write (one work directory per curation campaign):

    WORK/<round>/push-quarantine.parquet  pool rows that could not become tasks (no image), with a reason
    WORK/<round>/annotations.parquet      every annotation pulled from Label Studio (annotation.schema)
    WORK/<round>/decisions.parquet        one decision per pool id
    WORK/<round>/summary.json             counts, shortfall, agreement, gold accuracy
    WORK/<round>/pool/shard-00000.parquet the next round's pool (the specialist round's is the curated set)
    WORK/curated/                         curated.parquet, images/, metadata.jsonl (imagefolder)
    WORK/active/                          what the rounds' votes taught (ActiveLayout: annotation/active.py)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.layout import shard_name


@dataclass(frozen=True)
class RoundLayout:
    work: Path
    round_name: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "work", Path(self.work))

    @property
    def root(self) -> Path:
        return self.work / self.round_name

    @property
    def push_quarantine(self) -> Path:
        return self.root / "push-quarantine.parquet"

    @property
    def annotations(self) -> Path:
        return self.root / "annotations.parquet"

    @property
    def decisions(self) -> Path:
        return self.root / "decisions.parquet"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def next_pool(self) -> Path:
        return self.root / "pool"

    @property
    def next_pool_shard(self) -> Path:
        return self.next_pool / shard_name(0)


def curated_dir(work: Path) -> Path:
    return Path(work) / "curated"


@dataclass(frozen=True)
class ActiveLayout:
    """What active learning (annotation/active.py) writes in a campaign's work directory:

        WORK/active/heads.json                  per round: the head's weights, Platt map and held-out report
        WORK/active/ranking.parquet             every scored row by keep-probability (id, keep_probability,
                                                p_<round>, annotated, passed_filters, drop_reason, rank)
        WORK/active/proposals.json              proposed threshold changes (shown in the report, never applied)
        WORK/active/summary.json                the features used, each round's figures, the proposals
        WORK/active/imagenet-features.parquet   cached MobileNetV2 features (when those are the features)
    """

    work: Path

    @property
    def root(self) -> Path:
        return Path(self.work) / "active"

    @property
    def heads(self) -> Path:
        return self.root / "heads.json"

    @property
    def ranking(self) -> Path:
        return self.root / "ranking.parquet"

    @property
    def proposals(self) -> Path:
        return self.root / "proposals.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def imagenet_features(self) -> Path:
        return self.root / "imagenet-features.parquet"


@dataclass(frozen=True)
class ABLayout:
    """Where one criterion's human A/B round writes (issue 10), ``work`` being RUN/ab:

        RUN/ab/<criterion>/pairs.parquet            the pairs shown (annotation.schema.PAIRS_SCHEMA)
        RUN/ab/<criterion>/pairs-quarantine.parquet manifest rows that could not become a pair, with a reason
        RUN/ab/<criterion>/gold/                    the damaged copies the gold pairs show
        RUN/ab/<criterion>/push-quarantine.parquet  pairs that could not become tasks, with a reason
        RUN/ab/<criterion>/votes.parquet            every annotation pulled (annotation.schema.VOTES_SCHEMA)
        RUN/ab/<criterion>/summary.json             outcomes by both rules, gold, consistency, bias, kappa
        RUN/ab/<criterion>/waiting.json             written by the evaluate flow while the round is open
    """

    work: Path
    criterion: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "work", Path(self.work))

    @property
    def root(self) -> Path:
        return self.work / self.criterion

    @property
    def pairs(self) -> Path:
        return self.root / "pairs.parquet"

    @property
    def pairs_quarantine(self) -> Path:
        return self.root / "pairs-quarantine.parquet"

    @property
    def gold_images(self) -> Path:
        return self.root / "gold"

    @property
    def push_quarantine(self) -> Path:
        return self.root / "push-quarantine.parquet"

    @property
    def votes(self) -> Path:
        return self.root / "votes.parquet"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def waiting(self) -> Path:
        return self.root / "waiting.json"
