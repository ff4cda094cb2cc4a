"""The flows' parameters as validated models: a bad source, config, preset or path fails before any work
starts, with one line naming the parameter (``ParameterError``). Each model is also its flow's signature
(``flow_parameters``): names, types, defaults and descriptions are written once, here.

Paths. The flows read and write under one data root: ``$NEEDLES_DATA_DIR`` (the compose stack's shared
/data volume), else ``./data`` of the process serving the deployments. A relative path in a parameter is
taken inside it, a leading ``data/`` naming the root itself, so ``data/runs/x`` and ``runs/x`` both mean
``<data root>/runs/x`` on a laptop and in a container alike; the folders a flow writes into (``run_dir``,
``out_dir``) must lie inside the root.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from pipeline.errors import UserError

DATA_ROOT_VAR = "NEEDLES_DATA_DIR"


class ParameterError(UserError, ValueError):
    """A flow parameter cannot be used; the message names it (one line per run, shown as the run's state)."""


def data_root() -> Path:
    """Where the flows keep their data: ``$NEEDLES_DATA_DIR``, else ``./data`` of this process."""
    return Path(os.path.abspath(os.environ.get(DATA_ROOT_VAR) or "data"))


def data_path(path: str | Path) -> Path:
    """``path`` as the flows read it: an absolute path as given, a relative one inside the data root."""
    p = Path(os.path.expanduser(str(path)))
    if not p.is_absolute():
        parts = p.parts[1:] if p.parts[:1] == ("data",) else p.parts
        p = data_root().joinpath(*parts)
    return Path(os.path.normpath(p))


def output_dir(path: str | Path) -> Path:
    """A folder a flow writes into: ``data_path(path)``, refused unless it lies inside the data root (a
    symlink inside the root that leads elsewhere is the operator's choice and is followed)."""
    root, p = data_root(), data_path(path)
    inside = (p != root and p.is_relative_to(root)) or (p.resolve() != root.resolve()
                                                         and p.resolve().is_relative_to(root.resolve()))
    if not inside:
        raise ValueError(f"{str(path)!r} is not inside the data root {root} (set {DATA_ROOT_VAR} to move the "
                         "root; relative paths are taken inside it)")
    return p


def one_line(error: BaseException) -> str:
    """A validation error (or any error) as one line: ``field: reason; field: reason``."""
    if isinstance(error, ValidationError):
        parts = []
        for e in error.errors():
            message = e["msg"].removeprefix("Value error, ")
            parts.append(f"{'.'.join(map(str, e['loc']))}: {message}" if e["loc"] else message)
        return "; ".join(parts)
    return " ".join(str(error).split())


def _training_config(overrides: list[str], info: ValidationInfo) -> list[str]:
    """The model config a training with the preset and ``overrides`` would load, checked now rather than
    after ingest and two human rounds (a field validator of the overrides, so a bad run_dir and a bad preset
    are both reported at once)."""
    from model.config import load_config

    preset = info.data.get("preset")
    if preset is None:  # the preset field failed its own validation
        return overrides
    try:
        load_config(preset, overrides)
    except (UserError, ValueError, LookupError, FileNotFoundError) as exc:
        raise ValueError(f"preset {preset!r} with {info.field_name} {overrides}: {one_line(exc)}") from None
    return overrides


class FlowParams(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)  # defaults are paths to resolve too

    @classmethod
    def parse(cls, values: dict[str, Any]) -> Self:
        """The validated parameters, or ``ParameterError`` in one line naming every bad one."""
        try:
            return cls(**values)
        except ValidationError as error:
            raise ParameterError(f"bad flow parameters: {one_line(error)}") from None


def flow_parameters(model: type[FlowParams]) -> Callable[[Callable], Callable]:
    """Give ``fn(**values)`` the signature of ``model``'s fields (keyword-only, with their types, defaults and,
    as the docstring's ``Args:``, descriptions), which is what Prefect builds a flow's parameter schema, its
    deployment form and its ``--params`` validation from: the parameters and their defaults are written once,
    in the model, and the flow body calls ``model.parse(values)``."""

    def decorate(fn: Callable) -> Callable:
        parameters, described = [], []
        for name, field in model.model_fields.items():
            default = inspect.Parameter.empty if field.is_required() else field.get_default(call_default_factory=True)
            parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                                annotation=field.annotation))
            described.append(f"    {name}: {' '.join((field.description or name).split())}")
        fn.__signature__ = inspect.Signature(parameters, return_annotation=inspect.signature(fn).return_annotation)
        fn.__doc__ = f"{inspect.cleandoc(fn.__doc__ or '')}\n\nArgs:\n" + "\n".join(described)
        return fn

    return decorate


