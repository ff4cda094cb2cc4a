"""Small tables built in code for tests: ingest shards with real JPEG thumbnails, no pipeline needed."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline import schema
from pipeline.layout import RunLayout, shard_name


def jpeg(array: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def random_photo(rng: np.random.Generator, width: int = 96, height: int = 64) -> bytes:
    """A smooth random image (low-frequency noise upsampled): hashes and sharpness differ per seed."""
    small = rng.integers(0, 255, size=(max(height // 8, 2), max(width // 8, 2), 3), dtype=np.uint8)
    return jpeg(np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC)))


def ingest_rows(n: int, seed: int = 0, source: str = "test") -> pa.Table:
    rng = np.random.default_rng(seed)
    images = [random_photo(rng, int(rng.integers(64, 160)), int(rng.integers(48, 120))) for _ in range(n)]
    sizes = [Image.open(io.BytesIO(b)).size for b in images]
    return pa.Table.from_pylist(
        [
            {
                schema.ID: hashlib.sha256(b).hexdigest(),
                schema.IMAGE: b,
                schema.IMAGE_PATH: None,
                schema.CAPTION: f"test image {i}",
                schema.WIDTH: w,
                schema.HEIGHT: h,
                schema.FORMAT: "JPEG",
                schema.THUMBNAIL: b,
                schema.SOURCE: source,
                schema.SOURCE_KEY: str(i),
                schema.ENGAGEMENT: None,
                schema.META: None,
            }
            for i, (b, (w, h)) in enumerate(zip(images, sizes))
        ],
        schema=schema.INGEST_SCHEMA,
    )


def write_ingest_run(run_dir: Path, n: int, shard_rows: int, seed: int = 0, row_group_rows: int | None = None) -> RunLayout:
    layout = RunLayout(run_dir)
    layout.ingest.mkdir(parents=True, exist_ok=True)
    table = ingest_rows(n, seed)
    for index, start in enumerate(range(0, n, shard_rows)):
        pq.write_table(table.slice(start, shard_rows), layout.ingest / shard_name(index), row_group_size=row_group_rows)
    return layout
