"""The two human curation rounds of Emu (section 3.3, "Human Filtering"), as data.

A round is what Label Studio shows (label config XML and guideline HTML, both files in
``annotation/rounds/``), how many annotators see each task (``overlap``), how their answers become one
decision (``consensus``), how many images it should keep (``target_size``) and which image it shows.

- generalist: 200K -> 20K, optimises *recall*: keep when any annotator keeps (or k of n).
- specialist: 20K -> 2K, optimises *precision*: keep only when all (or most) select, and the specialist
  writes the caption the curated set is trained on.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.errors import UserError

ROUNDS_DIR = Path(__file__).resolve().parent / "rounds"

#: Label Studio control tags we read answers from, and the key of their value in a result.
CONTROL_VALUE_KEYS = {"Choices": "choices", "Rating": "rating", "TextArea": "text"}


class AnnotationError(UserError):
    """A round, a pool or an annotation result that cannot be used, with the reason."""


class ConsensusRule(BaseModel):
    """How the decisions of the annotators of one task become the round's decision.

    ``any`` keeps when at least one annotator says yes (recall), ``all`` only when every one does
    (precision), ``majority`` when more than half do, ``at_least`` when ``k`` or more do.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["any", "all", "majority", "at_least"]
    k: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _k_only_for_at_least(self) -> ConsensusRule:
        if (self.kind == "at_least") != (self.k is not None):
            raise ValueError("k is required for kind 'at_least' and only allowed there")
        return self

    def keeps(self, n_positive: int, n_votes: int) -> bool:
        if n_votes == 0:
            return False
        if self.kind == "any":
            return n_positive >= 1
        if self.kind == "all":
            return n_positive == n_votes
        if self.kind == "majority":
            return 2 * n_positive > n_votes
        return n_positive >= self.k  # type: ignore[operator]


class Control(BaseModel):
    """One question of a label config: its name, Label Studio tag, target and allowed values."""

    model_config = ConfigDict(frozen=True)

    name: str
    tag: Literal["Choices", "Rating", "TextArea"]
    to_name: str
    required: bool
    choices: tuple[str, ...] = ()
    max_rating: int | None = None

    @property
    def result_type(self) -> str:
        return self.tag.lower()

    @property
    def value_key(self) -> str:
        return CONTROL_VALUE_KEYS[self.tag]


class RoundFiles:
    """The label config and annotator guideline a round (or A/B criterion) names by file, read from
    annotation/rounds/ (mixed into pydantic models with ``label_config_file`` and ``guideline_file``)."""

    @property
    def label_config(self) -> str:
        return (ROUNDS_DIR / self.label_config_file).read_text()

    @property
    def guideline(self) -> str:
        return (ROUNDS_DIR / self.guideline_file).read_text()


