"""Reading pool tables and getting each row's image bytes (thumbnail or original)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.dataset as ds
from PIL import Image

from pipeline.errors import UserError
from pipeline.imageio import load_image_bytes
from pipeline.schema import FORMAT, ID, IMAGE, IMAGE_PATH, THUMBNAIL

EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


class PoolNotFound(UserError, FileNotFoundError):
    """The pool a round or an export was pointed at does not exist."""


class NoImage(Exception):
    """A row whose image cannot be had; the message is the quarantine reason's detail."""


def pool_dataset(path: Path) -> ds.Dataset:
    """A pool given as one Parquet file or a folder of shards."""
    path = Path(path)
    if not path.exists():
        raise PoolNotFound(f"pool {path} does not exist")
    return ds.dataset(path, format="parquet")


def iter_rows(path: Path, columns: list[str], batch_size: int = 2_048) -> Iterator[dict[str, Any]]:
    """Rows of a pool with only ``columns`` that it has (images are large: never the whole table)."""
    dataset = pool_dataset(path)
    present = [c for c in columns if c in dataset.schema.names]
    if ID not in present:
        raise ValueError(f"pool {path} has no {ID!r} column")
    for batch in dataset.to_batches(columns=present, batch_size=batch_size):
        yield from batch.to_pylist()


def read_columns(path: Path, columns: list[str]) -> pa.Table:
    dataset = pool_dataset(path)
    return dataset.to_table(columns=[c for c in columns if c in dataset.schema.names])


def _extension(data: bytes, declared: str | None) -> str:
    if declared and declared.upper() in EXTENSIONS:
        return EXTENSIONS[declared.upper()]
    try:
        fmt = Image.open(io.BytesIO(data)).format
    except Exception as error:  # PIL raises many kinds for non-images
        raise NoImage(f"image bytes are not a readable image ({error})") from error
    if fmt not in EXTENSIONS:
        raise NoImage(f"image format {fmt!r} is not one browsers and datasets read")
    return EXTENSIONS[fmt]


def original_image(row: dict[str, Any]) -> tuple[bytes, str]:
    """The full-resolution image of a pool row and its file extension: stored bytes, else a local
    ``image_path``; raises NoImage with the reason otherwise."""
    try:
        data = load_image_bytes(row.get(IMAGE) or None, row.get(IMAGE_PATH) or None)
    except (ValueError, OSError) as error:
        raise NoImage(f"no readable image: {error}") from error
    return data, _extension(data, row.get(FORMAT))


def shown_image(row: dict[str, Any], source: str) -> tuple[bytes, str]:
    """The image annotators see: the pool's JPEG thumbnail, or the original."""
    if source == "thumbnail":
        if not row.get(THUMBNAIL):
            raise NoImage("row has no thumbnail")
        return row[THUMBNAIL], ".jpg"
    return original_image(row)


def write_once(path: Path, data: bytes) -> None:
    """Write a file unless it is already there, atomically (a reader never sees half a file)."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
