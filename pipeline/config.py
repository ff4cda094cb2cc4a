"""The pipeline's YAML config: validated, with errors that name the key.

One source of truth: the defaults live in the models below (each field's description is its
documentation). ``configs/pipeline.yaml`` is rendered from them by ``python -m pipeline.config``
and a test keeps it equal to the rendering, so the file users copy and edit never drifts from the
code. ``load_config(None)`` returns the defaults; a user's file overrides any subset of keys, except
``scorers``, which is replaced as a whole (it is an ordered list of what runs: merging could never
remove a scorer).

Every automatic filter is declared once, in ``THRESHOLD_FILTERS``: its config key is also the drop
reason selection writes, so a funnel row points straight at the line of config that caused it.
"""

from __future__ import annotations

import difflib
import io
import math
import sys
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from pipeline import schema
from pipeline.errors import UserError


class ConfigError(UserError, ValueError):
    """The config cannot be used; the message names the key path and what is wrong with it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- filters ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThresholdFilter:
    """One automatic filter: rows pass when ``column <op> threshold``.

    ``name`` is the config key under ``filters:`` and the drop reason. A null score (the scorer could
    not score the row, e.g. an empty caption has no CLIP score) fails the filter with
    ``null_reason`` unless ``null_passes``: each filter documents why in ``null_policy``.
    """

    name: str
    column: str
    op: Literal[">=", "<="]
    null_passes: bool
    null_policy: str
    description: str
    default: float | int | None
    type: type = float
    bounds: Mapping[str, float] | None = None

    @property
    def null_reason(self) -> str:
        return f"{self.column}_null"


# Declaration order is the order drop reasons are attributed in (drop_reason = first failing filter):
# cheap header facts first, then pixel statistics (contrast before sharpness: washing an image out also
# flattens its Laplacian, so low contrast is the cause to name), then the model scores.
THRESHOLD_FILTERS: tuple[ThresholdFilter, ...] = (
    ThresholdFilter(
        "min_side", schema.MIN_SIDE, ">=", False, "a row of unknown size cannot be trusted",
        "shortest side in pixels. 192 lets 256-px training (aspect buckets of 256x256 area: a 1:2 bucket "
        "is 181 px short) upscale by at most 1.33x; raise to 512/1024 for high-resolution training",
        192, int, {"ge": 1},
    ),
    ThresholdFilter(
        "max_aspect_ratio", schema.ASPECT_RATIO, "<=", False, "a row of unknown size cannot be trusted",
        "max(w/h, h/w); extreme crops (banners, strips) do not fit training buckets",
        3.0, float, {"ge": 1.0},
    ),
    ThresholdFilter(
        "min_megapixels", schema.MEGAPIXELS, ">=", False, "a row of unknown size cannot be trusted",
        "width x height / 1e6", None, float, {"gt": 0.0},
    ),
    ThresholdFilter(
        "min_contrast", schema.CONTRAST, ">=", False, "an undecodable thumbnail is no evidence of quality",
        "RMS contrast (std of grey level, 0-1): washed-out images score below ~0.06, ordinary photos above ~0.08",
        0.07, float, {"ge": 0.0, "le": 1.0},
    ),
    ThresholdFilter(
        "min_sharpness", schema.SHARPNESS, ">=", False, "an undecodable thumbnail is no evidence of quality",
        "variance of the Laplacian x 1000 at 256 px (technical scorer): blurred photos score below ~0.3, "
        "naturally smooth but sharp ones (a retina scan, a clear sky) above ~1",
        0.5, float, {"ge": 0.0},
    ),
    ThresholdFilter(
        "max_nsfw", schema.NSFW_SCORE, "<=", False, "offensive-content removal must err on the safe side",
        "probability of offensive content (0-1)", 0.5, float, {"ge": 0.0, "le": 1.0},
    ),
    ThresholdFilter(
        "max_ocr_words", schema.OCR_WORD_COUNT, "<=", False, "a failed OCR cannot show the image is free of text",
        "words of overlaid text found by OCR (Emu's OCR word-count filter)", 5, int, {"ge": 0},
    ),
    ThresholdFilter(
        "max_ocr_text_area", schema.OCR_TEXT_AREA, "<=", False, "a failed OCR cannot show the image is free of text",
        "fraction of the image covered by text boxes (0-1)", 0.1, float, {"ge": 0.0, "le": 1.0},
    ),
    ThresholdFilter(
        "min_clip_score", schema.CLIP_SCORE, ">=", False,
        "a pair without a caption (the usual cause) teaches text-to-image nothing",
        "cosine similarity of CLIP image and caption embeddings times scorers.clip.scale (LAION-5B kept "
        "cosine >= 0.28; with scale 100, DataComp's convention, write 28)",
        0.28, float, None,
    ),
    ThresholdFilter(
        "min_aesthetic", schema.AESTHETIC_SCORE, ">=", False, "an unscored image has no evidence of appeal",
        "LAION improved aesthetic predictor, ~1-10 (LAION-Aesthetics used 5, 6, 6.5)", 5.0, float, None,
    ),
    ThresholdFilter(
        "min_engagement", schema.ENGAGEMENT, ">=", True,
        "most sources carry no likes and a missing signal is no evidence against the image",
        "likes/favourites when the source has them (Emu's 'proprietary signals'); source-specific scale",
        None, float, {"ge": 0.0},
    ),
)

FILTERS_BY_NAME = {f.name: f for f in THRESHOLD_FILTERS}
NEAR_DUPLICATES = "near_duplicates"  # drop reason of a near-duplicate that is not its group's representative
BALANCE_QUOTA = "balance_quota"  # drop reason of a row cut by the domain-balanced target size
SEMANTIC_DUPLICATES = "semantic_duplicates"  # drop reason of a SemDeDup near-duplicate (pipeline/semdedup.py)


_NEAR_DUPLICATE_FIELDS: dict[str, Any] = {
    NEAR_DUPLICATES: (
        bool,
        Field(
            True,
            description="keep one representative per group of perceptually near-identical images (pHash) "
            "among the rows that pass the thresholds above; the representative is the best by "
            "balance.rank_by, then the larger image, then the smaller id",
        ),
    ),
    "near_duplicate_max_distance": (
        int,
        Field(
            6,
            ge=0,
            le=10,
            description="Hamming distance (of 64 pHash bits) up to which two images are near-duplicates: "
            "re-encodes, resizes and slight crops of one photo land within ~6, different photos far above. "
            "The exact search grows steeply with it: for 200,000 rows passing the thresholds, 6 takes "
            "~0.5 s, 8 ~2 s, 10 ~11 s on two cores",
        ),
    ),
    SEMANTIC_DUPLICATES: (
        float | None,
        Field(
            None,
            gt=0.0,
            le=1.0,
            description="SemDeDup (Abbas et al. 2023) on the stored CLIP image embeddings: among the rows "
            "that pass the thresholds and pHash, drop a row whose cosine similarity to a better-ranked row "
            "of its k-means cluster reaches this value (the same scene shot twice, crops and edits pHash "
            "misses; the paper removes up to half of LAION with little loss). Null turns it off; skipped when "
            "the clip scorer did not run",
        ),
    ),
    "semantic_duplicate_clusters": (
        int | None,
        Field(
            None,
            ge=1,
            description="k-means clusters for the semantic dedup; null: one per ~1,000 rows compared",
        ),
    ),
}


def _threshold_field(f: ThresholdFilter) -> tuple[Any, Any]:
    kind = StrictInt if f.type is int else float
    description = f"{f.description}. Kept when {f.column} {f.op} threshold. Null {f.column}: " + (
        f"passes, as {f.null_policy}" if f.null_passes else f"dropped as {f.null_reason}, as {f.null_policy}"
    )
    return (kind | None, Field(f.default, description=description, **(f.bounds or {})))


FiltersConfig = create_model(
    "FiltersConfig",
    __base__=_Section,
    __doc__="Thresholds of the automatic filters (null turns a filter off). A filter whose score column "
    "is absent from the scored table is skipped, and the report lists it as skipped.",
    **{f.name: _threshold_field(f) for f in THRESHOLD_FILTERS},
    **_NEAR_DUPLICATE_FIELDS,
)


# --- other sections --------------------------------------------------------------------------------


class IngestConfig(_Section):
    """How sources become ingest shards."""

    shard_rows: int = Field(10_000, ge=1, description="rows per ingest shard (one scoring task each)")
    thumbnail_size: int = Field(
        schema.THUMBNAIL_SIZE, ge=32, le=4096, description="longest side of the stored thumbnail every scorer reads"
    )


def _quota_rows(quota: float, target_size: int) -> int:
    """A quota as rows: an integer is a count, a float a fraction of the target (rounded down)."""
    return quota if isinstance(quota, int) else math.floor(quota * target_size)


class BalanceConfig(_Section):
    """The domain-balanced cut to the pool size (Emu balances domains with visual concept classification)."""

    target_size: int | None = Field(
        200_000, ge=1, description="rows in the pool after balancing; null keeps every row that passes the filters"
    )
    quotas: dict[str, StrictInt | StrictFloat] = Field(
        default_factory=dict,
        description="concept -> share of target_size: a fraction (float <= 1.0) or a row count (integer). "
        "Concepts without a quota share what is left equally; a concept short of its quota gives the surplus "
        "to the others in proportion to their quotas (water-filling)",
    )
    rank_by: str = Field(
        schema.AESTHETIC_SCORE,
        description="score (higher is better) that ranks rows inside each concept and picks near-duplicate representatives",
    )
    rank_fallback: list[str] = Field(
        default_factory=lambda: [schema.SHARPNESS, schema.MEGAPIXELS],
        description="used in this order when rank_by is absent from the scored table (e.g. no aesthetic scorer ran)",
    )

    @field_validator("quotas")
    @classmethod
    def _quotas_in_range(cls, quotas: dict[str, int | float], info: ValidationInfo) -> dict[str, int | float]:
        for concept, quota in quotas.items():
            if isinstance(quota, float) and not 0.0 <= quota <= 1.0:
                raise PydanticCustomError(
                    "quota_range",
                    "{concept}: a fraction must be within 0-1, got {quota}; write an integer for a row count",
                    {"concept": concept, "quota": quota},
                )
            if isinstance(quota, int) and quota < 0:
                raise PydanticCustomError("quota_range", "{concept}: a count must be >= 0, got {quota}",
                                          {"concept": concept, "quota": quota})
        target = info.data.get("target_size")  # validated first: it is declared first
        total = sum(_quota_rows(q, target or 0) for q in quotas.values())
        if target is not None and total > target:
            raise PydanticCustomError(
                "quota_sum", "quotas add up to {total} rows, more than target_size {target}", {"total": total, "target": target}
            )
        return quotas

    def quota_counts(self) -> dict[str, int]:
        """Each listed concept's quota as a row count of ``target_size`` (fractions rounded down)."""
        if self.target_size is None:
            return {}
        return {c: _quota_rows(q, self.target_size) for c, q in self.quotas.items()}


