"""The scorer interface every automatic filter implements.

A scorer declares what it reads (``input_columns``), what it writes (``output_fields``, Arrow types),
what it needs to run (``resources``) and loads anything heavy in ``setup()``, once per worker.
It only *scores*: it returns new columns for every row and never drops one, so thresholds live in
selection (pipeline/select.py) and can be re-tuned without re-scoring.

The engine (pipeline/engine.py) runs the same scorer objects on Ray Data or in-process.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar, Mapping, Sequence

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from pipeline.errors import UserError


@dataclass(frozen=True)
class Resources:
    """What one worker of this scorer needs. Fractions of a CPU are allowed (and needed on small
    machines: an actor pool that takes every CPU starves Ray Data's read tasks)."""

    num_cpus: float = 0.5
    num_gpus: float = 0.0
    batch_size: int = 256
    max_workers: int | None = None  # cap on the actor pool; None = as many as the CPUs allow


class ScorerOptions(BaseModel):
    """Base of every scorer's options (its section of the config): unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ScorerError(UserError):
    """A scorer was built or called wrongly (bad output, missing column, missing weights)."""


class Scorer(abc.ABC):
    name: ClassVar[str]
    input_columns: ClassVar[tuple[str, ...]]
    output_fields: ClassVar[tuple[pa.Field, ...]]
    resources: Resources = Resources()
    #: True when setup() loads a model: the engine runs it in an actor pool (setup once per actor).
    #: False for pure functions of the batch (setup() is never called): the engine fuses them into
    #: Ray Data's read tasks.
    stateful: ClassVar[bool] = False
    Options: ClassVar[type[ScorerOptions]] = ScorerOptions

    def __init__(self, options: ScorerOptions | None = None) -> None:
        # Only light state here: the object is pickled to every Ray worker before setup() runs.
        self.options = options if options is not None else self.Options()

    def setup(self) -> None:
        """Load weights and other heavy state. Called once per worker before the first batch."""

    @abc.abstractmethod
    def score(self, batch: pa.RecordBatch) -> Mapping[str, pa.Array | Sequence]:
        """Return one array per output field, each as long as ``batch``."""

    # -- owned by the base class ---------------------------------------------------------------
    @classmethod
    def output_names(cls) -> list[str]:
        return [f.name for f in cls.output_fields]

    def __call__(self, batch: pa.RecordBatch | pa.Table) -> pa.Table:
        """Score ``batch`` and return it with this scorer's columns appended (or replaced)."""
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        missing = [c for c in self.input_columns if c not in table.column_names]
        if missing:
            raise ScorerError(f"scorer {self.name!r} needs columns {missing}; got {table.column_names}")
        if table.num_rows == 0:
            columns = {f.name: pa.array([], type=f.type) for f in self.output_fields}
        else:
            columns = self.score(table.combine_chunks().to_batches()[0])
        for field in self.output_fields:
            if field.name not in columns:
                raise ScorerError(f"scorer {self.name!r} did not return column {field.name!r}")
            values = columns[field.name]
            array = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values, type=field.type)
            if array.type != field.type:
                array = array.cast(field.type)
            if len(array) != table.num_rows:
                raise ScorerError(
                    f"scorer {self.name!r} returned {len(array)} values for {field.name!r}, batch has {table.num_rows}"
                )
            index = table.schema.get_field_index(field.name)
            if index >= 0:
                table = table.set_column(index, field, array)
            else:
                table = table.append_column(field, array)
        return table


def check_chain(scorers: Sequence[Scorer], available: Sequence[str]) -> list[str]:
    """Check every scorer's inputs exist in ``available`` or an earlier scorer's outputs.

    Returns the ingest columns the chain reads (so the engine reads only those)."""
    produced: set[str] = set()
    needed: list[str] = []
    names = [s.name for s in scorers]
    if len(set(names)) != len(names):
        raise ScorerError(f"scorer names repeat: {names}")
    for scorer in scorers:
        for column in scorer.input_columns:
            if column in produced:
                continue
            if column not in available:
                raise ScorerError(
                    f"scorer {scorer.name!r} reads {column!r}, which neither the input nor an earlier scorer provides"
                )
            if column not in needed:
                needed.append(column)
        produced.update(scorer.output_names())
    return needed
