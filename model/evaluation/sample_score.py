"""The automatic score of quality-tuning's fixed-prompt samples (``sample.score`` in the config): the
curation pipeline's own CLIP and aesthetic scorers run on the generated images, so "better" during
training means what the filters meant by it when they chose the data. ``run_stage`` calls the scorer at
every evaluation; its ``score`` then picks the best checkpoint and drives early stopping."""

from __future__ import annotations

import io
from typing import Any

import pyarrow as pa

from model.config import SampleScoreConfig
from pipeline import schema


class PipelineSampleScorer:
    """``scorer(images, prompts) -> {"score", "aesthetic", "clip_score"}`` (means over the images; parts the
    metric does not need are left out). Models load once, in the constructor, through the pipeline's
    weights resolver: a missing CLIP or aesthetic file is one clear error before training starts."""

    def __init__(self, cfg: SampleScoreConfig) -> None:
        from pipeline.scorers import build_scorer

        self.cfg = cfg
        self.clip = build_scorer("clip", cfg.clip)
        self.clip.setup()
        self.aesthetic = None
        if cfg.metric != "clip_score":
            self.aesthetic = build_scorer("aesthetic", cfg.aesthetic)
            self.aesthetic.setup()

    def table(self, images: list, prompts: list[str]) -> pa.Table:
        """The pipeline's per-image scores of ``images`` (PIL) against ``prompts``, one row per image."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        thumbnails = []
        for image in images:
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="PNG")  # lossless: the score sees the sampled pixels
            thumbnails.append(buffer.getvalue())
        table = pa.table({schema.ID: [f"sample-{i}" for i in range(len(images))],
                          schema.THUMBNAIL: pa.array(thumbnails, pa.binary()),
                          schema.CAPTION: pa.array(prompts, pa.string())})
        table = self.clip(table)
        return self.aesthetic(table) if self.aesthetic is not None else table

    def __call__(self, images: list, prompts: list[str]) -> dict[str, float]:
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
