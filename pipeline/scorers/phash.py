"""Perceptual hash (DCT pHash, 64 bits) of the thumbnail, for near-duplicate grouping in selection:
re-encodes, small resizes and brightness shifts land within a few bits of each other."""

from __future__ import annotations

import io

import imagehash
import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline import schema
from pipeline.scorer import Resources, Scorer, ScorerOptions


class PHashOptions(ScorerOptions):
    hash_size: int = 8  # 8x8 = 64 bits, stored in one int64


def phash64(jpeg: bytes, hash_size: int = 8) -> int:
    image = Image.open(io.BytesIO(jpeg))
    # pHash looks at a 32x32 grey image: let the JPEG decoder scale by 1/8 instead of decoding 512 px.
    image.draft("L", (4 * hash_size * 2, 4 * hash_size * 2))
    bits = imagehash.phash(image, hash_size=hash_size).hash.flatten()
    return int(np.packbits(bits).view(">i8")[0])


class PHashScorer(Scorer):
    name = "phash"
    input_columns = (schema.THUMBNAIL,)
    output_fields = (pa.field(schema.PHASH, pa.int64()),)
    resources = Resources(num_cpus=1, batch_size=512)
    Options = PHashOptions

    def __init__(self, options: PHashOptions | None = None) -> None:
        super().__init__(options)
        if self.options.hash_size != 8:
            raise ValueError("phash.hash_size: only 8 (64 bits, one int64 column) is supported")

    def score(self, batch: pa.RecordBatch):
        return {schema.PHASH: [phash64(b) for b in batch.column(schema.THUMBNAIL).to_pylist()]}