class CurateParams(FlowParams):
    sources: list[str] = Field(min_length=1, description="image folders with captions, Parquet files, WebDataset "
                               "tars (relative paths inside the data root)")
    run_dir: str = Field("data/runs/quality-set", description="where every stage writes its files (inside the data "
                         "root; one run at a time)")
    config: str | None = Field(None, description="pipeline YAML; default configs/pipeline.yaml")
    pool_size: int | None = Field(None, ge=1, description="the automatic pool's size (Emu: ~200K); default from config")
    generalist_target: int = Field(20_000, ge=1, description="images the generalist round keeps (Emu: ~20K)")
    specialist_target: int = Field(2_000, ge=1, description="images the specialist round keeps (Emu: ~2K)")
    annotator_mode: Literal["people", "simulated"] = Field(
        "people", description="people: wait for annotators in Label Studio; simulated: demo/test mode answering by a fixed rule"
    )
    round_timeout_s: int = Field(7 * 24 * 3600, ge=60, description="how long a suspended round may wait for people")
    backend: Literal["ray", "local"] = Field(
        "ray", description="where ingest and the scorers run: ray (RAY_ADDRESS's cluster or a local Ray) or local (this machine: a process pool for ingest, in-process scoring)")
    learned_order: bool = Field(False, description="after the generalist round, learn a keep-probability from its "
                                "votes (annotation/active.py) and import the specialist round's likely keeps first; "
                                "a head that does not beat a constant leaves the pool's order")
    train: bool = Field(False, description="start the train-qt flow on the curated set at the end")
    preset: str = Field("tiny", description="model preset for training (tiny, mid, sd15, ...; model/presets)")
    train_overrides: list[str] = Field(default_factory=list, description="preset fields to override, as key=value")
    evaluate: bool = Field(False, description="after training, start the evaluate/ab-test deployment: the quality-tuned "
                           "checkpoint against its base, KID against the curated set, A/B rounds by the same annotators")
    eval_params: dict[str, Any] = Field(default_factory=dict, description="evaluate flow parameters to set "
                                        "(n_prompts, seeds, steps, criteria, votes_per_pair, ...)")

    @field_validator("sources")
    @classmethod
    def _sources_exist(cls, sources: list[str]) -> list[str]:
        import glob

        resolved = [str(data_path(s)) for s in sources]
        missing = [s for s, r in zip(sources, resolved) if not Path(r).exists() and not glob.glob(r)]
        if missing:
            raise ValueError(f"no such source: {', '.join(missing)} (relative paths are taken inside the data root "
                             f"{data_root()})")
        return resolved

    @field_validator("run_dir")
    @classmethod
    def _run_dir_inside(cls, run_dir: str) -> str:
        return str(output_dir(run_dir))

    _train_overrides_load = field_validator("train_overrides")(_training_config)

    @field_validator("config")
    @classmethod
    def _config_valid(cls, config: str | None) -> str | None:
        from pipeline.config import ConfigError, load_config

        try:
            load_config(config)
        except ConfigError as exc:
            raise ValueError(one_line(exc)) from None
        return config

    @model_validator(mode="after")
    def _consistent(self) -> CurateParams:
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


class TrainParams(FlowParams):
    data_dir: str | None = Field(None, description="curated set (imagefolder or Parquet); default: the latest one "
                                 "under the data root")
    out_dir: str = Field("data/train-qt", description="checkpoints, sample grids, TensorBoard logs (inside the data "
                         "root; one run at a time)")
    preset: str = Field("tiny", description="tiny (CPU), mid, sd15 (GPU), ... (model/presets)")
    overrides: list[str] = Field(default_factory=list, description="preset fields to override, as key=value")

    @field_validator("data_dir")
    @classmethod
    def _data_dir_exists(cls, data_dir: str | None) -> str | None:
        if data_dir is None:
            return None
        path = data_path(data_dir)
        if not path.exists():
            raise ValueError(f"no curated set at {path}")
        return str(path)

    @field_validator("out_dir")
    @classmethod
    def _out_dir_inside(cls, out_dir: str) -> str:
        return str(output_dir(out_dir))

    _overrides_load = field_validator("overrides")(_training_config)


class EvalParams(FlowParams):
    """Did quality-tuning help? Generations of every checkpoint on the same prompts and seeds, the automatic
    judges, then human A/B rounds of each candidate against the baseline (Emu §4)."""

    checkpoints: dict[str, str] = Field(
        min_length=2, description="label -> diffusers pipeline folder; every one but the baseline is a candidate")
    baseline: str = Field("base", description="the label of the checkpoint the candidates are compared against")
    run_dir: str = Field("data/runs/eval", description="where generations, judges, A/B rounds and the report go "
                         "(inside the data root; one run at a time)")
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
        resolved = {label: str(data_path(path)) for label, path in checkpoints.items()}
        bad = [f"{label}={path}" for label, path in checkpoints.items()
               if not (Path(resolved[label]) / "model_index.json").is_file()]
        if bad:
            raise ValueError(f"not a diffusers pipeline folder (no model_index.json): {', '.join(bad)}")
        return resolved

    @field_validator("run_dir")
    @classmethod
    def _run_dir_inside(cls, run_dir: str) -> str:
        return str(output_dir(run_dir))

    @field_validator("reference")
    @classmethod
    def _reference_path(cls, reference: str | None) -> str | None:
        return None if reference is None else str(data_path(reference))

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
