"""Image size and aspect ratio, from the width/height that ingest read from the image header (no
decode). Emu filters on both; Playground v2.5 later buckets by aspect ratio, so extreme crops go."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schema
from pipeline.scorer import Resources, Scorer


class SizeScorer(Scorer):
    name = "size"
    input_columns = (schema.WIDTH, schema.HEIGHT)
    output_fields = (
        pa.field(schema.ASPECT_RATIO, pa.float32()),
        pa.field(schema.MIN_SIDE, pa.int32()),
        pa.field(schema.MEGAPIXELS, pa.float32()),
    )
    resources = Resources(num_cpus=0.25, batch_size=4096)

    def score(self, batch: pa.RecordBatch):
        w = pc.cast(batch.column(schema.WIDTH), pa.float64())
        h = pc.cast(batch.column(schema.HEIGHT), pa.float64())
        long_side, short_side = pc.max_element_wise(w, h), pc.min_element_wise(w, h)
        return {
            # max(w/h, h/w) >= 1, so one threshold covers portrait and landscape crops alike.
            schema.ASPECT_RATIO: pc.divide(long_side, short_side),
            schema.MIN_SIDE: short_side,
            schema.MEGAPIXELS: pc.divide(pc.multiply(w, h), 1e6),
        }
