"""Technical quality of the thumbnail: sharpness (variance of the Laplacian) and RMS contrast.
Cheap stand-ins that catch blurred and washed-out images before the aesthetic model sees them."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
from PIL import Image
from scipy import ndimage

from pipeline import schema
from pipeline.scorer import Resources, Scorer, ScorerOptions


class TechnicalOptions(ScorerOptions):
    # Measured at one fixed scale so a 4000 px and a 400 px photo of the same scene score alike.
    analysis_size: int = 256


def sharpness_and_contrast(jpeg: bytes, size: int) -> tuple[float, float]:
    image = Image.open(io.BytesIO(jpeg))
    image.draft("L", (size, size))
    image = image.convert("L")
    image.thumbnail((size, size))
    grey = np.asarray(image, dtype=np.float32) / 255.0
    sharpness = float(ndimage.laplace(grey).var()) * 1000.0  # x1000: a readable 0-100ish scale
    contrast = float(grey.std())
    return sharpness, contrast


class TechnicalScorer(Scorer):
    name = "technical"
    input_columns = (schema.THUMBNAIL,)
    output_fields = (
        pa.field(schema.SHARPNESS, pa.float32()),
        pa.field(schema.CONTRAST, pa.float32()),
    )
    resources = Resources(num_cpus=1, batch_size=512)
    Options = TechnicalOptions

    def score(self, batch: pa.RecordBatch):
        pairs = [sharpness_and_contrast(b, self.options.analysis_size) for b in batch.column(schema.THUMBNAIL).to_pylist()]
        return {schema.SHARPNESS: [p[0] for p in pairs], schema.CONTRAST: [p[1] for p in pairs]}
