"""Column names of the evaluation stage's tables, named once (issue 10's shared interfaces).

PROMPTS (``load_prompts``): prompt_id, prompt, category.
MANIFEST (``RUN/generate/manifest.parquet``, one row per generated image): the prompt columns, seed,
checkpoint (the label, e.g. "base", "tuned"), checkpoint_path, image_path (RELATIVE to RUN/generate),
height, width, num_inference_steps, guidance_scale. Every checkpoint has the same (prompt_id, seed) set.
JUDGES (``RUN/judges/judges.parquet``): the manifest's key columns plus the pipeline's own per-image scores
(named as in pipeline/schema.py); a judge that was skipped leaves its column null (summary.json says why).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from model.evaluation.errors import EvaluationError
from model.evaluation.layout import MANIFEST_FILE
from pipeline import schema as pipeline_schema

PROMPT_ID = "prompt_id"  # "<source>-<sha256 of the prompt text>[:10]": stable across runs of one source
PROMPT = "prompt"
CATEGORY = "category"
UNCATEGORIZED = "uncategorized"  # the category of prompts from a file without a category column
SEED = "seed"
CHECKPOINT = "checkpoint"  # the label
CHECKPOINT_PATH = "checkpoint_path"
IMAGE_PATH = "image_path"
HEIGHT = "height"
WIDTH = "width"
NUM_INFERENCE_STEPS = "num_inference_steps"
GUIDANCE_SCALE = "guidance_scale"

PROMPTS_SCHEMA = pa.schema([
    pa.field(PROMPT_ID, pa.string(), nullable=False),
    pa.field(PROMPT, pa.string(), nullable=False),
    pa.field(CATEGORY, pa.string(), nullable=False),
])

MANIFEST_SCHEMA = pa.schema([
    *PROMPTS_SCHEMA,
    pa.field(SEED, pa.int64(), nullable=False),
    pa.field(CHECKPOINT, pa.string(), nullable=False),
    pa.field(CHECKPOINT_PATH, pa.string(), nullable=False),
    pa.field(IMAGE_PATH, pa.string(), nullable=False),
    pa.field(HEIGHT, pa.int32(), nullable=False),
    pa.field(WIDTH, pa.int32(), nullable=False),
    pa.field(NUM_INFERENCE_STEPS, pa.int32(), nullable=False),
    pa.field(GUIDANCE_SCALE, pa.float32(), nullable=False),
])

#: the manifest columns judges.parquet repeats, so it joins back on (checkpoint, prompt_id, seed)
JUDGES_KEYS = (CHECKPOINT, PROMPT_ID, SEED, CATEGORY, PROMPT, IMAGE_PATH)
SHARPNESS = pipeline_schema.SHARPNESS
CONTRAST = pipeline_schema.CONTRAST
OCR_WORD_COUNT = pipeline_schema.OCR_WORD_COUNT
OCR_TEXT_AREA = pipeline_schema.OCR_TEXT_AREA
CLIP_SCORE = pipeline_schema.CLIP_SCORE
AESTHETIC_SCORE = pipeline_schema.AESTHETIC_SCORE
#: every per-image score, in the order the judges run
JUDGE_SCORES = (SHARPNESS, CONTRAST, OCR_WORD_COUNT, OCR_TEXT_AREA, CLIP_SCORE, AESTHETIC_SCORE)
JUDGES_SCHEMA = pa.schema(
    [MANIFEST_SCHEMA.field(name) for name in JUDGES_KEYS]
    + [pa.field(SHARPNESS, pa.float32()), pa.field(CONTRAST, pa.float32()),
       pa.field(OCR_WORD_COUNT, pa.int32()), pa.field(OCR_TEXT_AREA, pa.float32()),
       pa.field(CLIP_SCORE, pa.float32()), pa.field(AESTHETIC_SCORE, pa.float32())]
)


def read_manifest(generate_dir: str | Path) -> pa.Table:
    """RUN/generate/manifest.parquet with ``image_path`` made absolute (it is stored relative to
    ``generate_dir``, so a run folder can be moved)."""
    generate_dir = Path(generate_dir)
    path = generate_dir / MANIFEST_FILE
    if not path.is_file():
        raise EvaluationError(f"{path} does not exist: run `python -m model generate --out {generate_dir}` first")
    table = pq.read_table(path)
    missing = [name for name in MANIFEST_SCHEMA.names if name not in table.column_names]
    if missing:
        raise EvaluationError(f"{path} is not a generation manifest: columns {missing} are missing")
    absolute = [str((generate_dir / p).resolve()) for p in table.column(IMAGE_PATH).to_pylist()]
    return table.select(MANIFEST_SCHEMA.names).set_column(
        MANIFEST_SCHEMA.get_field_index(IMAGE_PATH), MANIFEST_SCHEMA.field(IMAGE_PATH), pa.array(absolute, pa.string()))
