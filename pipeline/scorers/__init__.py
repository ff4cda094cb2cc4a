"""Every scorer the pipeline knows, by name. A config's ``scorers:`` section lists names from here
(in the order they run) with each scorer's options.

Each scorer lives in its own module, defines ``Options`` (a pydantic model, unknown keys rejected) and
is built as ``cls(options)``. Modules import their heavy libraries (torch, easyocr, open_clip) inside
``setup()`` so building the chain and validating a config stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from pipeline.scorer import Scorer, ScorerError

#: name -> "module:Class"
REGISTRY: dict[str, str] = {
    "size": "pipeline.scorers.size:SizeScorer",
    "phash": "pipeline.scorers.phash:PHashScorer",
    "technical": "pipeline.scorers.technical:TechnicalScorer",
    "ocr": "pipeline.scorers.ocr:OcrScorer",
    "clip": "pipeline.scorers.clip:ClipScorer",
    "aesthetic": "pipeline.scorers.aesthetic:AestheticScorer",
    "concept": "pipeline.scorers.concept:ConceptScorer",
    "nsfw": "pipeline.scorers.nsfw:NsfwScorer",
}


def scorer_class(name: str) -> type[Scorer]:
    if name not in REGISTRY:
        raise ScorerError(f"unknown scorer {name!r}; known: {sorted(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_scorer(name: str, options: Mapping[str, Any] | None = None) -> Scorer:
    cls = scorer_class(name)
    return cls(cls.Options(**(options or {})))


def build_chain(spec: Mapping[str, Mapping[str, Any] | None]) -> list[Scorer]:
    """``{"size": {}, "phash": {"hash_size": 8}}`` -> scorers in that order."""
    return [build_scorer(name, opts) for name, opts in spec.items()]
