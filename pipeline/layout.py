"""Where each stage of a pipeline run reads and writes. One run directory holds every stage:

    RUN/ingest/shard-00000.parquet   INGEST_SCHEMA rows (unique ids)
    RUN/ingest/quarantine.parquet    QUARANTINE_SCHEMA: bad input, with a reason
    RUN/ingest/duplicates.parquet    QUARANTINE_SCHEMA: exact duplicates collapsed onto an earlier id
    RUN/score/shard-00000.parquet    id + score columns, one file per ingest shard (same name)
    RUN/select/selection.parquet     SELECTION_SCHEMA: keep / drop_reason per ingested id
    RUN/pool/shard-00000.parquet     the pool: ingest columns + scores, kept rows only
    RUN/report/index.html            funnel, histograms, contact sheets

The curate flow (flows/curate.py) adds, in the same run directory:

    RUN/annotation/                  the curation rounds' work directory (annotation/layout.py: RoundLayout)
    RUN/train-qt/                    quality-tuning on the curated set (``"train": true``)
    RUN/eval/                        the evaluation of that checkpoint (model/evaluation/layout.py: EvalLayout)

Each stage is a pure function of the files before it, so any stage can be rerun or inspected with
DuckDB alone (``duckdb -c "select * from 'RUN/score/*.parquet'"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def ingest(self) -> Path:
        return self.root / "ingest"

    @property
    def quarantine(self) -> Path:
        return self.ingest / "quarantine.parquet"

    @property
    def duplicates(self) -> Path:
        return self.ingest / "duplicates.parquet"

    @property
    def score(self) -> Path:
        return self.root / "score"

    @property
    def select(self) -> Path:
        return self.root / "select"

    @property
    def selection(self) -> Path:
        return self.select / "selection.parquet"

    @property
    def pool(self) -> Path:
        return self.root / "pool"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def annotation(self) -> Path:
        return self.root / "annotation"

    @property
    def train_qt(self) -> Path:
        return self.root / "train-qt"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def ingest_shards(self) -> list[Path]:
        return sorted(self.ingest.glob("shard-*.parquet"))

    def score_shards(self) -> list[Path]:
        return sorted(self.score.glob("shard-*.parquet"))

    def pool_shards(self) -> list[Path]:
        return sorted(self.pool.glob("shard-*.parquet"))


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"
