"""Where the annotation rounds write (one work directory per curation campaign):

    WORK/<round>/push-quarantine.parquet  pool rows that could not become tasks (no image), with a reason
    WORK/<round>/annotations.parquet      every annotation pulled from Label Studio (annotation.schema)
    WORK/<round>/decisions.parquet        one decision per pool id
    WORK/<round>/summary.json             counts, shortfall, agreement, gold accuracy
    WORK/<round>/pool/shard-00000.parquet the next round's pool (the specialist round's is the curated set)
    WORK/curated/                         curated.parquet, images/, metadata.jsonl (imagefolder)
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