class ReportConfig(_Section):
    """What the HTML report shows."""

    contact_sheet_samples: int = Field(48, ge=1, le=1000, description="thumbnails per contact sheet")
    contact_sheet_cell: int = Field(160, ge=48, le=512, description="size of one contact-sheet cell in pixels")
    histogram_bins: int = Field(40, ge=5, le=500, description="bins per score histogram")


DEFAULT_SCORERS: tuple[str, ...] = ("size", "phash", "technical")


def _scorers_model(names: list[str]) -> type[BaseModel]:
    from pipeline.scorer import ScorerError
    from pipeline.scorers import REGISTRY, scorer_class

    fields: dict[str, Any] = {}
    for name in names:
        try:
            fields[name] = (scorer_class(name).Options, ...)
        except ScorerError:
            hint = difflib.get_close_matches(name, REGISTRY, n=1)
            raise PydanticCustomError(
                "unknown_scorer",
                "unknown scorer {name}{hint}; known: {known}",
                {"name": name, "hint": f" (did you mean {hint[0]}?)" if hint else "", "known": ", ".join(REGISTRY)},
            ) from None
    return create_model("ScorersConfig", __config__=ConfigDict(extra="forbid"), **fields)


class PipelineConfig(_Section):
    """The whole pipeline: what to ingest, which scorers run, the thresholds, the balance, the report."""

    ingest: IngestConfig = Field(default_factory=IngestConfig)
    scorers: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {name: {} for name in DEFAULT_SCORERS},
        validate_default=True,
        description="scorers in the order they run, each with its options (see pipeline/scorers/)",
    )
    filters: FiltersConfig = Field(default_factory=FiltersConfig)  # type: ignore[valid-type]
    balance: BalanceConfig = Field(default_factory=BalanceConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)

    @model_validator(mode="after")
    def _clip_threshold_in_scale(self) -> PipelineConfig:
        """A cosine is within [-1, 1], times the clip scorer's ``scale``: 28 with scale 1 (or 0.28 with
        scale 100) is a unit mix-up that would silently drop (or keep) everything."""
        threshold = self.filters.min_clip_score
        scale = float(self.scorers.get("clip", {}).get("scale", 1.0))
        if threshold is not None and abs(threshold) > scale:
            raise PydanticCustomError(
                "clip_scale",
                "filters.min_clip_score {threshold} is outside the CLIP score's range +-{scale} "
                "(scorers.clip.scale = {scale}): a cosine threshold like 0.28 is 28 at scale 100",
                {"threshold": threshold, "scale": scale},
            )
        return self

    @model_validator(mode="after")
    def _one_clip(self) -> PipelineConfig:
        """The aesthetic and concept scorers read the clip scorer's stored embeddings: they must be made for
        that CLIP (same-width embeddings of another CLIP would be scored silently and wrongly)."""
        clip = self.scorers.get("clip")
        if clip is None:
            return self
        from pipeline.scorers.aesthetic import head_clip_mismatch

        problem = None
        if "aesthetic" in self.scorers:
            problem = head_clip_mismatch(self.scorers["aesthetic"]["head"], clip["model"], clip["pretrained"])
        concept = self.scorers.get("concept")
        if problem is None and concept is not None and concept["backend"] == "clip":
            keys = ("model", "pretrained", "checkpoint")
            if any(concept["clip"][k] != clip[k] for k in keys):
                problem = (f"scorers.concept.clip {[concept['clip'][k] for k in keys]} is not the CLIP the clip "
                           f"scorer runs {[clip[k] for k in keys]}: concepts are read from its embeddings")
        if problem is not None:
            raise PydanticCustomError("clip_mismatch", "{problem}", {"problem": problem})
        return self

    @field_validator("scorers", mode="before")
    @classmethod
    def _validate_scorers(cls, value: Any) -> Any:
        """Each scorer owns its options: validate them with its own ``Options`` model, so a typo in a
        scorer's option is an error naming ``scorers.<name>.<option>``. An empty entry means defaults."""
        if not isinstance(value, Mapping):
            return value  # the dict type check reports it
        normalised = {name: ({} if opts is None else opts) for name, opts in value.items()}
        options = _scorers_model(list(normalised)).model_validate(normalised)
        return {name: getattr(options, name).model_dump(mode="json") for name in normalised}


