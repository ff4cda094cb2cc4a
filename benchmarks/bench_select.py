"""Selection + funnel on a synthetic 1,000,000-row scored run (goal: <= 10 s on 2 cores).

    .venv/bin/python benchmarks/bench_select.py [--rows 1000000]

Builds a run directory with ingest shards (tiny placeholder thumbnails: selection never reads them)
and score shards carrying every score the filters read, 5% planted near-duplicates and 20 skewed
concepts; then times, in one run:

- ``select()`` on the in-memory table, and its near-duplicate search alone (pass rate as configured
  and the worst case where every row passes the thresholds);
- ``run_select`` (DuckDB read + join, select, selection.parquet + pool shards written) and ``funnel``;
- the banded near-duplicate search against brute force on a subset, side by side.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import schema
from pipeline.config import parse_config
from pipeline.layout import RunLayout, shard_name
from pipeline.report import build_report, funnel
from pipeline.select import (
    near_duplicate_groups,
    near_duplicate_pairs,
    run_select,
    select,
)


def synthetic_run(root: Path, rows: int, shards: int, seed: int = 0) -> pa.Table:
    """Write ingest + score shards; return the joined table select() sees."""
    rng = np.random.default_rng(seed)
    ids = pa.array(np.char.mod("%064x", np.arange(rows, dtype=np.int64) * 2654435761 % (1 << 62)).astype(object), pa.string())
    width = rng.integers(120, 2048, rows).astype(np.int32)
    height = (width / rng.uniform(0.4, 2.5, rows)).astype(np.int32).clip(64)
    phash = rng.integers(-(2**63), 2**63 - 1, rows, dtype=np.int64)
    copies = rng.choice(rows, rows // 20, replace=False)  # 5% near-duplicates of a random original
    noise = np.zeros(len(copies), np.uint64)
    for _ in range(3):
        noise |= np.uint64(1) << rng.integers(0, 64, len(copies)).astype(np.uint64)
    phash[copies] = (phash[rng.choice(rows, len(copies))].view(np.uint64) ^ noise).view(np.int64)
    concepts = np.array([f"concept{k:02d}" for k in range(20)])
    weights = 1.0 / np.arange(1, 21)
    clip = rng.normal(0.31, 0.04, rows)
    scores = {
        schema.ID: ids,
        schema.ASPECT_RATIO: pa.array(np.maximum(width / height, height / width), pa.float32()),
        schema.MIN_SIDE: pa.array(np.minimum(width, height), pa.int32()),
        schema.MEGAPIXELS: pa.array(width * height / 1e6, pa.float32()),
        schema.PHASH: pa.array(phash),
        schema.SHARPNESS: pa.array(rng.gamma(2.0, 8.0, rows), pa.float32()),
        schema.CONTRAST: pa.array(rng.uniform(0.02, 0.35, rows), pa.float32()),
        schema.NSFW_SCORE: pa.array(rng.beta(0.5, 8, rows), pa.float32()),
        schema.OCR_WORD_COUNT: pa.array(rng.poisson(1.0, rows), pa.int32()),
        schema.OCR_TEXT_AREA: pa.array(rng.beta(0.5, 20, rows), pa.float32()),
        schema.CLIP_SCORE: pa.array(clip, pa.float32(), mask=rng.random(rows) < 0.01),  # 1% empty captions
        schema.AESTHETIC_SCORE: pa.array(rng.normal(5.6, 0.8, rows), pa.float32()),
        schema.CONCEPT: pa.array(rng.choice(concepts, rows, p=weights / weights.sum())),
    }
    layout = RunLayout(root)
    layout.ingest.mkdir(parents=True)
    layout.score.mkdir(parents=True)
    per = -(-rows // shards)
    thumbnail = pa.array([b"\xff\xd8"] * per, pa.binary())
    for k in range(shards):
        part = slice(k * per, min(rows, (k + 1) * per))
        m = part.stop - part.start
        ingest = pa.table(
            {
                schema.ID: ids[part],
                schema.IMAGE: pa.nulls(m, pa.binary()),
                schema.IMAGE_PATH: pa.array([f"/data/{i}.jpg" for i in range(part.start, part.stop)]),
                schema.CAPTION: pa.array(["a photo"] * m),
                schema.WIDTH: width[part],
                schema.HEIGHT: height[part],
                schema.FORMAT: pa.array(["JPEG"] * m),
                schema.THUMBNAIL: thumbnail[:m],
                schema.SOURCE: pa.array(["synthetic"] * m),
                schema.SOURCE_KEY: pa.array([str(i) for i in range(part.start, part.stop)]),
                schema.ENGAGEMENT: pa.nulls(m, pa.float64()),
                schema.META: pa.nulls(m, pa.string()),
            },
            schema=schema.INGEST_SCHEMA,
        )
        pq.write_table(ingest, layout.ingest / shard_name(k))
        pq.write_table(pa.table({c: v[part] for c, v in scores.items()}), layout.score / shard_name(k))
    return pa.table({**scores, schema.WIDTH: width, schema.HEIGHT: height})


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--brute-force-rows", type=int, default=20_000)
    parser.add_argument("--memory", action="store_true",
                        help="only: build the run, then run_select + funnel + build_report in a fresh child process "
                             "and print its peak RSS (the selection's memory, without this process's synthetic table)")
    args = parser.parse_args()
    if args.memory:
        return memory_only(args.rows, args.shards)
    config = parse_config({"scorers": {}})  # the default thresholds, balance to 200,000
    print(f"rows {args.rows:,}, {os.cpu_count()} CPUs, near_duplicate_max_distance {config.filters.near_duplicate_max_distance}")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "run"
        table, build_s = timed(synthetic_run, root, args.rows, args.shards)
        print(f"built the synthetic run in {build_s:.1f} s (not timed below)")

        selection, select_s = timed(select, table, config)
        kept = pc.sum(selection[schema.KEEP]).as_py()
        passed = pc.sum(pc.or_kleene(selection[schema.KEEP], pc.equal(selection[schema.DROP_REASON], "balance_quota"))).as_py()
        print(f"select() in memory:                {select_s:6.2f} s   kept {kept:,}; {passed:,} passed the filters")

        hashes = table[schema.PHASH].to_numpy()
        _, dedup_all_s = timed(near_duplicate_groups, hashes, config.filters.near_duplicate_max_distance)
        print(f"near-duplicate groups, all {args.rows:,} rows (worst case: every row passes): {dedup_all_s:6.2f} s")

        stats, run_s = timed(run_select, root, config)
        rows, funnel_s = timed(funnel, root)
        assert rows[-1]["rows"] == stats.kept
        total = run_s + funnel_s
        print(f"run_select (read, join, select, write selection + pool): {run_s:6.2f} s")
        print(f"funnel:                            {funnel_s:6.2f} s")
        print(f"selection + funnel, from Parquet:  {total:6.2f} s   = {total / 10.0:.2f} x the 10 s goal")

        _, report_s = timed(build_report, root, config)
        print(f"build_report (histograms, concepts, contact sheets; not part of the goal): {report_s:6.2f} s")

        n = min(args.brute_force_rows, args.rows)
        subset = np.unique(hashes[:n])
        t = config.filters.near_duplicate_max_distance
        (i, _), banded_s = timed(near_duplicate_pairs, subset, t)
        start = time.perf_counter()
        u = subset.view(np.uint64)
        found = 0
        for lo in range(0, len(u), 2048):  # all pairs, blockwise
            block = np.bitwise_count(u[lo : lo + 2048, None] ^ u[None, :]) <= t
            found += int(np.triu(block, k=lo + 1).sum())
        brute_s = time.perf_counter() - start
        assert found == len(i), (found, len(i))
        print(f"near-duplicate pairs on {len(subset):,} hashes: banded {banded_s:.3f} s vs brute force {brute_s:.2f} s "
              f"= {brute_s / banded_s:.0f}x faster, same {found} pairs")


CHILD = """
import resource, sys, time
from pathlib import Path
from pipeline.config import parse_config
from pipeline.report import build_report, funnel
from pipeline.select import run_select
root, config = Path(sys.argv[1]), parse_config({"scorers": {}})
t0 = time.perf_counter(); stats = run_select(root, config); t1 = time.perf_counter()
rows = funnel(root); t2 = time.perf_counter(); build_report(root, config); t3 = time.perf_counter()
assert rows[-1]["rows"] == stats.kept
print(f"run_select {t1 - t0:.1f} s (kept {stats.kept:,} of {stats.rows:,}), funnel {t2 - t1:.2f} s, build_report {t3 - t2:.1f} s")
print(f"peak RSS of the selection process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
"""


def memory_only(rows: int, shards: int) -> None:
    """Peak memory of selection + report on ``rows`` rows, measured in a child process that does only that."""
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "run"
        table, build_s = timed(synthetic_run, root, rows, shards)
        del table
        print(f"rows {rows:,} in {shards} shards, built in {build_s:.1f} s (not measured below)")
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        subprocess.run([sys.executable, "-c", CHILD, str(root)], check=True, env=env)


if __name__ == "__main__":
    main()
