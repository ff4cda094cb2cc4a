"""The engine: Ray Data and in-process give the same scores; reruns skip finished shards; a worker
that dies mid-batch loses no row. (The two-node cluster test is in test_two_node.py: it needs a process in
which no other Ray instance has run.)"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline import schema
from pipeline.engine import EngineError, score_run, score_table, setup_all
from pipeline.layout import RunLayout
from pipeline.scorer import Resources, Scorer, ScorerError, ScorerOptions
from pipeline.scorers import build_chain
from tests.builders import ingest_rows, write_ingest_run

CHEAP = {"size": {}, "phash": {}, "technical": {}}


def load_scored(run_dir: Path) -> pa.Table:
    return pq.read_table(RunLayout(run_dir).score_shards())


class DieOnceOptions(ScorerOptions):
    marker: str  # a file: absent -> this worker kills itself on its first batch and leaves the file


class DieOnceScorer(Scorer):
    """A stateful scorer whose first worker process dies hard mid-batch (as an OOM kill would)."""

    name = "die_once"
    input_columns = (schema.WIDTH,)
    output_fields = (pa.field("width_doubled", pa.int64()),)
    resources = Resources(num_cpus=0.5, batch_size=7)
    stateful = True
    Options = DieOnceOptions

    def score(self, batch):
        marker = Path(self.options.marker)
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(1)
        return {"width_doubled": pc.multiply(pc.cast(batch.column(schema.WIDTH), pa.int64()), 2)}


def test_local_backend_scores_every_row_and_skips_on_rerun(tmp_path):
    write_ingest_run(tmp_path, n=30, shard_rows=12)
    stats = score_run(tmp_path, build_chain(CHEAP), backend="local")
    assert (stats.shards_total, stats.shards_scored, stats.rows_scored) == (3, 3, 30)
    scored = load_scored(tmp_path)
    assert scored.num_rows == 30 and pc.count_distinct(scored[schema.ID]).as_py() == 30
    assert set(scored.column_names) == {schema.ID, schema.ASPECT_RATIO, schema.MIN_SIDE, schema.MEGAPIXELS,
                                        schema.PHASH, schema.SHARPNESS, schema.CONTRAST}
    assert pc.min(scored[schema.ASPECT_RATIO]).as_py() >= 1.0

    again = score_run(tmp_path, build_chain(CHEAP), backend="local")
    assert (again.shards_skipped, again.shards_scored) == (3, 0)

    # A different chain (other options) is different work: every shard is scored again.
    changed = score_run(tmp_path, build_chain({"size": {}, "technical": {"analysis_size": 128}}), backend="local")
    assert changed.shards_scored == 3
    assert schema.PHASH not in load_scored(tmp_path).column_names


def test_ray_matches_in_process(tmp_path, local_ray):
    write_ingest_run(tmp_path, n=40, shard_rows=15)
    chain = build_chain(CHEAP)
    stats = score_run(tmp_path, chain, backend="ray")
    assert (stats.shards_scored, stats.rows_scored) == (3, 40)
    on_ray = load_scored(tmp_path).sort_by(schema.ID)

    table = pq.read_table(sorted((tmp_path / "ingest").glob("*.parquet")))
    setup_all(chain)
    in_process = score_table(table, chain).select(on_ray.column_names).sort_by(schema.ID)
    assert on_ray.cast(in_process.schema).equals(in_process)


def _is_loopback(host: str) -> bool:
    address = ipaddress.ip_address(host)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is the IPv4 loopback on a v6 socket
    return address.is_loopback or bool(mapped and mapped.is_loopback)


@pytest.mark.skipif(bool(os.environ.get("RAY_ADDRESS")), reason="RAY_ADDRESS is set: no local Ray is started")
def test_local_ray_listens_on_loopback_only(local_ray):
    import psutil
    from ray._private import ray_constants

    ray = local_ray
    assert ray.get(ray.remote(lambda: 1).remote()) == 1  # a worker process is up, with its own server
    node = ray._private.worker.global_worker.node
    assert node.node_ip_address == "127.0.0.1"
    assert node.gcs_address.rsplit(":", 1)[0] == "127.0.0.1"
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}

    # Every socket a Ray process of this session listens on (GCS, raylet, workers, agents) is loopback.
    me = psutil.Process()
    ray_pids = {p.pid: p.name() for p in me.children(recursive=True)} | {me.pid: me.name()}
    listening = [
        (ray_pids[c.pid], c.laddr.ip, c.laddr.port)
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.pid in ray_pids
    ]
    names = {name for name, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names, f"Ray's servers not found among {sorted(names)}"
    exposed = [sock for sock in listening if not _is_loopback(sock[1])]
    assert not exposed, f"listening beyond loopback: {exposed}"

    # The switch is put back once the node is up: a later ray.init(address=...) joins with the real address.
    assert ray_constants.ENABLE_RAY_CLUSTER is True
    assert ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR not in os.environ


def test_rerun_scores_only_missing_shards(tmp_path, local_ray):
    write_ingest_run(tmp_path, n=30, shard_rows=10)
    score_run(tmp_path, build_chain(CHEAP), backend="ray")
    (tmp_path / "score" / "shard-00001.parquet").unlink()  # as if the job died before writing it
    stats = score_run(tmp_path, build_chain(CHEAP), backend="ray")
    assert (stats.shards_skipped, stats.shards_scored, stats.rows_scored) == (2, 1, 10)
    assert load_scored(tmp_path).num_rows == 30


def test_worker_death_mid_batch_loses_and_duplicates_nothing(tmp_path, local_ray):
    write_ingest_run(tmp_path, n=45, shard_rows=20)
    marker = tmp_path / "died"
    chain = build_chain({"size": {}}) + [DieOnceScorer(DieOnceOptions(marker=str(marker)))]
    stats = score_run(tmp_path, chain, backend="ray")
    assert marker.exists(), "the worker never died: the test proves nothing"
    assert stats.rows_scored == 45
    scored = load_scored(tmp_path)
    assert scored.num_rows == 45 and pc.count_distinct(scored[schema.ID]).as_py() == 45
    ingested = pq.read_table(sorted((tmp_path / "ingest").glob("*.parquet")), columns=[schema.ID, schema.WIDTH])
    joined = ingested.join(scored, schema.ID)
    assert pc.all(pc.equal(joined["width_doubled"], pc.multiply(pc.cast(joined[schema.WIDTH], pa.int64()), 2))).as_py()


def test_chain_checks_columns_before_any_work(tmp_path):
    write_ingest_run(tmp_path, n=5, shard_rows=5)

    class NeedsEmbedding(Scorer):
        name = "needs_embedding"
        input_columns = (schema.CLIP_IMAGE_EMBEDDING,)
        output_fields = (pa.field("x", pa.float32()),)

        def score(self, batch):
            return {"x": [0.0] * batch.num_rows}

    with pytest.raises(ScorerError, match="clip_image_embedding"):
        score_run(tmp_path, [NeedsEmbedding()], backend="local")
    with pytest.raises(EngineError, match="no ingested shards"):
        score_run(tmp_path / "nothing", build_chain(CHEAP), backend="local")


def test_scorer_output_is_checked():
    class Short(Scorer):
        name = "short"
        input_columns = (schema.WIDTH,)
        output_fields = (pa.field("x", pa.float32()),)

        def score(self, batch):
            return {"x": [1.0]}

    with pytest.raises(ScorerError, match="returned 1 values"):
        Short()(ingest_rows(3))
    empty = score_table(ingest_rows(3).slice(0, 0), build_chain({"size": {}}))
    assert empty.num_rows == 0 and schema.ASPECT_RATIO in empty.column_names


def test_gpu_actors_ask_for_their_decode_threads_share_scarce_gpus_and_leave_cpus_for_the_reads():
    from pipeline.engine import _actor_resources, _pool_size
    from pipeline.scorers import build_scorer

    clip = build_scorer("clip", {"device": "cuda", "checkpoint": "unused.pt", "pretrained": None})
    assert clip.resources.num_gpus == 1 and clip.resources.num_cpus == 8  # 8 decode threads on CUDA
    one_stage = lambda cluster: _actor_resources(clip, cluster, gpu_stages=1)  # noqa: E731
    assert one_stage({"CPU": 128, "GPU": 8}).num_cpus == 8  # 16 CPUs per GPU: room for all 8
    assert one_stage({"CPU": 16, "GPU": 4}).num_cpus == 3  # 4 per GPU: 3, one left for reads
    assert one_stage({"CPU": 4, "GPU": 4}).num_cpus == 1
    # three GPU stages on one GPU (clip, ocr, nsfw on cuda): each asks for a third, so all three hold an actor
    shared = _actor_resources(clip, {"CPU": 16, "GPU": 1}, gpu_stages=3)
    assert shared.num_gpus == pytest.approx(1 / 3) and shared.num_cpus == pytest.approx(16 / 3 - 1)
    assert _pool_size("clip", shared, {"CPU": 16, "GPU": 1}) == 3
    ocr = build_scorer("ocr", {"device": "cpu"})
    assert _actor_resources(ocr, {"CPU": 2}, gpu_stages=0) == ocr.resources


class SlowOptions(ScorerOptions):
    seconds: float = 0.3  # per batch


class SlowScorer(Scorer):
    """A stateless scorer that takes its time (the chain a crash interrupts)."""

    name = "slow"
    input_columns = (schema.WIDTH,)
    output_fields = (pa.field("width_plus_one", pa.int64()),)
    resources = Resources(num_cpus=0.5, batch_size=5)
    Options = SlowOptions

    def score(self, batch):
        import time

        time.sleep(self.options.seconds)
        return {"width_plus_one": pc.add(pc.cast(batch.column(schema.WIDTH), pa.int64()), 1)}


SCORE_IN_A_SUBPROCESS = """
import sys
from pipeline.engine import score_run
from pipeline.scorers import build_chain
from tests.pipeline.test_engine import SlowOptions, SlowScorer
score_run(sys.argv[1], build_chain({"size": {}}) + [SlowScorer(SlowOptions())], backend="ray")
"""


def test_a_killed_scoring_keeps_its_committed_shards_and_the_rerun_ends_identical(tmp_path, local_ray):
    """Shards are committed as they complete: SIGKILL the scoring process (its local Ray with it) once
    some shards are on disk; those survive, the rerun scores only the rest, and the result equals an
    uninterrupted run's, row for row."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    run, reference = tmp_path / "run", tmp_path / "reference"
    for folder in (run, reference):
        write_ingest_run(folder, n=120, shard_rows=20, row_group_rows=10)  # 6 shards
    chain = build_chain({"size": {}}) + [SlowScorer(SlowOptions())]
    proc = subprocess.Popen([sys.executable, "-c", SCORE_IN_A_SUBPROCESS, str(run)], start_new_session=True,
                            env={**os.environ, "RAY_ADDRESS": ""})
    scored_dir = run / "score"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not list(scored_dir.glob("shard-*.parquet")):
        assert proc.poll() is None, "the scoring process ended before it was killed"
        time.sleep(0.05)
    doomed = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in doomed:  # Ray's own processes may have left the group: they go too
        with __import__("contextlib").suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()
    proc.wait(timeout=30)
    committed = sorted(p.name for p in scored_dir.glob("shard-*.parquet"))
    print(f"committed before the kill: {committed}")
    assert 1 <= len(committed) < 6, committed
    assert not list(scored_dir.glob(".*")) or all(p.name.startswith(".tmp") for p in scored_dir.glob(".*"))

    stats = score_run(run, chain, backend="ray")
    assert (stats.shards_skipped, stats.shards_scored) == (len(committed), 6 - len(committed))
    score_run(reference, chain, backend="local")
    resumed = load_scored(run).sort_by(schema.ID)
    uninterrupted = load_scored(reference).sort_by(schema.ID)
    assert resumed.num_rows == 120 and resumed.to_pylist() == uninterrupted.select(resumed.column_names).to_pylist()
