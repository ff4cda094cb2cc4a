"""The flows' parameters as validated models: a bad source, config or size fails before any work starts,
with one message naming the parameter."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class CurateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sources: list[str] = Field(min_length=1, description="image folders with captions, Parquet files, WebDataset tars")
    run_dir: str = Field("data/runs/curate", description="where every stage writes its files")
    config: str | None = Field(None, description="pipeline YAML; default configs/pipeline.yaml")
    pool_size: int | None = Field(None, ge=1, description="the automatic pool's size (Emu: ~200K); default from config")
    generalist_target: int = Field(20_000, ge=1, description="images the generalist round keeps (Emu: ~20K)")
    specialist_target: int = Field(2_000, ge=1, description="images the specialist round keeps (Emu: ~2K)")
    annotator_mode: Literal["people", "simulated"] = Field(
        "people", description="people: wait for annotators in Label Studio; simulated: demo/test mode answering by a fixed rule"
    )
    round_timeout_s: int = Field(7 * 24 * 3600, ge=60, description="how long a suspended round may wait for people")
    train: bool = Field(False, description="start the train-qt flow on the curated set at the end")
    preset: str = Field("tiny", description="model preset for training (tiny, mid, sd15)")
    train_overrides: list[str] = Field(default_factory=list, description="preset fields to override, as key=value")
    evaluate: bool = Field(False, description="after training, start the evaluate/ab-test deployment: the quality-tuned "
                           "checkpoint against its base, KID against the curated set, A/B rounds by the same annotators")
    eval_params: dict[str, Any] = Field(default_factory=dict, description="evaluate flow parameters to set "
                                        "(n_prompts, seeds, steps, criteria, votes_per_pair, ...)")

    @field_validator("sources")
    @classmethod
    def _sources_exist(cls, sources: list[str]) -> list[str]:
        import glob

        missing = [s for s in sources if not Path(s).exists() and not glob.glob(s)]
        if missing:
            raise ValueError(f"no such source: {', '.join(missing)}")
        return sources

    @field_validator("config")
    @classmethod
    def _config_valid(cls, config: str | None) -> str | None:
        from pipeline.config import ConfigError, load_config

        try:
            load_config(config)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return config

    @model_validator(mode="after")
    def _rounds_shrink(self) -> CurateParams:
        if self.specialist_target > self.generalist_target:
            raise ValueError("specialist_target must not exceed generalist_target (each round narrows the pool)")
        if self.evaluate and not self.train:
            raise ValueError("evaluate needs train: it compares the checkpoint training makes with its base")
        fixed = {"checkpoints", "baseline", "run_dir", "reference", "annotator_mode", "round_timeout_s"}
        unknown = set(self.eval_params) - (set(EvalParams.model_fields) - fixed)
        if unknown:
            raise ValueError(f"eval_params: {sorted(unknown)} cannot be set here (the curate run sets "
                             f"{sorted(fixed)}; others: {sorted(set(EvalParams.model_fields) - fixed)})")
        return self


class TrainParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data_dir: str | None = Field(None, description="curated set (imagefolder or Parquet); default: the latest one under data/")
    out_dir: str = Field("data/train-qt", description="checkpoints, sample grids, TensorBoard logs")
    preset: str = Field("tiny", description="tiny (CPU), mid, sd15 (GPU)")
    overrides: list[str] = Field(default_factory=list, description="preset fields to override, as key=value")


class EvalParams(BaseModel):
    """Did quality-tuning help? Generations of every checkpoint on the same prompts and seeds, the automatic
    judges, then human A/B rounds of each candidate against the baseline (Emu §4)."""

    model_config = ConfigDict(extra="forbid")

    checkpoints: dict[str, str] = Field(
        min_length=2, description="label -> diffusers pipeline folder; every one but the baseline is a candidate")
    baseline: str = Field("base", description="the label of the checkpoint the candidates are compared against")
    run_dir: str = Field("data/runs/eval", description="where generations, judges, A/B rounds and the report go")
    prompts: str = Field("parti", description="parti, drawbench or a prompt file (.tsv/.csv/.txt/.jsonl/.parquet)")
    n_prompts: int | None = Field(None, ge=1, description="prompts to draw (seeded, balanced over categories); default all")
    seeds: int = Field(2, ge=1, description="images per prompt and checkpoint (seeds 0..K-1, the same for every checkpoint)")
    steps: int = Field(25, ge=1, description="sampling steps")
    guidance_scale: float = Field(5.0, ge=0.0, description="classifier-free guidance scale")
    resolution: int | None = Field(None, ge=8, description="image side in pixels; default the checkpoints' own")
    reference: str | None = Field(None, description="reference images for KID (folder, imagefolder or Parquet)")
    criteria: list[Literal["appeal", "faithfulness", "flaws"]] = Field(
        ["appeal", "faithfulness", "flaws"], description="A/B questions; empty: automatic judges only")
    votes_per_pair: dict[str, int] = Field(default_factory=dict, description="override votes per pair, by criterion")
    annotator_mode: Literal["people", "simulated"] = Field(
        "people", description="people: wait for annotators in Label Studio; simulated: demo/test voters preferring the sharper image")
    round_timeout_s: int = Field(7 * 24 * 3600, ge=60, description="how long a suspended A/B round may wait for people")

    @field_validator("checkpoints")
    @classmethod
    def _pipelines_exist(cls, checkpoints: dict[str, str]) -> dict[str, str]:
        bad = [f"{label}={path}" for label, path in checkpoints.items() if not (Path(path) / "model_index.json").is_file()]
        if bad:
            raise ValueError(f"not a diffusers pipeline folder (no model_index.json): {', '.join(bad)}")
        return checkpoints

    @model_validator(mode="after")
    def _baseline_known(self) -> EvalParams:
        if self.baseline not in self.checkpoints:
            raise ValueError(f"baseline {self.baseline!r} is not one of the checkpoints {sorted(self.checkpoints)}")
        unknown = set(self.votes_per_pair) - set(self.criteria)
        if unknown:
            raise ValueError(f"votes_per_pair names criteria not evaluated: {sorted(unknown)}")
        return self

    @property
    def candidates(self) -> list[str]:
        return [label for label in self.checkpoints if label != self.baseline]
