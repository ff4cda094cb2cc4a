"""CLIP image and caption embeddings and the CLIP score (Emu: "CLIP score filter to eliminate samples
with poor image-text alignment").

open_clip, weights resolved by pipeline/weights.py (never downloaded mid-run). The default is ViT-L/14
with OpenAI's weights: the LAION aesthetic predictor was trained on exactly these embeddings, so the
aesthetic scorer can reuse them. Embeddings are stored L2-normalised as float16 and reused by the
aesthetic and concept scorers, so CLIP runs once per image.

``clip_score`` = cosine(image, caption) in [-1, 1]. DataComp reports ``100 * cosine`` (its CLIP-score
filter keeps e.g. the top 30% by that number): set ``scale: 100`` to store that variant instead.
Null captions get a null score with reason "missing_caption", blank ones "empty_caption" (never 0, which
would read as "misaligned"). Captions longer than the text encoder's context (77 tokens for CLIP) are
truncated by open_clip's tokenizer and flagged in ``caption_truncated``.

Throughput on a GPU is bound by the CPU side: one thread decodes and preprocesses ~430 thumbnails/s
(benchmarks/bench_clip_decode.py), against the ~2,600 img/s a ViT-L/14 embeds in bf16 on an H100. So each
actor decodes in a pool of ``decode_threads`` (8 by default on CUDA; Pillow releases the GIL) and asks Ray
for that many CPUs; the output is identical to the one-thread path (tests/pipeline/scorers/test_clip.py).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from pipeline import schema
from pipeline.scorer import Resources, Scorer, ScorerError, ScorerOptions
from pipeline.scorers.common import (
    DecodeThreadsOptions,
    Device,
    Precision,
    decode_pool,
    decode_thumbnails,
    embeddings_to_arrow,
    pick_device,
    pick_dtype,
    placed,
    run_halving_on_oom,
)
from pipeline.weights import WeightSpec, resolve

log = logging.getLogger(__name__)

MISSING_CAPTION = "missing_caption"
EMPTY_CAPTION = "empty_caption"


class ClipModelOptions(ScorerOptions):
    """Which CLIP: an open_clip architecture with a pretrained tag, or with a local checkpoint file."""

    model: str = Field("ViT-L-14", description="open_clip architecture name")
    pretrained: str | None = Field("openai", description="open_clip pretrained tag (e.g. openai, laion2b_s32b_b82k)")
    checkpoint: str | None = Field(None, description="local checkpoint file instead of a pretrained tag")
    checkpoint_sha256: str | None = None
    device: Device = "auto"
    precision: Precision = Field("auto", description="autocast dtype; auto = bf16 on CUDA, float32 on CPU (bf16 ViTs are slower there)")

    @model_validator(mode="after")
    def _one_weights_source(self):
        if (self.pretrained is None) == (self.checkpoint is None):
            raise ValueError("give exactly one of `pretrained` (an open_clip tag) or `checkpoint` (a local file)")
        return self

    def weight_spec(self) -> WeightSpec:
        if self.checkpoint is not None:
            return WeightSpec(f"clip:{self.model}", "path", self.checkpoint, self.checkpoint_sha256,
                              expected=f"an open_clip {self.model} state dict")
        return WeightSpec(f"clip:{self.model}:{self.pretrained}", "open_clip", f"{self.model}:{self.pretrained}",
                          expected=f"open_clip {self.model} pretrained={self.pretrained}")


def load_clip(options: ClipModelOptions) -> tuple[Any, Any, Any, str]:
    """(model, image preprocess, tokenizer, device), weights from the resolved local file only."""
    import open_clip

    path = resolve(options.weight_spec())
    force: dict[str, Any] = {}
    if options.pretrained is not None:
        # What open_clip applies for a tag, applied to the staged file: the tag's QuickGELU and its
        # preprocessing (mean/std/interpolation), so results equal create_model(pretrained=tag).
        from pipeline.weights import open_clip_tag_config

        tag = open_clip_tag_config(options.model, options.pretrained)
        force["force_quick_gelu"] = bool(tag.get("quick_gelu", False))
        force["force_preprocess_cfg"] = {k: tag[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag}
    device = pick_device(options.device)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(options.model, pretrained=str(path), device=device, **force)
    except (RuntimeError, AssertionError, KeyError, ValueError) as error:  # open_clip's shape checks
        raise ScorerError(f"CLIP checkpoint {path} does not fit open_clip {options.model}: {error}") from error
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(options.model), device


def token_count(tokenizer: Any, text: str) -> int:
    """Tokens the caption needs including start/end tokens, before any truncation."""
    if hasattr(tokenizer, "encode"):  # open_clip's SimpleTokenizer (CLIP BPE)
        return len(tokenizer.encode(text)) + 2
    return len(tokenizer.tokenizer(text)["input_ids"])  # open_clip's HFTokenizer (SigLIP, ...)


class ClipOptions(ClipModelOptions, DecodeThreadsOptions):
    scale: float = Field(1.0, gt=0, description="clip_score = scale * cosine; 100 gives DataComp's convention")
    batch_size: int = Field(256, ge=1, description="images per forward; halved automatically on CUDA OOM")


class ClipScorer(Scorer):
    name = "clip"
    input_columns = (schema.ID, schema.THUMBNAIL, schema.CAPTION)
    output_fields = (
        pa.field(schema.CLIP_IMAGE_EMBEDDING, pa.list_(pa.float16())),
        pa.field(schema.CLIP_TEXT_EMBEDDING, pa.list_(pa.float16())),
        pa.field(schema.CLIP_SCORE, pa.float32()),
        pa.field(schema.CLIP_SCORE_NULL_REASON, pa.string()),
        pa.field(schema.CAPTION_TRUNCATED, pa.bool_()),
    )
    resources = Resources(num_cpus=1, batch_size=256)
    stateful = True
    Options = ClipOptions
    options: ClipOptions

    def __init__(self, options: ClipOptions | None = None) -> None:
        super().__init__(options)
        self.resources = placed(self.resources, self.options.device, self.options)

    def weights(self) -> list[WeightSpec]:
        return [self.options.weight_spec()]

    def setup(self) -> None:
        self.model, self.preprocess, self.tokenizer, self.device = load_clip(self.options)
        self.dtype = pick_dtype(self.device, self.options.precision)
        self.context_length = self.model.context_length
        self.pool = decode_pool(self.options.threads(self.device))

    def _encode(self, fn, inputs):
        import torch

        with torch.inference_mode(), torch.autocast(self.device, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            return fn(inputs.to(self.device)).float().cpu().numpy()

    def encode_pixels(self, pixels) -> np.ndarray:
        """Embeddings of preprocessed image tensors, batch by batch (halved on CUDA OOM)."""
        import torch

        def run(chunk):
            return self._encode(self.model.encode_image, torch.stack(list(chunk)))

        return np.concatenate(run_halving_on_oom(pixels, self.options.batch_size, run, what="clip image"))

    def image_embeddings(self, batch: pa.RecordBatch) -> np.ndarray:
        """The batch's thumbnails decoded and preprocessed in the decode threads, then embedded."""
        return self.encode_pixels(decode_thumbnails(batch, self.preprocess, self.pool))

    def encode_tokens(self, tokens) -> np.ndarray:
        """Embeddings of tokenised captions (rows of ``context_length`` token ids), batch by batch."""
        def run(chunk):
            return self._encode(self.model.encode_text, chunk)

        return np.concatenate(run_halving_on_oom(tokens, self.options.batch_size, run, what="clip text"))

    def truncated(self, texts: list[str], tokens) -> list[bool]:
        """Which captions were cut to the context. Only a caption whose tokens fill the context (no padding
        at the end) can have been, so only those are counted again, untruncated."""
        tokenizer = getattr(self.tokenizer, "tokenizer", None)  # open_clip's HFTokenizer wraps a HF one
        pad = getattr(tokenizer, "pad_token_id", None) or 0  # SimpleTokenizer pads with 0
        full = (tokens[:, -1] != pad).tolist()
        return [f and token_count(self.tokenizer, t) > self.context_length for t, f in zip(texts, full)]

    def score(self, batch: pa.RecordBatch) -> dict[str, Any]:
        image_vectors = self.image_embeddings(batch)
        captions = batch.column(schema.CAPTION).to_pylist()
        reasons = [MISSING_CAPTION if c is None else EMPTY_CAPTION if not c.strip() else None for c in captions]
        valid = np.array([r is None for r in reasons])
        text_vectors = np.zeros_like(image_vectors)
        truncated = [False] * len(captions)
        if valid.any():
            texts = [c for c, ok in zip(captions, valid) if ok]
            tokens = self.tokenizer(texts, context_length=self.context_length)  # once, for both uses
            text_vectors[valid] = self.encode_tokens(tokens)
            for row, cut in zip(np.flatnonzero(valid), self.truncated(texts, tokens)):
                truncated[row] = cut
        image_arrow = embeddings_to_arrow(image_vectors)
        text_arrow = embeddings_to_arrow(text_vectors, valid)
        # cosine of the stored (float16) unit vectors, so a later recomputation from the table agrees
        image_unit = np.asarray(image_arrow.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(image_vectors.shape)
        text_unit = np.asarray(text_arrow.values.to_numpy(zero_copy_only=False), np.float32).reshape(text_vectors.shape)
        cosine = (image_unit * text_unit).sum(axis=1) * self.options.scale
        n_truncated = sum(1 for t in truncated if t)
        if n_truncated:
            log.info("clip: %d of %d captions longer than %d tokens were truncated", n_truncated, len(captions), self.context_length)
        return {
            schema.CLIP_IMAGE_EMBEDDING: image_arrow,
            schema.CLIP_TEXT_EMBEDDING: text_arrow,
            schema.CLIP_SCORE: pa.array([float(s) if ok else None for s, ok in zip(cosine, valid)], type=pa.float32()),
            schema.CLIP_SCORE_NULL_REASON: reasons,
            schema.CAPTION_TRUNCATED: truncated,
        }
