"""Which images, scores and votes made a checkpoint: one DuckDB query from a checkpoint to its sources.

    checkpoint/needles_lineage.json   the curated set (path, id) and the training config (path, hash),
                                      written by training (model/export.py: write_lineage)
    -> curated set                    WORK/curated/curated.parquet: the images, their captions
    -> scores, drop reasons           RUN/score/shard-*.parquet, RUN/select/selection.parquet
    -> each round's decision, votes   WORK/<round>/decisions.parquet, WORK/<round>/annotations.parquet
       and annotators
    -> the source row                 RUN/ingest/shard-*.parquet: source (folder, Parquet file, tar) + key

The curate flow's layout places WORK = RUN/annotation and the curated set in WORK/curated, so a
checkpoint's record is enough; other layouts pass ``work`` and ``run``. ``lineage_sql`` is the query
(one row per curated image x round x vote), printable for use with DuckDB alone.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

from annotation.layout import RoundLayout
from annotation.rounds import ROUNDS
from pipeline.errors import UserError
from pipeline.layout import RunLayout

#: beside the weights of a quality-tuned checkpoint: which curated set and which config made it
LINEAGE_FILE = "needles_lineage.json"


class LineageError(UserError):
    """A checkpoint without a lineage record, or a record whose files are gone."""


@dataclass(frozen=True)
class LineageSources:
    checkpoint: Path
    record: dict
    curated: Path  # the curated set's folder (curated.parquet)
    work: Path  # the rounds' work directory
    run: Path  # the pipeline run
    rounds: tuple[str, ...]  # the finished rounds found in work

    @property
    def curated_table(self) -> Path:
        return self.curated / "curated.parquet"


def read_record(checkpoint: Path) -> dict:
    path = Path(checkpoint) / LINEAGE_FILE
    if not path.is_file():
        raise LineageError(f"{checkpoint} has no {LINEAGE_FILE}: it was not trained by needles' train-qt since lineage "
                           f"is recorded (retrain, or pass --curated to name its curated set)")
    try:
        record = json.loads(path.read_text())
        record["curated_set"], record["curated_set_id"]
    except (ValueError, KeyError, TypeError) as error:
        raise LineageError(f"{path} is not a lineage record: {type(error).__name__}: {error}") from None
    return record


def locate(checkpoint: Path, curated: Path | None = None, work: Path | None = None, run: Path | None = None
           ) -> LineageSources:
    """The folders a checkpoint's lineage reads: from its record and the curate flow's layout unless given."""
    checkpoint = Path(checkpoint)
    record = read_record(checkpoint) if curated is None else {"curated_set": str(curated), "curated_set_id": None}
    curated = Path(record["curated_set"])
    if not (curated / "curated.parquet").is_file():
        raise LineageError(f"curated set {curated} has no curated.parquet (moved or deleted since training?); "
                           f"pass --curated")
    work = Path(work) if work else curated.parent
    run = Path(run) if run else work.parent
    rounds = tuple(r for r in ROUNDS if RoundLayout(work, r).annotations.is_file() and RoundLayout(work, r).decisions.is_file())
    if not rounds:
        raise LineageError(f"no round with annotations and decisions under {work}: pass --work (the rounds' work directory)")
    layout = RunLayout(run)
    if not (layout.selection.is_file() and layout.ingest_shards() and layout.score_shards()):
        raise LineageError(f"{run} is not a pipeline run (ingest, score and select): pass --run")
    return LineageSources(checkpoint, record, curated, work, run, rounds)


def _quote(path: Path | str) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def lineage_sql(src: LineageSources) -> str:
    """The query: one row per curated image x round x vote (gold tasks aside), with the checkpoint's
    record, the image's source row, its scores and filter verdict, each round's decision and each vote."""
    layout = RunLayout(src.run)
    votes = "\n    UNION ALL BY NAME\n    ".join(
        f"SELECT '{r}' AS round, id, annotator, decision, exclusion_reason, task_id, project_id, annotation_id, "
        f"lead_time, created_at FROM {_quote(RoundLayout(src.work, r).annotations)} WHERE NOT is_gold"
        for r in src.rounds)
    decisions = "\n    UNION ALL BY NAME\n    ".join(
        f"SELECT '{r}' AS round, id, keep AS round_keep, reason AS round_reason, n_votes, n_positive "
        f"FROM {_quote(RoundLayout(src.work, r).decisions)}" for r in src.rounds)
    record = src.record
    return f"""WITH checkpoint AS (
    SELECT {_quote(src.checkpoint.resolve())} AS checkpoint, {_quote(record.get('curated_set_id') or '')} AS curated_set_id,
           {_quote(record.get('config_hash') or '')} AS config_hash
), curated AS (
    SELECT id, file_name, caption FROM {_quote(src.curated_table)}
), sources AS (
    SELECT id, source, source_key FROM read_parquet({_quote(layout.ingest / 'shard-*.parquet')})
), scores AS (
    SELECT * FROM read_parquet({_quote(layout.score / 'shard-*.parquet')}, union_by_name = true)
), selection AS (
    SELECT id, keep AS passed_filters, drop_reason, drop_reasons FROM {_quote(layout.selection)}
), decisions AS (
    {decisions}
), votes AS (
    {votes}
)
SELECT checkpoint.*, curated.id, curated.file_name, curated.caption, sources.source, sources.source_key,
       selection.passed_filters, selection.drop_reason, selection.drop_reasons, scores.* EXCLUDE (id),
       decisions.round, decisions.round_keep, decisions.round_reason, decisions.n_votes, decisions.n_positive,
       votes.annotator, votes.decision, votes.exclusion_reason, votes.task_id, votes.project_id,
       votes.annotation_id, votes.lead_time, votes.created_at
