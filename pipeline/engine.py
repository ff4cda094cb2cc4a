"""Run a chain of scorers over the ingested shards, on Ray Data or in-process.

For each ingest shard ``RUN/ingest/shard-N.parquet`` the engine writes ``RUN/score/shard-N.parquet``
holding ``id`` and every scorer's columns. Nothing is dropped here (selection does that), so thresholds
can be re-tuned without re-scoring.

On Ray (the default) one streaming Dataset reads every pending shard (only the columns the chain needs),
runs stateless scorers fused into the read tasks and each stateful scorer in its own actor pool
(``setup()`` once per actor), and streams the small score columns back to the driver, which writes a
shard as soon as all its rows have arrived. Ray retries a batch whose worker died; the driver checks each
shard's row count and ids against its input before writing it, so no row is lost or duplicated.

Resume: a shard whose output exists and was written by the same chain (recorded in the file's metadata)
is skipped; outputs are written to a temporary name and renamed, so a crash never leaves half a shard.
``RAY_ADDRESS`` set -> the job runs on that cluster; unset -> a local Ray on this machine, listening on
127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.errors import UserError
from pipeline.layout import RunLayout
from pipeline.scorer import Resources, Scorer, check_chain

logger = logging.getLogger(__name__)

CHAIN_METADATA_KEY = b"needles.scorer_chain"
SHARD_COLUMN = "path"  # the column Ray Data's include_paths adds: which ingest shard a row came from


class EngineError(UserError):
    pass


@dataclass
class ScoreStats:
    shards_total: int = 0
    shards_skipped: int = 0  # already scored by the same chain
    shards_scored: int = 0
    rows_scored: int = 0
    backend: str = "ray"
    scorers: list[str] = field(default_factory=list)


def chain_signature(scorers: Sequence[Scorer]) -> str:
    """What the chain computes: names and options, in order. Stored in every output shard."""
    return json.dumps(
        [{"name": s.name, "options": s.options.model_dump(mode="json")} for s in scorers], sort_keys=True
    )


def output_path(layout: RunLayout, ingest_shard: Path) -> Path:
    return layout.score / ingest_shard.name


def shard_is_done(path: Path, signature: str) -> bool:
    if not path.exists():
        return False
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (pa.ArrowInvalid, OSError):
        return False  # unreadable: score it again
    return metadata.get(CHAIN_METADATA_KEY) == signature.encode()


def apply_chain(scorers: Sequence[Scorer], batch: pa.Table) -> pa.Table:
    for scorer in scorers:
        batch = scorer(batch)
    return batch


def score_table(table: pa.Table, scorers: Sequence[Scorer], *, batch_size: int | None = None) -> pa.Table:
    """In-process: score a table batch by batch (for debugging, tests and small runs).

    Each scorer's ``setup()`` must have been called (``setup_all``)."""
    check_chain(scorers, table.column_names)
    size = batch_size or min(s.resources.batch_size for s in scorers)
    pieces = [apply_chain(scorers, pa.Table.from_batches([b])) for b in table.to_batches(max_chunksize=size)]
    if not pieces:
        return apply_chain(scorers, table)
    return pa.concat_tables(pieces)


def setup_all(scorers: Iterable[Scorer]) -> None:
    for scorer in scorers:
        if scorer.stateful:
            scorer.setup()


def _score_columns(scorers: Sequence[Scorer]) -> list[str]:
    return [name for s in scorers for name in s.output_names()]


