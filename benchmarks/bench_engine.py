"""Engine overhead: the cheap scorers (size, phash, technical) over N rows through the Ray engine vs the
same scorer functions in a plain in-process loop, measured in one run. Ray start-up is timed apart.

    .venv/bin/python benchmarks/bench_engine.py --rows 100000

Goal (issue 2): Ray time <= 1.3x the loop's time on 2 cores. Also times the same job on a two-node
``ray.cluster_utils.Cluster`` on loopback (1 CPU per node) unless --no-cluster.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from skimage import data as skdata

from pipeline import schema
from pipeline.engine import score_run, score_table, setup_all
from pipeline.layout import RunLayout, shard_name
from pipeline.scorers import build_chain

CHAIN = {"size": {}, "phash": {}, "technical": {}}


def thumbnails(count: int, seed: int = 0) -> list[bytes]:
    """``count`` distinct ~384 px JPEG thumbnails cut from scikit-image's real photos."""
    rng = np.random.default_rng(seed)
    photos = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()]
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1)), int(w * rng.uniform(0.6, 1))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        image = Image.fromarray(photo[y : y + ch, x : x + cw])
        image.thumbnail((384, 384))
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=88)
        out.append(buf.getvalue())
    return out


def build_run(root: Path, rows: int, shard_rows: int) -> RunLayout:
    layout = RunLayout(root)
    layout.ingest.mkdir(parents=True)
    thumbs = thumbnails(512)
    sizes = [Image.open(io.BytesIO(t)).size for t in thumbs]
    for index, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        picks = [(start + i) % len(thumbs) for i in range(n)]
        table = pa.table(
            {
                schema.ID: [hashlib.sha256(str(start + i).encode()).hexdigest() for i in range(n)],
                schema.WIDTH: pa.array([sizes[p][0] for p in picks], pa.int32()),
                schema.HEIGHT: pa.array([sizes[p][1] for p in picks], pa.int32()),
                schema.THUMBNAIL: pa.array([thumbs[p] for p in picks], pa.binary()),
            }
        )
        pq.write_table(table, layout.ingest / shard_name(index), row_group_size=1024)
    return layout


def plain_loop(layout: RunLayout, out: Path) -> float:
    chain = build_chain(CHAIN)
    setup_all(chain)
    out.mkdir()
    t0 = time.perf_counter()
    for shard in layout.ingest_shards():
        table = pq.read_table(shard)
        scored = score_table(table, chain)
        pq.write_table(scored.drop_columns([schema.THUMBNAIL, schema.WIDTH, schema.HEIGHT]), out / shard.name)
    return time.perf_counter() - t0


def on_ray(layout: RunLayout, address: str | None = None, num_cpus: int | None = None) -> tuple[float, float]:
    import ray

    from pipeline.engine import init_ray

    t0 = time.perf_counter()
    if address:
        ray.init(address=address)
    else:
        init_ray(num_cpus=num_cpus)
    startup = time.perf_counter() - t0
    shutil.rmtree(layout.score, ignore_errors=True)
    t0 = time.perf_counter()
    stats = score_run(layout.root, build_chain(CHAIN), backend="ray")
    elapsed = time.perf_counter() - t0
    assert stats.rows_scored == sum(pq.ParquetFile(p).metadata.num_rows for p in layout.ingest_shards())
    ray.shutdown()
    return startup, elapsed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--shard-rows", type=int, default=10_000)
    p.add_argument("--no-cluster", action="store_true")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    try:
        layout = build_run(root / "run", args.rows, args.shard_rows)
        loop_s = plain_loop(layout, root / "loop-out")
        startup, ray_s = on_ray(layout, num_cpus=os.cpu_count())
        print(f"rows={args.rows} cpus={os.cpu_count()} chain={list(CHAIN)}")
        print(f"plain loop:          {loop_s:8.1f} s  {args.rows / loop_s:8.0f} rows/s")
        print(f"ray engine (local):  {ray_s:8.1f} s  {args.rows / ray_s:8.0f} rows/s  (ray start-up {startup:.1f} s, not included)")
        print(f"ratio ray/loop:      {ray_s / loop_s:8.2f}   (goal <= 1.3)")
        if not args.no_cluster:
            from ray.cluster_utils import Cluster

            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
            cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            startup2, cluster_s = on_ray(layout, address=cluster.address)
            cluster.shutdown()
            print(f"two-node test cluster: {cluster_s:6.1f} s  {args.rows / cluster_s:8.0f} rows/s  (ratio to loop {cluster_s / loop_s:.2f})")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
