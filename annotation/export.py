"""The curated set, in the two shapes training reads as is:

    OUT/curated.parquet   every pool column of the kept images, plus ``file_name``
    OUT/images/<id>.<ext> the full-resolution images
    OUT/metadata.jsonl    {"file_name": "images/<id>.<ext>", "text": caption}, one line per image

``datasets.load_dataset("imagefolder", data_dir=OUT)`` (and so diffusers' train_text_to_image.py with
``--train_data_dir OUT --caption_column text``) reads OUT/images with the captions of metadata.jsonl.
Rows without an image or a caption are not exported: they go to OUT/quarantine.parquet with the reason.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from annotation.images import NoImage, original_image, pool_dataset, write_once
from pipeline.schema import CAPTION, DETAIL, ID, QUARANTINE_SCHEMA, REASON, SOURCE, SOURCE_KEY

log = logging.getLogger(__name__)

FILE_NAME = "file_name"  # the imagefolder convention
TEXT = "text"  # diffusers' default --caption_column


def export_curated(pool: Path, out: Path) -> Path:
    """Export the rows of ``pool`` (the specialist round's next pool) to ``out``; returns ``out``."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    dataset = pool_dataset(pool)
    schema = dataset.schema.append(pa.field(FILE_NAME, pa.string()))
    quarantine: list[dict] = []
    exported = 0
    with pq.ParquetWriter(out / "curated.parquet", schema) as writer, (out / "metadata.jsonl").open("w") as meta:
        for batch in dataset.to_batches(batch_size=256):
            keep, names = [], []
            for row in batch.to_pylist():
                reason = None
                if not (row.get(CAPTION) or "").strip():
                    reason, detail = "no_caption", "the curated set trains on captions"
                else:
                    try:
                        data, ext = original_image(row)
                    except NoImage as error:
                        reason, detail = "no_image", str(error)
                if reason:
                    quarantine.append(
                        {SOURCE: row.get(SOURCE) or str(pool), SOURCE_KEY: row.get(SOURCE_KEY) or row[ID],
                         ID: row[ID], REASON: reason, DETAIL: detail}
                    )
                    keep.append(False)
                    continue
                name = f"images/{row[ID]}{ext}"
                write_once(out / name, data)
                meta.write(json.dumps({FILE_NAME: name, TEXT: row[CAPTION]}) + "\n")
                keep.append(True)
                names.append(name)
            table = pa.Table.from_batches([batch]).filter(pa.array(keep, pa.bool_()))
            writer.write_table(table.append_column(FILE_NAME, pa.array(names, pa.string())).cast(schema))
            exported += len(names)
    pq.write_table(pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA), out / "quarantine.parquet")
    if quarantine:
        log.warning("%d curated rows not exported: see %s", len(quarantine), out / "quarantine.parquet")
    log.info("exported %d images to %s", exported, out)
    return out
