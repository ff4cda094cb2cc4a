"""Ingest's ``backend="ray"``: images are read and inspected (sha256 id, header, thumbnail) in Ray tasks,
one task per source unit, and the results come back to the driver in source order.

A source unit is a WebDataset tar shard (the task reads the tar itself), a Parquet row group (the task
reads that row group itself) or a chunk of a folder's files (the driver lists the folder and reads its
captions sidecar, as for the local backend; the task reads and inspects the files). At most
``max_in_flight`` tasks run or wait at a time and the driver takes their results oldest first, so the
memory held is bounded by a few units, never by the source, and ``pipeline.ingest.ingest`` writes the
same shards, quarantine and duplicates, row for row, as with the local process pool.

Exact duplicates are collapsed as a distributed step: the ids are hash-partitioned over
``dedup_partitions`` Ray actors, each holding the first (source, key) of the ids in its partition. The
driver sends each unit's ids, in source order, to their partitions and waits for the answers before the
next unit, so the first occurrence in source order is kept, as locally, while the map of every id seen
(the one structure that grows with the corpus) lives in the actors, spread over the cluster's nodes.

Paths (folder files, Parquet and tar sources, Parquet ``image_path`` columns) are opened by the workers:
on a multi-node cluster they must be on a filesystem every node mounts at the same path.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.ingest import (
    Item,
    Outcome,
    _chunks,
    _folder_items,
    _inspect,
    _jobs,
    _open_parquet,
    _parquet_items,
    _tar_items,
)

FOLDER_CHUNK_ITEMS = 64  # files per task: ~0.1 s of work per task, much more than Ray's per-task overhead
MAX_IN_FLIGHT: int | None = None  # tasks submitted and not yet consumed; None: twice the cluster's CPUs
DEDUP_PARTITIONS: int | None = None  # actors holding the ids seen; None: one per 16 cluster CPUs, 1 to 64
Owner = tuple[str, str]  # (source, source key) of the row an id was first seen in

Unit = tuple[Any, ...]  # ("folder", jobs) | ("parquet", path, row group, first row index) | ("tar", path)


def _units(sources: list[tuple[str, Path]], folder_chunk: int) -> Iterator[tuple[Unit, list[Item] | None]]:
    """(unit, the driver's items for a folder chunk or None) per unit, in source order."""
    for kind, path in sources:
        if kind == "folder":
            for chunk in _chunks(_folder_items(path), folder_chunk):
                yield ("folder", _jobs(chunk)), chunk
        elif kind == "parquet":
            metadata = _open_parquet(path)[0].metadata
            first = 0
            for group in range(metadata.num_row_groups):
                rows = metadata.row_group(group).num_rows
                if rows:
                    yield ("parquet", str(path), group, first), None
                first += rows
        else:
            yield ("tar", str(path)), None


def inspect_unit(unit: Unit, thumbnail_size: int) -> tuple[list[Item] | None, list[Outcome]]:
    """Runs in a Ray worker: read the unit (tar, Parquet row group) and inspect its images."""
    kind = unit[0]
    if kind == "folder":
        return None, [_inspect(data, path, problem, thumbnail_size) for data, path, problem in unit[1]]
    if kind == "parquet":
        items = list(_parquet_items(Path(unit[1]), row_group=unit[2], first_index=unit[3]))
    else:
        items = list(_tar_items(Path(unit[1])))
    return items, [_inspect(item.data, item.path, item.problem, thumbnail_size) for item in items]


class SeenIds:
    """A Ray actor: one hash partition of the ids seen so far, each with the row it was first seen in."""

    def __init__(self) -> None:
        self._first: dict[bytes, Owner] = {}

    def claim(self, ids: list[bytes], owners: list[Owner]) -> list[Owner | None]:
        """In order: the row that already holds each id, or None when this row is its first (and now
        holds it)."""
        answers: list[Owner | None] = []
        for raw_id, owner in zip(ids, owners, strict=True):
            first = self._first.setdefault(raw_id, owner)
            answers.append(None if first is owner else first)
        return answers

    def size(self) -> int:
        return len(self._first)


def inspected_on_ray(
    sources: list[tuple[str, Path]],
    thumbnail_size: int,
    *,
    folder_chunk: int | None = None,
    max_in_flight: int | None = None,
    dedup_partitions: int | None = None,
) -> Iterator[tuple[Item, Outcome, Owner | None]]:
    """(item, outcome, kept) for every input row, in source order, inspected in Ray tasks; ``kept`` is
    the (source, key) of the first row with the same id (the row is an exact duplicate), else None."""
    import ray

    from pipeline.engine import init_ray

    init_ray()
    cpus = int(ray.cluster_resources().get("CPU", 1))
    folder_chunk = folder_chunk or FOLDER_CHUNK_ITEMS
    # every CPU busy plus as many finished units waiting for the driver
    max_in_flight = max_in_flight or MAX_IN_FLIGHT or max(2, 2 * cpus)
    partitions = dedup_partitions or DEDUP_PARTITIONS or min(64, max(1, cpus // 16))
    task = ray.remote(num_cpus=1)(inspect_unit)
    # no CPU reserved: an actor answers a dict lookup per row and must not keep a task off a core
    seen = [ray.remote(num_cpus=0)(SeenIds).options(scheduling_strategy="SPREAD").remote() for _ in range(partitions)]
    pending: deque = deque()

    def claim(items: list[Item], outcomes: list[Outcome]) -> list[Owner | None]:
        batches: list[tuple[list[int], list[bytes], list[Owner]]] = [([], [], []) for _ in seen]
        for row, (item, (info, *_rest)) in enumerate(zip(items, outcomes, strict=True)):
            if info is not None:  # quarantined rows are never duplicates
                raw_id = bytes.fromhex(info.id)
                rows, ids, owners = batches[int.from_bytes(raw_id[:8], "big") % len(seen)]
                rows.append(row), ids.append(raw_id), owners.append((item.source, item.source_key))
        calls = [(rows, actor.claim.remote(ids, owners)) for actor, (rows, ids, owners) in zip(seen, batches) if rows]
        kept: list[Owner | None] = [None] * len(items)
        for rows, answers in calls:
            for row, answer in zip(rows, ray.get(answers), strict=True):
                kept[row] = None if answer is None else tuple(answer)
        return kept

    def collect(chunk: list[Item] | None, ref) -> Iterator[tuple[Item, Outcome, Owner | None]]:
        try:
            items, outcomes = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, UserError):  # e.g. a tar that is no tar: the same error as locally
                raise exc.cause from None
            raise
        items = chunk if items is None else items
        yield from zip(items, outcomes, claim(items, outcomes), strict=True)

    try:
        for unit, chunk in _units(sources, folder_chunk):
            pending.append((chunk, task.remote(unit, thumbnail_size)))
            while len(pending) >= max_in_flight:
                yield from collect(*pending.popleft())
        while pending:
            yield from collect(*pending.popleft())
    finally:  # an error or an abandoned generator: stop the work nobody will read
        for _chunk, ref in pending:
            ray.cancel(ref)
        for actor in seen:
            ray.kill(actor)