def _write_shard(table: pa.Table, path: Path, signature: str) -> None:
    """Write atomically: a reader (or a rerun) sees the whole shard or none of it."""
    table = table.sort_by(schema.ID)
    metadata = dict(table.schema.metadata or {})
    metadata[CHAIN_METADATA_KEY] = signature.encode()
    table = table.replace_schema_metadata(metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _check_complete(shard: Path, scored: pa.Table, expected_ids: pa.Array) -> None:
    ids = scored.column(schema.ID)
    if len(ids) != len(expected_ids) or pc.count_distinct(ids).as_py() != len(expected_ids):
        raise EngineError(
            f"{shard.name}: scored {len(ids)} rows ({pc.count_distinct(ids).as_py()} distinct), "
            f"expected {len(expected_ids)}"
        )
    if not pc.all(pc.is_in(expected_ids, value_set=ids)).as_py():
        raise EngineError(f"{shard.name}: scored ids differ from the ingested ids")


def score_run(
    run_dir: Path,
    scorers: Sequence[Scorer],
    *,
    backend: str = "ray",
    progress: bool = False,
) -> ScoreStats:
    """Score every ingest shard of ``run_dir`` that this chain has not scored yet."""
    layout = RunLayout(run_dir)
    shards = layout.ingest_shards()
    if not shards:
        raise EngineError(f"no ingested shards in {layout.ingest} (run ingest first)")
    if not scorers:
        raise EngineError("the scorer chain is empty")
    available = pq.read_schema(shards[0]).names
    needed = check_chain(scorers, available)
    signature = chain_signature(scorers)
    pending = [s for s in shards if not shard_is_done(output_path(layout, s), signature)]
    stats = ScoreStats(
        shards_total=len(shards),
        shards_skipped=len(shards) - len(pending),
        backend=backend,
        scorers=[s.name for s in scorers],
    )
    if not pending:
        return stats
    columns = [schema.ID] + [c for c in needed if c != schema.ID]
    for shard in [p for p in pending if pq.ParquetFile(p).metadata.num_rows == 0]:
        # Every row of this shard was quarantined or a duplicate: nothing to score, still a shard.
        empty = apply_chain(scorers, pq.read_table(shard, columns=columns))
        _write_shard(empty.select([schema.ID] + _score_columns(scorers)), output_path(layout, shard), signature)
        pending.remove(shard)
        stats.shards_scored += 1
    if not pending:
        return stats
    if backend == "ray":
        _score_on_ray(layout, pending, scorers, columns, signature, stats, progress)
    elif backend == "local":
        _score_in_process(layout, pending, scorers, columns, signature, stats, progress)
    else:
        raise EngineError(f"unknown backend {backend!r}: 'ray' or 'local'")
    return stats


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="row", desc=desc, disable=not enabled)


def _score_in_process(layout, pending, scorers, columns, signature, stats, progress) -> None:
    setup_all(scorers)
    keep = [schema.ID] + _score_columns(scorers)
    total = sum(pq.ParquetFile(p).metadata.num_rows for p in pending)
    with _progress(total, progress, "score (local)") as bar:
        for shard in pending:
            table = pq.read_table(shard, columns=columns)
            scored = score_table(table, scorers).select(keep)
            _check_complete(shard, scored, table.column(schema.ID).combine_chunks())
            _write_shard(scored, output_path(layout, shard), signature)
            stats.shards_scored += 1
            stats.rows_scored += scored.num_rows
            bar.update(scored.num_rows)


# --- Ray ------------------------------------------------------------------------------------