FROM curated CROSS JOIN checkpoint
LEFT JOIN sources USING (id)
LEFT JOIN selection USING (id)
LEFT JOIN scores USING (id)
LEFT JOIN decisions USING (id)
LEFT JOIN votes ON votes.id = curated.id AND votes.round = decisions.round
ORDER BY curated.id, decisions.round, votes.annotator, votes.annotation_id"""


def source_present(source: str | None, key: str | None) -> bool:
    """Whether a source row's file is still there: the image file of a folder source, else the Parquet
    file or tar shard that holds the row."""
    if source is None:
        return False
    path = Path(source)
    return (path / key).is_file() if path.is_dir() and key is not None else path.is_file()


def lineage(checkpoint: Path, curated: Path | None = None, work: Path | None = None, run: Path | None = None
            ) -> tuple[pa.Table, dict]:
    """The lineage table of a checkpoint and a summary: every curated image, whether it traces back to a
    source row (and its file is present), its scores, each round's votes and annotators."""
    src = locate(checkpoint, curated, work, run)
    table = duckdb.sql(lineage_sql(src)).arrow().read_all()
    con = duckdb.connect()
    con.register("lineage", table)
    images = con.execute("SELECT count(DISTINCT id) FROM lineage").fetchone()[0]
    per_image = con.execute("SELECT DISTINCT id, source, source_key FROM lineage").fetchall()
    traced = sum(source is not None for _, source, _ in per_image)
    present = sum(source_present(source, key) for _, source, key in per_image)
    rounds = {}
    for name in src.rounds:
        n_images, n_votes, annotators = con.execute(
            "SELECT count(DISTINCT id) FILTER (WHERE annotator IS NOT NULL), count(annotator), "
            "list(DISTINCT annotator ORDER BY annotator) FILTER (WHERE annotator IS NOT NULL) "
            "FROM lineage WHERE round = ?", [name]).fetchone()
        rounds[name] = {"images_with_votes": n_images, "votes": n_votes, "annotators": annotators or []}
    record_id = src.record.get("curated_set_id")
    summary = {
        "checkpoint": str(src.checkpoint), "curated_set": str(src.curated), "curated_set_id": record_id,
        # the images the checkpoint was tuned on are the ones read now (else the set was rewritten since)
        "curated_set_unchanged": None if record_id is None else record_id == curated_set_id(src.curated),
        "config_hash": src.record.get("config_hash"), "work": str(src.work), "run": str(src.run),
        "images": images, "traced_to_source_row": traced, "source_file_present": present,
        "with_scores": con.execute("SELECT count(DISTINCT id) FROM lineage WHERE passed_filters IS NOT NULL").fetchone()[0],
        "rounds": rounds, "rows": table.num_rows,
    }
    return table, summary


def curated_set_id(curated: Path) -> str:
    """16 hex of the sha256 of a curated set's sorted image ids (curated.parquet, as annotation/export.py
    writes it), else of its metadata.jsonl: the same images give the same id."""
    curated = Path(curated)
    if (curated / "curated.parquet").is_file():
        ids = sorted(duckdb.sql(f"SELECT id FROM {_quote(curated / 'curated.parquet')}").fetchnumpy()["id"].tolist())
        content = "\n".join(ids).encode()
    else:
        content = (curated / "metadata.jsonl").read_bytes()
    return hashlib.sha256(content).hexdigest()[:16]