# --- loading ---------------------------------------------------------------------------------------


def _key_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc)


def _format_error(error: Mapping[str, Any]) -> str:
    loc = tuple(error["loc"])
    if error["type"] == "extra_forbidden":
        message = f"unknown key {_key_path(loc)}"
        known = _known_keys(loc[:-1])
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
        return message + (f" (did you mean {hint[0]}?)" if hint else f"; known keys: {', '.join(known)}" if known else "")
    message = error["msg"]
    if error["type"] not in ("missing", "unknown_scorer", "quota_range", "quota_sum", "clip_scale") and "input" in error:
        message += f", got {error['input']!r}"
    return f"{_key_path(loc)}: {message}" if loc else message


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed at ``loc`` (for "did you mean" hints)."""
    if loc[:1] == ("scorers",):
        if len(loc) != 2:
            return []
        from pipeline.scorer import ScorerError
        from pipeline.scorers import scorer_class

        try:
            return list(scorer_class(str(loc[1])).Options.model_fields)
        except ScorerError:
            return []
    model: Any = PipelineConfig
    for part in loc:
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        model = field.annotation
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def parse_config(data: Mapping[str, Any] | None, source: str = "<config>") -> PipelineConfig:
    """Validate a config mapping (as read from YAML); raise ConfigError naming every bad key."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the config must be a mapping of sections, got {type(data).__name__}")
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        errors = [_format_error(e) for e in exc.errors()]
        raise ConfigError(f"{source}: " + "; ".join(errors)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error: the plain loader
    keeps the last value silently, so an edited threshold could be shadowed by a forgotten copy."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path | None = None) -> PipelineConfig:
    """Read and validate a pipeline YAML; None gives the defaults (= configs/pipeline.yaml)."""
    if path is None:
        return parse_config({}, "<defaults>")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such config file: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # a SafeLoader: no object tags
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc}") from None
    except OSError as exc:  # no permission to read it
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    return parse_config(data, str(path))


