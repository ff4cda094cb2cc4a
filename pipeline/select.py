"""Selection: thresholds, near-duplicate groups and the domain-balanced cut, as one pure function.

``select(table, config)`` gives every input row a verdict (SELECTION_SCHEMA): ``keep``, the first
failing filter in declaration order (``drop_reason``) and every failing filter (``drop_reasons``).
Steps, in order (each only sees the rows the previous steps kept):

1. thresholds: every filter in ``config.THRESHOLD_FILTERS`` whose threshold is set and whose score
   column exists (absent columns are skipped and recorded as such);
2. near-duplicates: rows whose 64-bit pHashes lie within ``near_duplicate_max_distance`` bits are
   grouped (connected components); each group keeps its best row by the ranking score;
3. the domain-balanced cut (Emu: "visual concept classification to balance domains") to
   ``balance.target_size``: per-concept quotas, water-filled, ranked inside each concept.

Everything is vectorised (numpy/pyarrow): a million rows take a few seconds on two cores.
``run_select(run_dir, config)`` is the stage around it: Parquet in (DuckDB), Parquet out.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from math import comb
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline import schema
from pipeline.config import (
    BALANCE_QUOTA,
    NEAR_DUPLICATES,
    SEMANTIC_DUPLICATES,
    THRESHOLD_FILTERS,
    ConfigError,
    PipelineConfig,
)
from pipeline.errors import UserError
from pipeline.layout import RunLayout

#: Key of the JSON summary ``select`` stores in the selection table's schema metadata (and so in
#: selection.parquet): which filters ran or were skipped, the ranking column, the per-concept balance.
METADATA_KEY = b"needles.selection"


class SelectError(UserError):
    """The run directory cannot be selected from (missing or incomplete stages)."""


@dataclass
class SelectStats:
    rows: int
    kept: int
    dropped: int
    dropped_by_reason: dict[str, int]
    skipped_filters: list[str]
    rank_by: str | None
    pool_shards: int = 0
    near_duplicate_groups: int = 0
    concepts: dict[str, dict[str, int]] = field(default_factory=dict)


# --- small helpers -----------------------------------------------------------------------------------


def _float_values(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A numeric column as float64 with nulls (and NaN scores) as NaN."""
    return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64, copy=False)


def rank_column(table_columns: list[str], config: PipelineConfig) -> str | None:
    """The score that ranks rows: ``balance.rank_by``, else the first ``rank_fallback`` present."""
    for column in [config.balance.rank_by, *config.balance.rank_fallback]:
        if column in table_columns:
            return column
    return None


def priority_order(table: pa.Table, rank_by: str | None) -> np.ndarray:
    """Row positions from best to worst: higher ranking score, then larger image, then smaller id.
    Nulls rank last. Deterministic, so reruns pick the same representatives and the same cut."""
    keys: dict[str, pa.Array | pa.ChunkedArray] = {}
    sort_keys: list[tuple[str, str]] = []
    if rank_by is not None:
        keys["rank"] = pc.cast(table[rank_by], pa.float64())
        sort_keys.append(("rank", "descending"))
    if schema.WIDTH in table.column_names and schema.HEIGHT in table.column_names:
        keys["area"] = pc.multiply(pc.cast(table[schema.WIDTH], pa.int64()), pc.cast(table[schema.HEIGHT], pa.int64()))
        sort_keys.append(("area", "descending"))
    keys["id"] = table[schema.ID]
    sort_keys.append(("id", "ascending"))
    return pc.sort_indices(pa.table(keys), sort_keys=sort_keys).to_numpy()  # nulls last


# --- near-duplicates ----------------------------------------------------------------------------------


