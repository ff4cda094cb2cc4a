"""Every column of the pipeline's tables, named once.

Tables (all Parquet, sharded, readable with DuckDB alone):

- ingested shards  ``<run>/ingest/shard-*.parquet``      INGEST_SCHEMA, one row per unique image
- quarantine       ``<run>/ingest/quarantine.parquet``   QUARANTINE_SCHEMA, rows that could not be ingested
- duplicates       ``<run>/ingest/duplicates.parquet``   QUARANTINE_SCHEMA, exact duplicates (reason exact_duplicate)
- scored shards    ``<run>/score/shard-*.parquet``       ``id`` + one column per score (scorers' outputs)
- selection        ``<run>/select/selection.parquet``    SELECTION_SCHEMA, one row per ingested id
- pool             ``<run>/pool/shard-*.parquet``        INGEST_SCHEMA + scores, kept rows only

Scores live beside the images, joined on ``id``: a scorer never drops a row, so thresholds can be
re-tuned by re-running selection alone.
"""

from __future__ import annotations

import pyarrow as pa

# --- identity and content -------------------------------------------------------------------
ID = "id"  # sha256 hex of the image bytes: exact duplicates collapse onto one id
IMAGE = "image"  # encoded image bytes (null when the source is large and keeps a path/URI)
IMAGE_PATH = "image_path"  # path or URI of the original image (null when bytes are stored)
CAPTION = "caption"
WIDTH = "width"  # from the image header, no full decode
HEIGHT = "height"
FORMAT = "format"  # PIL format name: JPEG, PNG, WEBP, ...
THUMBNAIL = "thumbnail"  # small JPEG every model stage scores from (longest side THUMBNAIL_SIZE)
SOURCE = "source"  # which input this row came from (folder, parquet file, tar shard)
SOURCE_KEY = "source_key"  # the row's key inside its source (file name, row index, tar member)
ENGAGEMENT = "engagement"  # likes/favourites when the source has them (Emu's "proprietary signals")
META = "meta"  # JSON string of any other per-row fields the source carried (e.g. the sample's defect)

THUMBNAIL_SIZE = 512  # longest side; OCR detection runs at 512 px, CLIP at 224

INGEST_SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(IMAGE, pa.binary()),
        pa.field(IMAGE_PATH, pa.string()),
        pa.field(CAPTION, pa.string()),
        pa.field(WIDTH, pa.int32(), nullable=False),
        pa.field(HEIGHT, pa.int32(), nullable=False),
        pa.field(FORMAT, pa.string()),
        pa.field(THUMBNAIL, pa.binary(), nullable=False),
        pa.field(SOURCE, pa.string(), nullable=False),
        pa.field(SOURCE_KEY, pa.string(), nullable=False),
        pa.field(ENGAGEMENT, pa.float64()),
        pa.field(META, pa.string()),
    ]
)

# --- quarantine: rows that never became pool rows, with the reason -----------------------------
REASON = "reason"
DETAIL = "detail"
QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field(SOURCE, pa.string(), nullable=False),
        pa.field(SOURCE_KEY, pa.string(), nullable=False),
        pa.field(ID, pa.string()),  # known when the bytes could be read and hashed
        pa.field(REASON, pa.string(), nullable=False),  # short machine-readable code, e.g. "corrupt_image"
        pa.field(DETAIL, pa.string()),  # the human-readable message
    ]
)

# --- scores (one column each; the scorer that writes it declares the same name and type) --------
ASPECT_RATIO = "aspect_ratio"  # max(w/h, h/w) >= 1
MIN_SIDE = "min_side"
MEGAPIXELS = "megapixels"
PHASH = "phash"  # 64-bit perceptual hash of the thumbnail, as a signed int64
SHARPNESS = "sharpness"  # variance of the Laplacian of the grey thumbnail
CONTRAST = "contrast"  # RMS contrast (std of grey level, 0-1)
OCR_WORD_COUNT = "ocr_word_count"
OCR_TEXT_AREA = "ocr_text_area"  # fraction of the image covered by text boxes
CLIP_IMAGE_EMBEDDING = "clip_image_embedding"  # float16 list, L2-normalised
CLIP_TEXT_EMBEDDING = "clip_text_embedding"  # float16 list, L2-normalised
CLIP_SCORE = "clip_score"  # cosine similarity in [-1, 1]; null (with reason) for empty captions
CLIP_SCORE_NULL_REASON = "clip_score_null_reason"
CAPTION_TRUNCATED = "caption_truncated"
AESTHETIC_SCORE = "aesthetic_score"  # LAION improved predictor, ~1-10
CONCEPT = "concept"  # domain for balancing ("other" below the confidence threshold)
CONCEPT_CONFIDENCE = "concept_confidence"
NSFW_SCORE = "nsfw_score"  # probability of offensive content, 0-1

# --- selection ----------------------------------------------------------------------------------
KEEP = "keep"
DROP_REASON = "drop_reason"  # the first failing filter (null when kept)
DROP_REASONS = "drop_reasons"  # every failing filter
NEAR_DUP_GROUP = "near_dup_group"  # id of the group's representative
SELECTION_SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(KEEP, pa.bool_(), nullable=False),
        pa.field(DROP_REASON, pa.string()),
        pa.field(DROP_REASONS, pa.list_(pa.string())),
        pa.field(NEAR_DUP_GROUP, pa.string()),
        pa.field(CONCEPT, pa.string()),
    ]
)

OTHER_CONCEPT = "other"


def empty_table(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()
