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


def tiny_random_clip(folder: Path, embed_dim: int = 32) -> dict:
    """The clip scorer's options for "tiny-random-clip-<embed_dim>": a 2-layer open_clip ViT built from a config
    written here, with RANDOM weights (seed 0) saved as a checkpoint file and loaded through the same
    ``checkpoint:`` path a user's fine-tuned CLIP takes. No CLIP weights exist offline; its scores are
    meaningless, the tests check plumbing. ``embed_dim=768`` gives embeddings the real LAION aesthetic head
    (made for ViT-L/14) can read."""
    import json

    import open_clip
    import torch

    name = f"tiny-random-clip-{embed_dim}"
    if name not in open_clip.list_models():
        config = folder / f"{name}.json"
        config.write_text(json.dumps({
            "embed_dim": embed_dim,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
        }))
        open_clip.add_model_config(config)
    torch.manual_seed(0)
    checkpoint = folder / f"{name}.pt"
    torch.save(open_clip.create_model(name, pretrained=None).state_dict(), checkpoint)
    return {"model": name, "pretrained": None, "checkpoint": str(checkpoint), "device": "cpu"}