def _blocks(n_blocks: int) -> list[tuple[int, int]]:
    """Split 64 bits into ``n_blocks`` contiguous (shift, width) blocks of near-equal width."""
    widths = [64 // n_blocks + (1 if i < 64 % n_blocks else 0) for i in range(n_blocks)]
    shifts = np.cumsum([0, *widths[:-1]])
    return [(int(s), w) for s, w in zip(shifts, widths)]


def _table_plan(n: int, max_distance: int) -> int:
    """How many blocks to split the hash into for ``n`` distinct hashes.

    Pigeonhole (Manku et al., "Detecting near-duplicates for web crawling", 2007): split 64 bits into
    ``b`` blocks; two hashes within ``t`` bits agree exactly on at least ``b - t`` blocks. So one
    lookup table per choice of ``b - t`` blocks finds every pair. ``b = t + 1`` (one block per table,
    the classic banding) needs the fewest tables, but its ~9-bit keys put thousands of rows in one
    bucket at a million rows; more blocks give longer keys, more tables and far fewer candidates.
    The plan minimises (tables x (rows + expected candidate pairs))."""
    best, best_cost = max_distance + 1, math.inf
    for n_blocks in range(max_distance + 1, min(64, max_distance + 12) + 1):
        key_bits = sum(w for _, w in _blocks(n_blocks)[: n_blocks - max_distance])  # the narrowest keys
        cost = comb(n_blocks, max_distance) * (n + n * n / 2.0 / 2.0**key_bits)
        if cost < best_cost:
            best, best_cost = n_blocks, cost
    return best


def _close_pair_chunks(hashes: np.ndarray, max_distance: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Pairs (i, j) of *distinct* 64-bit hashes within ``max_distance`` bits, in chunks of at most
    ``len(hashes)`` pairs (one per lookup table and neighbour step). Every close pair is in some chunk;
    a pair can be in several (one per table whose blocks it agrees on)."""
    h = hashes.astype(np.int64, copy=False).view(np.uint64)
    if len(h) < 2 or max_distance == 0:
        return
    blocks = _blocks(_table_plan(len(h), max_distance))
    # Each block's bits once, as small integers; a table's key is its blocks' bits side by side.
    block_bits = [((h >> np.uint64(shift)) & np.uint64((1 << width) - 1)) for shift, width in blocks]
    for chosen in itertools.combinations(range(len(blocks)), len(blocks) - max_distance):
        key_bits = sum(blocks[b][1] for b in chosen)
        key = block_bits[chosen[0]].copy()
        for b in chosen[1:]:
            key <<= np.uint64(blocks[b][1])
            key |= block_bits[b]
        if key_bits <= 32:
            key = key.astype(np.uint32)  # sorting 32-bit keys is about twice as fast as 64-bit
        order = np.argsort(key)
        sorted_keys = key[order]
        # Rows with one key sit next to each other: pair each with the next 1, 2, ... rows while any
        # still share its key (buckets are small, so this loop ends after a few steps).
        for step in range(1, len(order)):
            same = sorted_keys[step:] == sorted_keys[:-step]
            if not same.any():
                break
            i, j = order[:-step][same], order[step:][same]
            close = np.bitwise_count(h[i] ^ h[j]) <= max_distance
            if close.any():
                yield i[close], j[close]


def near_duplicate_pairs(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (i < j) of *distinct* 64-bit hashes within ``max_distance`` bits, exactly.

    ``hashes`` must be unique (callers collapse identical hashes first: they are distance 0 and would
    otherwise fill one bucket in every table). Holds every pair at once: grouping uses
    ``near_duplicate_groups``, whose memory does not grow with the pairs."""
    n = len(hashes)
    chunks = list(_close_pair_chunks(hashes, max_distance))
    if not chunks:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    i, j = np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    pairs = np.unique(lo.astype(np.int64) * n + hi)  # a pair found by several tables counts once
    return pairs // n, pairs % n


def _merge_components(labels: np.ndarray, a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
    """``labels`` (a component id per hash, ids < len(labels)) after joining the components of each
    pair (a[k], b[k]) of component ids."""
    n = len(labels)
    a_, b_ = np.concatenate(a), np.concatenate(b)
    graph = coo_matrix((np.ones(len(a_), np.int8), (a_, b_)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    return component[labels]


def near_duplicate_groups(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Group label per row (connected components of "within ``max_distance`` bits"); labels are
    0..k-1. Grouping is transitive: A~B and B~C put A and C in one group even if A and C differ more.

    Memory stays O(rows): each chunk of close pairs is reduced to pairs of components not yet joined,
    and those are merged whenever they number as many as the hashes. Photos copied thousands of times
    (memes, crops of one picture) give quadratically many close pairs; holding them all, as
    ``near_duplicate_pairs`` does, took 5.5 GiB at a million rows of such crops."""
    unique, inverse = np.unique(hashes, return_inverse=True)
    labels = np.arange(len(unique))
    pending_a: list[np.ndarray] = []
    pending_b: list[np.ndarray] = []
    pending = 0
    for i, j in _close_pair_chunks(unique, max_distance):
        a, b = labels[i], labels[j]
        apart = a != b
        if not apart.any():
            continue
        pending_a.append(a[apart])
        pending_b.append(b[apart])
        pending += int(np.count_nonzero(apart))
        if pending >= len(unique):
            labels = _merge_components(labels, pending_a, pending_b)
            pending_a, pending_b, pending = [], [], 0
    if pending:
        labels = _merge_components(labels, pending_a, pending_b)
    _, labels = np.unique(labels, return_inverse=True)  # 0..k-1
    return labels[inverse.reshape(-1)]


def _mark_semantic_duplicates(table: pa.Table, candidates: np.ndarray, position: np.ndarray, threshold: float,
                              clusters: int | None, group: np.ndarray) -> np.ndarray:
    """Rows among ``candidates`` (a mask) that duplicate a better-ranked one semantically; their
    representative's row goes into ``group`` (as for pHash groups). A null embedding is not compared."""
    from pipeline.scorers.common import arrow_to_embeddings
    from pipeline.semdedup import semantic_duplicates

    column = table[schema.CLIP_IMAGE_EMBEDDING]
    rows = np.flatnonzero(candidates & pc.is_valid(column).to_numpy(zero_copy_only=False))
    dropped = np.zeros(len(position), bool)
    if len(rows) < 2:
        return dropped
    vectors, _ = arrow_to_embeddings(pc.take(column, pa.array(rows, pa.int64())), what="clip")
    found = semantic_duplicates(vectors, position[rows], threshold, clusters)
    dropped[rows[found.dropped]] = True
    group[rows[found.dropped]] = rows[found.representative[found.dropped]]
    return dropped


def _mark_near_duplicates(
    rows: np.ndarray, hashes: np.ndarray, position: np.ndarray, max_distance: int, group: np.ndarray, dropped: np.ndarray
) -> int:
    """Group ``rows`` by pHash; in each group of two or more, the row first in priority ``position``
    is the representative. Writes the representative's row into ``group`` and marks the others in
    ``dropped``. Returns the number of groups."""
    if len(rows) == 0:
        return 0
    labels = near_duplicate_groups(hashes, max_distance)
    by_priority = np.argsort(position[rows], kind="stable")
    _, first = np.unique(labels[by_priority], return_index=True)  # each label's best row
    representative = np.empty(labels.max() + 1, np.int64)
    representative[labels[by_priority][first]] = rows[by_priority][first]
    sizes = np.bincount(labels)
    grouped = sizes[labels] > 1
    group[rows[grouped]] = representative[labels[grouped]]
    dropped[rows[grouped]] = representative[labels[grouped]] != rows[grouped]
    return int(np.count_nonzero(sizes > 1))


# --- the domain-balanced cut ----------------------------------------------------------------------


def water_fill(available: dict[str, int], weights: dict[str, float], total: int) -> dict[str, int]:
    """Split ``total`` rows over concepts in proportion to ``weights``, never giving a concept more
    rows than it has: a concept short of its share gives the surplus to the others, again in
    proportion to their weights. Integer counts; remainders go to the largest fractions (then name)."""
    allocation = {c: 0 for c in available}
    active = {c for c in available if weights.get(c, 0) > 0 and available[c] > 0}
    remaining = min(total, sum(available[c] for c in active))
    while active and remaining > 0:
        level = remaining / sum(weights[c] for c in active)
        short = {c for c in active if available[c] - allocation[c] <= level * weights[c]}
        if not short:
            shares = {c: level * weights[c] for c in active}
            for c in active:
                allocation[c] += math.floor(shares[c])
            leftover = remaining - sum(math.floor(s) for s in shares.values())
            by_fraction = sorted(active, key=lambda c: (-(shares[c] - math.floor(shares[c])), c))
            for c in by_fraction[:leftover]:
                allocation[c] += 1
            break
        for c in short:
            remaining -= available[c] - allocation[c]
            allocation[c] = available[c]
        active -= short
    return allocation


def balance_allocation(available: dict[str, int], config: PipelineConfig) -> dict[str, int]:
    """Rows each concept keeps. Listed concepts weigh their quota; unlisted ones share what the quotas
    leave equally. If the target is still not met (every weighted concept ran short, or quotas used the
    whole target), the concepts without a quota fill the rest equally; a quota of 0 stays 0."""
    target = config.balance.target_size
    if target is None:
        return dict(available)
    quotas = config.balance.quota_counts()
    unlisted = [c for c in available if c not in quotas]
    left = target - sum(quotas.values())
    weights: dict[str, float] = {c: float(q) for c, q in quotas.items() if c in available}
    weights.update({c: left / len(unlisted) for c in unlisted} if left > 0 else {})
    allocation = water_fill(available, weights, target)
    room = target - sum(allocation.values())
    if room > 0 and unlisted:
        rest = water_fill({c: available[c] - allocation[c] for c in unlisted}, {c: 1.0 for c in unlisted}, room)
        for c, extra in rest.items():
            allocation[c] += extra
    return allocation


# --- select -------------------------------------------------------------------------------------------


def select(table: pa.Table, config: PipelineConfig) -> pa.Table:
    """One SELECTION_SCHEMA row per input row (same order). ``table`` holds ``id`` and the score
    columns (plus ``concept``, ``width``/``height`` when present). Pure: reads nothing, writes nothing.

    The summary (filters applied and skipped, ranking column, per-concept balance) is stored as JSON
    in the schema metadata under ``METADATA_KEY``."""
    if schema.ID not in table.column_names:
        raise ConfigError(f"selection needs an {schema.ID!r} column; got {table.column_names}")
    n = table.num_rows
    columns = table.column_names

    # 1. thresholds: one boolean column per drop reason (below the threshold, null score), in declaration order
    reasons: list[str] = []
    failing: list[np.ndarray] = []
    applied, skipped = [], []
    for f in THRESHOLD_FILTERS:
        threshold = getattr(config.filters, f.name)
        if threshold is None:
            continue
        if f.column not in columns:
            skipped.append(f.name)
            continue
        applied.append(f.name)
        values = _float_values(table[f.column])
        null = np.isnan(values)
        with np.errstate(invalid="ignore"):
            passes = values >= threshold if f.op == ">=" else values <= threshold
        reasons += [f.name, f.null_reason]
        failing += [~passes & ~null, null & (not f.null_passes)]
    passed_thresholds = ~np.any(failing, axis=0) if failing else np.ones(n, bool)

    rank_by = rank_column(columns, config)
    cutting = config.balance.target_size is not None and config.balance.target_size < n
    dedup = config.filters.near_duplicates
    if dedup and schema.PHASH not in columns:
        skipped.append(NEAR_DUPLICATES)
        dedup = False
    semantic = config.filters.semantic_duplicates is not None and schema.CLIP_IMAGE_EMBEDDING in columns
    ranked_steps = dedup or cutting or semantic  # the steps that keep the better-ranked of two rows
    if rank_by is None and ranked_steps:
        wanted = [config.balance.rank_by, *config.balance.rank_fallback]
        raise ConfigError(f"balance.rank_by: none of {wanted} is in the scored table (columns: {columns})")
    order = priority_order(table, rank_by) if ranked_steps else np.arange(n)
    position = np.empty(n, np.int64)
    position[order] = np.arange(n)

    # 2. near-duplicates among the rows that passed the thresholds: a representative must be a row we
    # would keep, or a whole group could vanish because its best-looking member failed another filter.
    near_dup_group = np.full(n, -1, np.int64)
    near_dup = np.zeros(n, bool)
    group_count = 0
    if dedup:
        applied.append(NEAR_DUPLICATES)
        phash = table[schema.PHASH]
        # A null pHash (undecodable thumbnail) cannot be compared: the row stays ungrouped.
        candidates = np.flatnonzero(passed_thresholds & pc.is_valid(phash).to_numpy(zero_copy_only=False))
        hashes = pc.take(phash, pa.array(candidates, pa.int64())).to_numpy(zero_copy_only=False).astype(np.int64)
        group_count = _mark_near_duplicates(
            candidates, hashes, position, config.filters.near_duplicate_max_distance, near_dup_group, near_dup
        )
        reasons.append(NEAR_DUPLICATES)
        failing.append(near_dup)

    # 2b. semantic near-duplicates (SemDeDup) among what is left, on the CLIP image embeddings
    semantic_dup = np.zeros(n, bool)
    threshold = config.filters.semantic_duplicates
    if threshold is not None and schema.CLIP_IMAGE_EMBEDDING not in columns:
        skipped.append(SEMANTIC_DUPLICATES)
    elif threshold is not None:
        applied.append(SEMANTIC_DUPLICATES)
        semantic_dup = _mark_semantic_duplicates(table, passed_thresholds & ~near_dup, position, threshold,
                                                 config.filters.semantic_duplicate_clusters, near_dup_group)
        reasons.append(SEMANTIC_DUPLICATES)
        failing.append(semantic_dup)

    # 3. the domain-balanced cut among the survivors
    survivors = passed_thresholds & ~near_dup & ~semantic_dup
    if schema.CONCEPT in columns:
        concept_column = pc.fill_null(pc.cast(table[schema.CONCEPT], pa.string()), schema.OTHER_CONCEPT)
        encoded = pc.dictionary_encode(concept_column).combine_chunks()
        concept_names = encoded.dictionary.to_pylist()
        concept_index = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        concept_out: pa.Array = concept_column
    else:  # no concept classification: all rows are one domain
        concept_names = [schema.OTHER_CONCEPT]
        concept_index = np.zeros(n, np.int64)
        concept_out = pa.nulls(n, pa.string())
    before = np.bincount(concept_index[survivors], minlength=len(concept_names))
    allocation = balance_allocation(dict(zip(concept_names, before.tolist())), config)
    quota = np.array([allocation[c] for c in concept_names], np.int64)
    ranked = order[survivors[order]]  # survivors, best first
    by_concept = np.argsort(concept_index[ranked], kind="stable")  # best first inside each concept
    grouped_concepts = concept_index[ranked][by_concept]
    rank_in_concept = np.arange(len(ranked)) - np.searchsorted(grouped_concepts, grouped_concepts, side="left")
    balance_cut = np.zeros(n, bool)
    balance_cut[ranked[by_concept][rank_in_concept >= quota[grouped_concepts]]] = True
    if config.balance.target_size is not None:
        reasons.append(BALANCE_QUOTA)
        failing.append(balance_cut)

    # verdicts: drop_reasons lists every failing filter in declaration order, drop_reason the first
    matrix = np.column_stack(failing) if failing else np.zeros((n, 0), bool)
    rows, which = np.nonzero(matrix)  # row-major: sorted by row, then by declaration order
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(np.bincount(rows, minlength=n), out=offsets[1:])
    vocabulary = pa.array(reasons or [""], pa.string())
    reason_values = pa.DictionaryArray.from_arrays(pa.array(which.astype(np.int32)), vocabulary).cast(pa.string())
    drop_reasons = pa.ListArray.from_arrays(pa.array(offsets), reason_values)
    keep = offsets[1:] == offsets[:-1]
    first = np.zeros(n, np.int32)
    first[~keep] = which[offsets[:-1][~keep]]
    drop_reason = pa.DictionaryArray.from_arrays(pa.array(first, mask=keep), vocabulary).cast(pa.string())
    ids = table[schema.ID].combine_chunks()
    group_ids = pc.take(ids, pa.array(np.where(near_dup_group >= 0, near_dup_group, 0), mask=near_dup_group < 0))

    after = np.bincount(concept_index[keep], minlength=len(concept_names))
    summary = {
        "rows": n,
        "applied_filters": applied,
        "skipped_filters": skipped,
        "thresholds": {name: getattr(config.filters, name) for name in applied if name != NEAR_DUPLICATES},
        "near_duplicate_max_distance": config.filters.near_duplicate_max_distance if dedup else None,
        "near_duplicate_groups": group_count,
        "semantic_duplicate_threshold": threshold if SEMANTIC_DUPLICATES in applied else None,
        "semantic_duplicates": int(semantic_dup.sum()),
        "rank_by": rank_by,
        "target_size": config.balance.target_size,
        # a quota for a concept no row carries is usually a typo: the report shows it
        "quota_concepts_absent": sorted(set(config.balance.quotas) - set(concept_names)),
        "concepts": {
            c: {"passed_filters": int(before[k]), "allocated": int(allocation[c]), "kept": int(after[k])}
            for k, c in enumerate(concept_names)
        },
    }
    result = pa.Table.from_arrays(
        [ids, pa.array(keep), drop_reason, drop_reasons, group_ids, pc.cast(concept_out, pa.string())],
        schema=schema.SELECTION_SCHEMA,
    )
    return result.replace_schema_metadata({METADATA_KEY: json.dumps(summary).encode()})


def selection_summary(selection: pa.Table | pa.Schema) -> dict:
    """The summary ``select`` stored in the table's (or the Parquet file's) schema metadata."""
    metadata = (selection.schema if isinstance(selection, pa.Table) else selection).metadata or {}
    if METADATA_KEY not in metadata:
        raise SelectError("this selection carries no summary: it was not written by pipeline.select")
    return json.loads(metadata[METADATA_KEY])


# --- the stage ----------------------------------------------------------------------------------------


#: Where each row of the joined table came from: (ingest shard index, row in it, score shard index, row
#: in it). The pool is cut from the shards by these positions, with no second join on the long ids.
_LOCATOR = ("_ingest_file", "_ingest_row", "_score_file", "_score_row")


def read_scored(layout: RunLayout, config: PipelineConfig) -> tuple[pa.Table, pa.Table]:
    """The columns selection reads (every score column, and the ingest columns a filter or the ranking
    needs) joined on ``id``, and each row's locator (shard and row numbers) for writing the pool."""
    ingest, scores = layout.ingest_shards(), layout.score_shards()
    if not ingest:
        raise SelectError(f"no ingest shards in {layout.ingest}: run ingest first")
    if not scores:
        raise SelectError(f"no score shards in {layout.score}: run score first")
    needed = {schema.ID, schema.WIDTH, schema.HEIGHT, schema.CONCEPT, config.balance.rank_by, *config.balance.rank_fallback}
    needed |= {f.column for f in THRESHOLD_FILTERS}
    ingest_columns = [f.name for f in pq.read_schema(ingest[0]) if f.name in needed]
    # the embeddings are ~3 KB a row (30 GB for 10M rows): read only when the semantic dedup compares them
    unread = {schema.CLIP_TEXT_EMBEDDING} | ({schema.CLIP_IMAGE_EMBEDDING} if config.filters.semantic_duplicates is None else set())
    score_columns = [f.name for f in pq.read_schema(scores[0])
                     if f.name != schema.ID and f.name not in ingest_columns and f.name not in unread]
    columns = [f'i."{c}"' for c in ingest_columns] + [f's."{c}"' for c in score_columns]
    table = duckdb.connect().sql(
        f"""
        SELECT {", ".join(columns)},
               i.file_index AS _ingest_file, i.file_row_number AS _ingest_row,
               s.file_index AS _score_file, s.file_row_number AS _score_row
        FROM read_parquet($ingest) i
        LEFT JOIN read_parquet($scores, union_by_name = true) s USING ({schema.ID})
        """,
        params={"ingest": [str(p) for p in ingest], "scores": [str(p) for p in scores]},
    ).to_arrow_table()
    unscored = table["_score_file"].null_count
    if unscored:
        raise SelectError(f"{unscored} of {table.num_rows} ingested rows have no scores in {layout.score}: run score first")
    ingested = sum(pq.read_metadata(path).num_rows for path in ingest)
    if table.num_rows != ingested:  # the join multiplied rows: an id is scored more than once
        raise SelectError(f"{layout.score} scores some ids more than once (stale shards?): re-run score")
    return table.drop_columns(list(_LOCATOR)), table.select(list(_LOCATOR))


def _write_pool(layout: RunLayout, keep: np.ndarray, locator: pa.Table) -> int:
    """Pool shards = the kept rows of each ingest shard with their scores, under the ingest shard's
    name. Written next to the old pool and swapped in, so a crash never leaves a half-written pool."""
    ingest_paths, score_paths = layout.ingest_shards(), layout.score_shards()
    where = {name: locator[name].to_numpy().astype(np.int64)[keep] for name in _LOCATOR}
    staging = layout.pool.with_name(layout.pool.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    written = 0
    for k, shard in enumerate(ingest_paths):
        mine = where["_ingest_file"] == k
        if not mine.any():
            continue
        order = np.argsort(where["_ingest_row"][mine], kind="stable")  # keep the shard's row order
        pool = pq.read_table(shard).take(where["_ingest_row"][mine][order])
        score_file, score_row = where["_score_file"][mine][order], where["_score_row"][mine][order]
        files = np.unique(score_file)  # normally one: the score shard of the same name
        positions = np.concatenate([np.flatnonzero(score_file == j) for j in files])
        scores = pa.concat_tables(
            [pq.read_table(score_paths[j]).take(score_row[score_file == j]) for j in files], promote_options="default"
        ).take(np.argsort(positions))
        if not scores[schema.ID].equals(pool[schema.ID]):
            raise SelectError(f"{shard} and {layout.score} changed while selecting: re-run select")
        for name in scores.column_names:
            if name not in pool.column_names:
                pool = pool.append_column(scores.schema.field(name), scores[name])
        pq.write_table(pool, staging / shard.name)
        written += 1
    shutil.rmtree(layout.pool, ignore_errors=True)
    staging.rename(layout.pool)
    return written


def run_select(run_dir: Path, config: PipelineConfig) -> SelectStats:
    """Select over a run directory: write ``select/selection.parquet`` and the ``pool/`` shards."""
    layout = RunLayout(run_dir)
    table, locator = read_scored(layout, config)
    selection = select(table, config)
    layout.select.mkdir(parents=True, exist_ok=True)
    partial = layout.selection.with_suffix(".parquet.tmp")
    pq.write_table(selection, partial)
    partial.replace(layout.selection)
    pool_shards = _write_pool(layout, selection[schema.KEEP].to_numpy(zero_copy_only=False), locator)
    summary = selection_summary(selection)
    counts = pc.value_counts(selection[schema.DROP_REASON].drop_null()).to_pylist()
    kept = pc.sum(selection[schema.KEEP]).as_py() or 0
    return SelectStats(
        rows=selection.num_rows,
        kept=kept,
        dropped=selection.num_rows - kept,
        dropped_by_reason={c["values"]: c["counts"] for c in sorted(counts, key=lambda c: -c["counts"])},
        skipped_filters=summary["skipped_filters"],
        rank_by=summary["rank_by"],
        pool_shards=pool_shards,
        near_duplicate_groups=summary["near_duplicate_groups"],
        concepts=summary["concepts"],
    )
