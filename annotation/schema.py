"""Columns of the tables the annotation rounds write, named once (pool columns come from pipeline.schema).

    WORK/<round>/annotations.parquet   ANNOTATIONS_SCHEMA: one row per Label Studio annotation, kept or
                                       excluded (with ``exclusion_reason``): nothing is silently lost
    WORK/<round>/decisions.parquet     DECISIONS_SCHEMA: one row per pool id of the round
    WORK/<round>/summary.json          counts, shortfall against the target, agreement, gold accuracy
    WORK/<round>/pool/shard-*.parquet  the next round's pool (pool columns, kept rows only)
    WORK/curated/                      curated.parquet + images/ + metadata.jsonl (imagefolder)
"""

from __future__ import annotations

import pyarrow as pa

from pipeline.schema import CAPTION, ID

TASK_ID = "task_id"
PROJECT_ID = "project_id"
ANNOTATION_ID = "annotation_id"
ANNOTATOR = "annotator"  # the Label Studio user's email
ANSWERS = "answers"  # JSON object {question: value}, as read from the round's label config
DECISION = "decision"  # the round's decision answer ("keep"/"reject", "select"/"reject")
LEAD_TIME = "lead_time"  # seconds the annotator spent on the task (Label Studio's lead_time)
CREATED_AT = "created_at"
IS_GOLD = "is_gold"  # a honeypot task with a known answer
GOLD_ANSWER = "gold_answer"  # in the gold table: the expected decision
GOLD_CORRECT = "gold_correct"  # on gold tasks: the decision matched the gold answer (null elsewhere)
EXCLUSION_REASON = "exclusion_reason"  # null when the annotation counts

ANNOTATIONS_SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(TASK_ID, pa.int64(), nullable=False),
        pa.field(PROJECT_ID, pa.int64(), nullable=False),
        pa.field(ANNOTATION_ID, pa.int64(), nullable=False),
        pa.field(ANNOTATOR, pa.string(), nullable=False),
        pa.field(ANSWERS, pa.string(), nullable=False),
        pa.field(DECISION, pa.string()),
        pa.field(LEAD_TIME, pa.float64()),
        pa.field(CREATED_AT, pa.string()),
        pa.field(IS_GOLD, pa.bool_(), nullable=False),
        pa.field(GOLD_CORRECT, pa.bool_()),
        pa.field(EXCLUSION_REASON, pa.string()),
    ]
)

N_VOTES = "n_votes"
N_POSITIVE = "n_positive"
KEEP = "keep"
RANK_SCORE = "rank_score"  # mean of the round's rank_fields over its annotators (null without them)
REASON = "reason"  # why a row is not kept: consensus_reject, no_valid_annotations, over_target, no_caption
SOURCE_CAPTION = "source_caption"  # the pool caption a specialist caption replaced

DECISIONS_SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(N_VOTES, pa.int32(), nullable=False),
        pa.field(N_POSITIVE, pa.int32(), nullable=False),
        pa.field(KEEP, pa.bool_(), nullable=False),
        pa.field(RANK_SCORE, pa.float64()),
        pa.field(CAPTION, pa.string()),  # the caption the next round or the curated set carries
        pa.field(REASON, pa.string()),
    ]
)
