"""Helpers the model-backed scorers share: thumbnail decoding, embedding columns, device choice."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Literal, TypeVar

import numpy as np
import pyarrow as pa
from pydantic import Field

from pipeline import schema
from pipeline.scorer import Resources, ScorerError, ScorerOptions

log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]


class DecodeThreadsOptions(ScorerOptions):
    """For a scorer whose actor feeds an accelerator: its per-row CPU work (JPEG decode, resize, normalise)
    runs in a thread pool, since one thread cannot keep a GPU busy (~400 thumbnails/s per core here)."""

    decode_threads: int = Field(0, ge=0, description=(
        "threads of the actor that decode and preprocess thumbnails (Pillow, OpenCV and NumPy release the "
        "GIL); the actor asks Ray for as many CPUs. 0 = auto: 8 on CUDA, 1 on CPU (where the model's own "
        "threads already use the cores)"
    ))

    def threads(self, device: str) -> int:
        """Decode threads on ``device`` (the configured one, or the one ``auto`` resolved to)."""
        return self.decode_threads or (8 if device == "cuda" else 1)


def decode_pool(threads: int):
    """A ThreadPoolExecutor for ``threads`` > 1, else None (decode in the calling thread)."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(threads, thread_name_prefix="decode") if threads > 1 else None


def decode_thumbnail(row_id, data: bytes | None):
    """One thumbnail as an RGB PIL image (grey, palette and alpha inputs become RGB).

    Ingest wrote every thumbnail, so one that does not decode is an upstream bug: fail the batch with
    the row's id rather than score it as "no text" or "safe"."""
    from PIL import Image

    if data is None:
        raise ScorerError(f"row {row_id}: thumbnail is null")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as error:  # PIL raises several types for bad bytes
        raise ScorerError(f"row {row_id}: thumbnail does not decode: {error}") from error
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_thumbnails(batch: pa.RecordBatch, transform: Callable | None = None, pool=None) -> list:
    """The batch's thumbnails as RGB PIL images (``decode_thumbnail``), each passed through ``transform``
    when given. With ``pool`` (a ThreadPoolExecutor) rows are decoded in its threads: Pillow's decoders
    and resamplers release the GIL, so one GPU actor can keep its device fed from several cores."""
    ids = batch.column(schema.ID).to_pylist() if schema.ID in batch.schema.names else [None] * batch.num_rows

    def one(row: tuple) -> Any:
        image = decode_thumbnail(*row)
        return transform(image) if transform is not None else image

    rows = zip(ids, batch.column(schema.THUMBNAIL).to_pylist())
    return list(pool.map(one, rows)) if pool is not None else [one(row) for row in rows]


def embeddings_to_arrow(vectors: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    """L2-normalise rows (in float32) and store them as list<float16>; rows with valid=False are null."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = (vectors / np.maximum(norms, 1e-12)).astype(np.float16)
    n, width = unit.shape
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))
    array = pa.ListArray.from_arrays(offsets, pa.array(unit.reshape(-1), type=pa.float16()))
    if valid is not None and not valid.all():
        mask = pa.array(~valid)
        array = pa.ListArray.from_arrays(offsets, array.values, mask=mask)
    return array


def arrow_to_embeddings(column: pa.Array | pa.ChunkedArray, *, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(float32 matrix re-normalised after float16 storage, valid mask). Null rows come back as zeros."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    valid = ~np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    lengths = column.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    widths = set(lengths[valid].tolist())
    if len(widths) > 1:
        raise ScorerError(f"{what}: embeddings of different widths in one batch: {sorted(widths)}")
    width = widths.pop() if widths else 0
    out = np.zeros((len(column), width), dtype=np.float32)
    if width:
        flat = column.filter(pa.array(valid)).flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        out[valid] = flat.reshape(-1, width)
        out[valid] /= np.maximum(np.linalg.norm(out[valid], axis=1, keepdims=True), 1e-12)
    return out, valid


def placed(resources: Resources, device: Device, decode: DecodeThreadsOptions | None = None) -> Resources:
    """The scorer's resources for its configured device: ``device: cuda`` asks Ray for one GPU per
    actor (Ray hides GPUs from actors that did not ask, so ``auto`` inside Ray means CPU). A scorer with
    decode threads (``decode``: its options) asks for one CPU per thread."""
    if device == "cuda":
        resources = replace(resources, num_gpus=1.0)
    return replace(resources, num_cpus=float(decode.threads(device))) if decode is not None else resources


def pick_device(device: Device) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ScorerError("device 'cuda' requested but torch sees no CUDA device")
    return device


def pick_dtype(device: str, precision: Precision, *, cpu_bf16: bool = False):
    """Autocast dtype, or None for float32. ``auto``: bf16 on CUDA; on CPU only when the caller's model
    gains from it (``cpu_bf16``) and the CPU has native bf16 (oneDNN AVX512-BF16/AMX). Measured on a
    2-core AVX512-BF16 CPU without AMX: the CRAFT detector's convolutions ran 1.6-1.9x faster in bf16,
    but CLIP ViT-L/14 ran 6x slower than float32, so CLIP stays float32 on CPU."""
    import torch

    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_bf16 and torch.ops.mkldnn._is_mkldnn_bf16_supported() else None


T = TypeVar("T")


def run_halving_on_oom(items: Sequence, batch_size: int, run: Callable[[Sequence], T], *, what: str) -> list[T]:
    """Run ``run`` over ``items`` in chunks of ``batch_size``; on CUDA out-of-memory halve the chunk and
    retry (logged), down to one item, so one oversized batch never kills a long scoring job."""
    import torch

    results: list[T] = []
    start = 0
    size = max(1, batch_size)
    while start < len(items):
        chunk = items[start : start + size]
        try:
            results.append(run(chunk))
        except torch.cuda.OutOfMemoryError:
            if size == 1:
                raise
            torch.cuda.empty_cache()
            size = max(1, size // 2)
            log.warning("%s: CUDA out of memory on a batch of %d; retrying with batches of %d", what, len(chunk), size)
            continue
        start += len(chunk)
    return results
