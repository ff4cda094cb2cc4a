"""The flows' parameters as validated models: a bad source, config or size fails before any work starts,
with one message naming the parameter."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

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
        return self


class TrainParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data_dir: str | None = Field(None, description="curated set (imagefolder or Parquet); default: the latest one under data/")
    out_dir: str = Field("data/train-qt", description="checkpoints, sample grids, TensorBoard logs")
    preset: str = Field("tiny", description="tiny (CPU), mid, sd15 (GPU)")
    overrides: list[str] = Field(default_factory=list, description="preset fields to override, as key=value")