def init_ray(**kwargs) -> None:
    """Connect to ``RAY_ADDRESS`` when set, else start a local Ray (quietly, no usage stats) that
    listens on the loopback interface only (see ``_loopback_only``)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)
        return
    with _loopback_only():
        ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False, **kwargs)
    node_ip = ray._private.worker.global_worker.node.node_ip_address
    if node_ip not in LOOPBACK:
        logger.warning("the local Ray listens on %s, not only on the loopback interface", node_ip)


LOOPBACK = ("127.0.0.1", "::1")


@contextlib.contextmanager
def _loopback_only():
    """Start a local Ray whose GCS, raylet, workers and agents bind to 127.0.0.1 instead of every
    interface (on Linux Ray takes the node's routable address and listens on all interfaces).

    Ray's own switch for that is the single-machine mode it uses on macOS and Windows: with
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` its node address is the loopback one, for the driver and (the
    variable is inherited) for every process it starts. The driver reads the variable when ``ray`` is
    first imported, so its constant is set too, and both are put back once the node is up: a later
    ``ray.init(address=...)`` in this process joins a real cluster with its real address."""
    from ray._private import ray_constants

    saved_env = os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR)
    saved_constant = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_constant
        if saved_env is None:
            os.environ.pop(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, None)
        else:
            os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = saved_env


class _ScorerActor:
    """One per actor in a stateful scorer's pool: ``setup()`` once, then batch after batch."""

    def __init__(self, scorer: Scorer, carry: set[str]) -> None:
        self.scorer, self.carry = scorer, carry
        scorer.setup()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _trim(self.scorer(batch), self.carry)


def _stages(scorers: Sequence[Scorer]) -> list[list[Scorer]]:
    """Consecutive stateless scorers run as one fused function; each stateful one gets its own stage."""
    stages: list[list[Scorer]] = []
    for scorer in scorers:
        if not scorer.stateful and stages and not stages[-1][0].stateful:
            stages[-1].append(scorer)
        else:
            stages.append([scorer])
    return stages


def _pool_size(name: str, res: Resources, cluster: dict) -> int:
    """Actors the cluster can hold for a scorer asking ``res`` per actor while leaving a CPU for Ray
    Data's read tasks (an actor pool that takes every CPU starves the reads and the dataset hangs)."""
    if res.num_gpus > 0:
        size = int(cluster.get("GPU", 0) // res.num_gpus)
        if size < 1:
            raise EngineError(f"scorer {name!r} wants {res.num_gpus} GPU per worker; the cluster has none")
    else:
        spare = max(cluster.get("CPU", 1) - 1, res.num_cpus)
        size = max(1, int(spare // res.num_cpus))
    return min(size, res.max_workers) if res.max_workers else size


def _actor_resources(scorer: Scorer, cluster: dict, gpu_stages: int) -> Resources:
    """What one actor of ``scorer`` asks Ray for on this cluster. With more GPU stages than GPUs, the GPU
    stages share them (each stage needs an actor at the same time: one waiting for a GPU that another
    stage's pool holds until its operator finishes would stall the dataset). A GPU actor asks for its
    decode threads' CPUs, but never for more than its share of the CPUs less one, so reads always run."""
    res = scorer.resources
    gpus = cluster.get("GPU", 0)
    if res.num_gpus <= 0 or not gpus:
        return res
    if gpu_stages > gpus:
        res = replace(res, num_gpus=min(res.num_gpus, gpus / gpu_stages))
    share = cluster.get("CPU", 1) / gpus * res.num_gpus
    return replace(res, num_cpus=max(min(res.num_cpus, share - 1), min(res.num_cpus, 1.0)))


def _carried_after(later: Sequence[Sequence[Scorer]]) -> set[str]:
    return {c for stage in later for s in stage for c in s.input_columns}


def _trim(batch: pa.Table, carry: set[str] | None) -> pa.Table:
    """Keep the shard path, ids, every score so far and the inputs of later stages."""
    if carry is None:
        return batch
    inputs = set(schema.INGEST_SCHEMA.names) - {schema.ID}
    return batch.select([c for c in batch.column_names if c not in inputs or c in carry])


def _read_and_score(items: pa.Table, columns: list[str], scorers: Sequence[Scorer], carry) -> pa.Table:
    pieces = []
    for path, row_group in zip(items.column(SHARD_COLUMN).to_pylist(), items.column("row_group").to_pylist()):
        piece = pq.ParquetFile(path).read_row_group(row_group, columns=columns)
        piece = piece.append_column(SHARD_COLUMN, pa.array([path] * piece.num_rows, pa.string()))
        pieces.append(_trim(apply_chain(scorers, piece), carry))
    return pa.concat_tables(pieces)


def _chain_fn(batch: pa.Table, scorers: Sequence[Scorer], carry) -> pa.Table:
    return _trim(apply_chain(scorers, batch), carry)


def _score_on_ray(layout, pending, scorers, columns, signature, stats, progress) -> None:
    import ray
    import ray.data

    init_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # Blocks come back in the order of the work items (shard by shard), still computed in parallel: each
    # shard is complete, and committed to disk, as soon as its own row groups are done, so a crash loses
    # only the shards in flight. Unordered, every shard's last rows tend to arrive at the very end, and a
    # crash 100 s into scoring kept nothing (issue 13).
    ctx.execution_options.preserve_order = True
    cluster = ray.cluster_resources()
    stages = _stages(scorers)
    gpu_stages = sum(1 for s in scorers if s.stateful and s.resources.num_gpus > 0)
    # Each stage passes on only what later stages read, so thumbnails leave the pipeline as soon as
    # the last scorer that needs them is done.
    carried = [_carried_after(stages[i + 1 :]) for i in range(len(stages))]
    # One work item per Parquet row group (ingest writes 512-row groups): fine-grained enough to keep
    # every worker busy on small runs, and each item names its shard for the per-shard bookkeeping.
    # Leading stateless scorers run inside the read task: thumbnails never cross the object store.
    items = [{SHARD_COLUMN: str(p), "row_group": i} for p in pending for i in range(pq.ParquetFile(p).num_row_groups)]
    first = stages[0] if not stages[0][0].stateful else []
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        functools.partial(_read_and_score, columns=columns, scorers=first, carry=carried[0] if first else None),
        batch_format="pyarrow",
        batch_size=1,
        num_cpus=max([s.resources.num_cpus for s in first], default=0.25),
    )
    for index, stage in enumerate(stages):
        head = stage[0]
        if not head.stateful and index == 0:
            continue  # already fused into the read
        if head.stateful:
            res = _actor_resources(head, cluster, gpu_stages)
            ds = ds.map_batches(
                _ScorerActor,
                fn_constructor_kwargs={"scorer": head, "carry": carried[index]},
                batch_format="pyarrow",
                batch_size=res.batch_size,
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=_pool_size(head.name, res, cluster)),
                num_cpus=res.num_cpus,
                num_gpus=res.num_gpus or None,
                # Ray Data restarts a dead actor and retries its batch (max_restarts and
                # max_task_retries default to -1 for actor pools); test_engine proves it.
            )
        else:
            ds = ds.map_batches(
                functools.partial(_chain_fn, scorers=stage, carry=carried[index]),
                batch_format="pyarrow",
                batch_size=min(s.resources.batch_size for s in stage),
                num_cpus=max(s.resources.num_cpus for s in stage),
            )
    keep = [schema.ID] + _score_columns(scorers)
    ds = ds.select_columns([SHARD_COLUMN] + keep)

    shards = {str(p): _ShardBuffer(p) for p in pending}
    with _progress(sum(b.expected for b in shards.values()), progress, "score (ray)") as bar:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for shard_path in pc.unique(batch.column(SHARD_COLUMN)).to_pylist():
                rows = batch.filter(pc.equal(batch.column(SHARD_COLUMN), shard_path)).select(keep)
                buffer = shards[shard_path]
                bar.update(buffer.add(rows))
                if buffer.complete:
                    _finish_shard(layout, buffer, signature, stats)
    for buffer in shards.values():
        if not buffer.written:
            raise EngineError(f"{buffer.shard.name}: only {len(buffer.seen)} of {buffer.expected} rows came back")


class _ShardBuffer:
    """Score rows of one ingest shard as they stream back. A batch retried after its worker died
    can arrive twice: rows are kept once per id (a scorer is a function of its row, so both copies
    are equal)."""

    def __init__(self, shard: Path) -> None:
        self.shard = shard
        self.ids = pq.read_table(shard, columns=[schema.ID]).column(schema.ID).combine_chunks()
        self.expected = len(self.ids)
        self.seen: set[str] = set()
        self.pieces: list[pa.Table] = []
        self.written = False

    def add(self, rows: pa.Table) -> int:
        ids = rows.column(schema.ID).to_pylist()
        fresh = [i not in self.seen for i in ids]
        new = rows.filter(pa.array(fresh)) if not all(fresh) else rows
        self.seen.update(ids)
        self.pieces.append(new)
        return new.num_rows

    @property
    def complete(self) -> bool:
        return not self.written and len(self.seen) >= self.expected


def _finish_shard(layout: RunLayout, buffer: _ShardBuffer, signature: str, stats: ScoreStats) -> None:
    scored = pa.concat_tables(buffer.pieces)
    _check_complete(buffer.shard, scored, buffer.ids)
    _write_shard(scored, output_path(layout, buffer.shard), signature)
    buffer.pieces, buffer.written = [], True
    stats.shards_scored += 1
    stats.rows_scored += scored.num_rows