class Round(RoundFiles, BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    name: str
    label_config_file: str  # under annotation/rounds/
    guideline_file: str  # HTML shown in Label Studio's instructions panel
    overlap: int = Field(ge=1)  # annotators per task (Label Studio's maximum_annotations)
    consensus: ConsensusRule
    target_size: int = Field(ge=1)
    decision_field: str = "decision"
    positive_value: str  # the decision_field value that means "keep"
    #: numeric answers averaged into the rank used when more than target_size pass
    rank_fields: tuple[str, ...] = ()
    #: the free-text answer that replaces the pool caption (specialist), or None
    caption_field: str | None = None
    #: "thumbnail": the pool's small JPEG (fast, for quick keep/reject); "original": the full image
    image_source: Literal["thumbnail", "original"] = "thumbnail"
    #: how many of the next photos each task loads ahead (needs a ``preload`` HyperText in the config)
    preload_next: int = Field(default=0, ge=0)
    #: annotators whose accuracy on gold tasks is below this are flagged and their answers excluded
    min_gold_accuracy: float = Field(default=0.5, ge=0.0, le=1.0)
    exclude_flagged_annotators: bool = True

    @cached_property
    def controls(self) -> dict[str, Control]:
        return read_controls(self.label_config)

    @model_validator(mode="after")
    def _fields_exist_in_config(self) -> Round:
        controls = self.controls
        for field in (self.decision_field, *self.rank_fields, *([self.caption_field] if self.caption_field else [])):
            if field not in controls:
                raise ValueError(f"round {self.name!r}: {field!r} is not a control of {self.label_config_file}")
        if self.positive_value not in controls[self.decision_field].choices:
            raise ValueError(f"round {self.name!r}: {self.positive_value!r} is not a choice of {self.decision_field!r}")
        for field in self.rank_fields:
            if controls[field].tag != "Rating":
                raise ValueError(f"round {self.name!r}: rank field {field!r} must be a Rating")
        return self

    # -- answers <-> Label Studio results --------------------------------------------------------
    def answers_from_result(self, result: list[dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
        return answers_from_result(self.controls, result)

    def result_from_answers(self, answers: dict[str, Any]) -> list[dict[str, Any]]:
        return result_from_answers(self.controls, answers, f"round {self.name!r}")


def read_controls(label_config: str) -> dict[str, Control]:
    """The questions of a label config, read from the XML so the file stays the one source."""
    controls = {}
    for element in ET.fromstring(label_config).iter():
        if element.tag not in CONTROL_VALUE_KEYS:
            continue
        name = element.attrib["name"]
        controls[name] = Control(
            name=name,
            tag=element.tag,
            to_name=element.attrib["toName"],
            required=element.attrib.get("required", "false") == "true",
            choices=tuple(c.attrib["value"] for c in element.iter("Choice")),
            max_rating=int(element.attrib.get("maxRating", 5)) if element.tag == "Rating" else None,
        )
    return controls


def answers_from_result(controls: dict[str, Control], result: list[dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    """Label Studio's result list -> ``{question: value}`` and the required questions left unanswered.

    Choices give one string (all our choices are single), Ratings an int, TextAreas the joined text.
    """
    answers: dict[str, Any] = {}
    for region in result:
        control = controls.get(region.get("from_name", ""))
        if control is None:
            continue
        value = (region.get("value") or {}).get(control.value_key)
        if control.tag == "Choices" and value:
            answers[control.name] = value[0]
        elif control.tag == "Rating" and value is not None:
            answers[control.name] = int(value)
        elif control.tag == "TextArea" and value:
            text = " ".join(str(v).strip() for v in value).strip()
            if text:
                answers[control.name] = text
    missing = [c.name for c in controls.values() if c.required and c.name not in answers]
    return answers, missing


def result_from_answers(controls: dict[str, Control], answers: dict[str, Any], owner: str) -> list[dict[str, Any]]:
    """``{question: value}`` -> a Label Studio result list, as the labeling UI would submit it."""
    result = []
    for name, value in answers.items():
        if name not in controls:
            raise AnnotationError(f"{owner} has no question {name!r}")
        control = controls[name]
        if control.tag == "Choices":
            if value not in control.choices:
                raise AnnotationError(f"{value!r} is not a choice of {name!r} of {owner}: {control.choices}")
            payload: Any = [value]
        elif control.tag == "Rating":
            payload = int(value)
        else:
            payload = [str(value)]
        result.append(
            {
                "from_name": name,
                "to_name": control.to_name,
                "type": control.result_type,
                "value": {control.value_key: payload},
            }
        )
    return result


GENERALIST = Round(
    name="generalist",
    label_config_file="generalist.xml",
    guideline_file="generalist.html",
    overlap=2,
    consensus=ConsensusRule(kind="any"),
    target_size=20_000,
    positive_value="keep",
    image_source="thumbnail",
    preload_next=3,
)

SPECIALIST = Round(
    name="specialist",
    label_config_file="specialist.xml",
    guideline_file="specialist.html",
    overlap=2,
    consensus=ConsensusRule(kind="all"),
    target_size=2_000,
    positive_value="select",
    rank_fields=("composition", "lighting", "color_contrast", "subject_background"),
    caption_field="caption",
    image_source="original",
)

ROUNDS: dict[str, Round] = {r.name: r for r in (GENERALIST, SPECIALIST)}


def get_round(name: str, **overrides: Any) -> Round:
    """A round by name, with fields replaced (e.g. ``target_size`` for a small demo)."""
    if name not in ROUNDS:
        raise AnnotationError(f"unknown round {name!r}; known: {sorted(ROUNDS)}")
    base = ROUNDS[name]
    if not overrides:
        return base
    return Round(**{**base.model_dump(), **overrides})