# --- rendering the documented default file ----------------------------------------------------------


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def _comment(text: str, out: io.StringIO, indent: str) -> None:
    out.writelines(f"{indent}# {line}\n" for line in textwrap.wrap(text, width=100 - len(indent) - 2))


def _first_sentence(doc: str | None) -> str:
    paragraph = " ".join((doc or "").strip().split("\n\n")[0].split())
    return paragraph.split(". ")[0].rstrip(".") + "." if paragraph else ""


def _render_model(model: BaseModel, out: io.StringIO, indent: str) -> None:
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if field.description:
            _comment(field.description, out, indent)
        if isinstance(value, BaseModel):
            out.write(f"{indent}{name}:\n")
            _render_model(value, out, indent + "  ")
        else:
            out.write(f"{indent}{name}: {_yaml_value(value)}\n")


def _render_scorers(scorers: Mapping[str, Mapping[str, Any]], out: io.StringIO, indent: str) -> None:
    from pipeline.scorers import scorer_class

    for name, options in scorers.items():
        _comment(_first_sentence(sys.modules[scorer_class(name).__module__].__doc__), out, indent)
        if not options:
            out.write(f"{indent}{name}: {{}}\n")
            continue
        out.write(f"{indent}{name}:\n")
        fields = scorer_class(name).Options.model_fields
        for key, value in options.items():
            if fields[key].description:
                _comment(fields[key].description, out, indent + "  ")
            out.write(f"{indent}  {key}: {_yaml_value(value)}\n")


def default_config_yaml() -> str:
    """The defaults as a commented YAML file (what ``configs/pipeline.yaml`` holds)."""
    out = io.StringIO()
    out.write(
        "# needles pipeline config: the defaults, rendered from pipeline/config.py by\n"
        "#   python -m pipeline.config > configs/pipeline.yaml\n"
        "# Copy it, edit it, pass it with --config. Leave a key out to keep its default; a `scorers:`\n"
        "# section replaces the default list as a whole. Unknown keys and bad values are errors.\n"
    )
    config = PipelineConfig()
    for name, field in PipelineConfig.model_fields.items():
        out.write("\n")
        _comment(field.description or " ".join((type(getattr(config, name)).__doc__ or "").split()), out, "")
        value = getattr(config, name)
        out.write(f"{name}:\n")
        if isinstance(value, BaseModel):
            _render_model(value, out, "  ")
        else:
            _render_scorers(value, out, "  ")
    return out.getvalue()


if __name__ == "__main__":
    sys.stdout.write(default_config_yaml())
