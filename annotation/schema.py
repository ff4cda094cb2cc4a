"""Columns of the tables the annotation rounds write, named once (pool columns come from pipeline.schema).

    WORK/<round>/annotations.parquet   ANNOTATIONS_SCHEMA: one row per Label Studio annotation, kept or
                                       excluded (with ``exclusion_reason``): nothing is silently lost
    WORK/<round>/decisions.parquet     DECISIONS_SCHEMA: one row per pool id of the round
    WORK/<round>/summary.json          counts, shortfall against the target, agreement, gold accuracy
    WORK/<round>/pool/shard-*.parquet  the next round's pool (pool columns, kept rows only)
    WORK/curated/                      curated.parquet + images/ + metadata.jsonl (imagefolder)
    RUN/ab/<criterion>/pairs.parquet   PAIRS_SCHEMA: the A/B pairs of one criterion
    RUN/ab/<criterion>/votes.parquet   VOTES_SCHEMA: every annotation of its projects, kept or excluded
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

# -- human A/B rounds of the evaluation stage (annotation/abtest.py; issue 10) ----------------------------
# RUN/ab/<criterion>/pairs.parquet: PAIRS_SCHEMA, one row per pair shown; votes.parquet: VOTES_SCHEMA, one row
# per Label Studio annotation of the criterion's projects (skipped and superseded ones too, with a reason).
PAIR_ID = "pair_id"  # 16 hex of a hash: names the pair without revealing sides or checkpoints
KIND = "kind"  # "comparison", "gold" (one side damaged: a known answer) or "repeat" (sides swapped)
PAIR_KINDS = ("comparison", "gold", "repeat")
CHECKPOINT_A = "checkpoint_a"  # the candidate (e.g. the quality-tuned model): "win" means A wins
CHECKPOINT_B = "checkpoint_b"  # the baseline
IMAGE_A = "image_a"  # absolute paths
IMAGE_B = "image_b"
LEFT = "left"  # "a" | "b": which image is shown on the left; a seeded coin flip, never in the task
REPEAT_OF = "repeat_of"  # on repeats: the pair_id of the comparison pair shown again with sides swapped
# The generation manifest's names (model/evaluation/schema.py), repeated here so that annotation/ does not
# import the model package for five strings.
PROMPT_ID, PROMPT, CATEGORY, SEED = "prompt_id", "prompt", "category", "seed"

PAIRS_SCHEMA = pa.schema(
    [
        pa.field(PAIR_ID, pa.string(), nullable=False),
        pa.field(KIND, pa.string(), nullable=False),
        pa.field(PROMPT_ID, pa.string(), nullable=False),
        pa.field(PROMPT, pa.string(), nullable=False),
        pa.field(CATEGORY, pa.string(), nullable=False),
        pa.field(SEED, pa.int64(), nullable=False),
        pa.field(CHECKPOINT_A, pa.string(), nullable=False),
        pa.field(CHECKPOINT_B, pa.string(), nullable=False),
        pa.field(IMAGE_A, pa.string(), nullable=False),
        pa.field(IMAGE_B, pa.string(), nullable=False),
        pa.field(LEFT, pa.string(), nullable=False),
        pa.field(GOLD_ANSWER, pa.string()),  # gold pairs: the undamaged (or matching) side, "a" | "b"
        pa.field(REPEAT_OF, pa.string()),
    ]
)

RAW_CHOICE = "raw_choice"  # the Label Studio choice value ("Left", "Tie", "A", "Both", ...)
SIDE = "side"  # "left" | "right" | "tie": the choice in screen terms
VOTE = "vote"  # "a" | "b" | "tie": the choice in checkpoint terms

VOTES_SCHEMA = pa.schema(
    [
        pa.field(PAIR_ID, pa.string(), nullable=False),
        pa.field(KIND, pa.string()),  # null on a task whose pair is not in pairs.parquet
        pa.field(PROMPT_ID, pa.string()),
        pa.field(ANNOTATOR, pa.string(), nullable=False),
        pa.field(RAW_CHOICE, pa.string()),
        pa.field(SIDE, pa.string()),
        pa.field(VOTE, pa.string()),
        pa.field(TASK_ID, pa.int64(), nullable=False),
        pa.field(PROJECT_ID, pa.int64(), nullable=False),
        pa.field(ANNOTATION_ID, pa.int64(), nullable=False),
        pa.field(LEAD_TIME, pa.float64()),
        # null when it counts; skipped, superseded, missing_fields:..., task_without_pair_id,
        # pair_not_in_pairs_table, annotator_failed_gold
        pa.field(EXCLUSION_REASON, pa.string()),
    ]
)
