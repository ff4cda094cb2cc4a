"""The automatic score of quality-tuning's evaluation samples (``sample.score`` in the config): the
curation pipeline's own CLIP and aesthetic scorers, or KID against the curated images, on images of a
fixed prompt selection, so "better" during training means what the filters and the evaluation stage
mean by it. ``run_stage`` samples ``prompts`` x ``seeds`` at every evaluation and calls the scorer; its
``score`` then picks the best checkpoint and drives early stopping. The selection prompts are kept
apart from the ones the evaluation stage reports on (issue 10, item 6): ``selection_record`` is
written beside every exported checkpoint and ``model.evaluation.prompts.selection_prompts`` reads it
back."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import pyarrow as pa

from model.config import SampleScoreConfig
from model.evaluation import schema as eval_schema
from model.evaluation.errors import EvaluationError
from pipeline import schema

log = logging.getLogger(__name__)


class PipelineSampleScorer:
    """``scorer(images, prompts) -> {"score", ...}``: for the CLIP/aesthetic metrics the means over the
    images ("aesthetic", "clip_score"; parts the metric does not need are left out), for ``kid`` the
    KID of the images against the reference ("kid", score = -kid). Models and reference features load
    once, in the constructor: a missing weights file or an empty reference is one clear error before
    training starts. ``prompts`` and ``seeds`` are what to sample for it."""

    def __init__(self, cfg: SampleScoreConfig, reference: str | Path | None = None, seed: int = 0) -> None:
        from model.evaluation.prompts import load_prompts, split_prompts

        self.cfg = cfg
        table = load_prompts(cfg.prompts)
        if table.num_rows > cfg.n_prompts:
            table = split_prompts(table, cfg.n_prompts, seed)[0]
        else:
            log.warning("sample.score.prompts %s holds %d prompts, not more than n_prompts=%d: all of them choose "
                        "the checkpoint, so report on another set", cfg.prompts, table.num_rows, cfg.n_prompts)
        self.selection = table
        self.prompts: list[str] = table.column(eval_schema.PROMPT).to_pylist()
        self.seeds: list[int] = list(range(cfg.seeds))
        self.clip = self.aesthetic = self.features = self.reference = None
        if cfg.metric == "kid":
            self._load_reference(reference, seed)
            return
        from pipeline.scorers import build_scorer

        self.clip = build_scorer("clip", cfg.clip)
        self.clip.setup()
        if cfg.metric != "clip_score":
            self.aesthetic = build_scorer("aesthetic", cfg.aesthetic)
            self.aesthetic.setup()

    def _load_reference(self, reference: str | Path | None, seed: int) -> None:
        from model.evaluation.distribution import ImageNetFeatures, read_reference

        if reference is None:
            raise EvaluationError("sample.score.metric kid needs a reference image set (the curated images)")
        self.features = ImageNetFeatures()
        ref = read_reference(reference, limit=self.cfg.reference_limit, seed=seed)
        self.reference = self.features([_decode(t) for t in ref.thumbnails])
        self.reference_info = ref.to_dict()
        log.info("sample score: KID against %d curated images of %s", len(self.reference), reference)

    def selection_record(self) -> dict[str, Any]:
        """What chose the checkpoint: written beside it as needles_selection_prompts.json."""
        return {"source": self.cfg.prompts, "metric": self.cfg.metric, "seeds": self.seeds,
                "prompt_ids": self.selection.column(eval_schema.PROMPT_ID).to_pylist(), "prompts": self.prompts}

    def table(self, images: list, prompts: list[str]) -> pa.Table:
        """The pipeline's per-image scores of ``images`` (PIL) against ``prompts``, one row per image."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        thumbnails = [_png(image) for image in images]  # lossless: the score sees the sampled pixels
        table = pa.table({schema.ID: [f"sample-{i}" for i in range(len(images))],
                          schema.THUMBNAIL: pa.array(thumbnails, pa.binary()),
                          schema.CAPTION: pa.array(prompts, pa.string())})
        table = self.clip(table)
        return self.aesthetic(table) if self.aesthetic is not None else table

    def __call__(self, images: list, prompts: list[str]) -> dict[str, float]:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        if self.cfg.metric == "kid":
            from model.evaluation.distribution import kid

            from pipeline.imageio import inspect_image

            # the reference's way: each image as the pipeline's JPEG thumbnail (the judge stage does the same)
            thumbnails = [inspect_image(_png(im), schema.THUMBNAIL_SIZE).thumbnail for im in images]
            value = kid(self.features([_decode(t) for t in thumbnails]), self.reference, seed=0).mean
            return {"kid": value, "score": -value}
        table = self.table(images, prompts)
        parts: dict[str, Any] = {"clip_score": _mean(table, schema.CLIP_SCORE)}
        if self.aesthetic is not None:
            parts["aesthetic"] = _mean(table, schema.AESTHETIC_SCORE)
        metric = self.cfg.metric
        if metric == "aesthetic":
            parts["score"] = parts["aesthetic"]
        elif metric == "clip_score":
            parts["score"] = parts["clip_score"]
        else:
            parts["score"] = parts["aesthetic"] + self.cfg.clip_weight * parts["clip_score"]
        return parts


def _mean(table: pa.Table, column: str) -> float:
    values = [v for v in table.column(column).to_pylist() if v is not None]
    if not values:  # every prompt is non-empty text, so a null here is a scorer bug, not a sample property
        raise ValueError(f"no {column} for any sample")
    return float(sum(values) / len(values))


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _decode(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")
