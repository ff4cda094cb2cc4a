"""Scale-out rehearsal (issue 13, item 5): ingest -> score -> select -> report on a two-node Ray cluster
on loopback, with the worker node killed once mid-score.

    .venv/bin/python benchmarks/bench_scale.py [--rows 1000000] [--shard-rows 10000] [--quick]

1. Makes ``--rows`` synthetic rows in a Parquet source (image bytes + caption, ``--group-rows`` rows per
   row group = one Ray ingest task each): small real JPEGs (random crops of skimage's bundled photos,
   longest side 64-96 px, so some fall under ``min_side``), plus planted bad rows (empty bytes, garbage,
   truncated JPEGs -> quarantine), exact copies of earlier rows (-> duplicates) and flat or blurred
   images (-> the contrast and sharpness filters), so every funnel bucket is non-empty.
2. Starts a ``ray.cluster_utils.Cluster`` on loopback (a head and one worker node, ``--node-cpus``
   each) and connects the driver to it (``RAY_ADDRESS``; pipeline.engine.init_ray then joins it).
3. ``ingest(backend="ray")``; ``score_run`` (in a thread) with the cheap chain size + phash + technical;
   the main thread SIGKILLs the worker node's processes (``cluster.remove_node(...,
   allow_graceful=False)``) as soon as ``--kill-after`` score shards are committed, and (unless ``--no-replace``) adds a fresh worker
   node a few seconds later, as an autoscaler would. If the score run fails anyway, it is run again:
   the committed shards are skipped, and counted.
4. ``run_select`` and ``build_report`` (DuckDB, in the driver).

Printed: rows/s per stage (and per Ray CPU for the Ray stages), peak RSS of the driver and of the Ray
processes (psutil, sampled every ``--sample-s`` in a thread: the largest single Ray worker and the
largest sum over every Ray process of the cluster; RSS counts the shared object-store pages in each
process that maps them, so the sum is an upper bound), the kill and what it cost, and the funnel:
rows in = kept + dropped + quarantined + duplicates (asserted against the rows the generator wrote).

Everything runs on this one machine: the two "nodes" share its cores with the driver, so the rates are
those of the CPUs Ray was given, not of a real second machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import parse_config
from pipeline.engine import score_run
from pipeline.ingest import ingest
from pipeline.layout import RunLayout
from pipeline.report import build_report, funnel, funnel_markdown
from pipeline.scorers import build_chain
from pipeline.select import run_select

CHAIN = {"size": {}, "phash": {}, "technical": {}}
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "immunohistochemistry")


# --- the synthetic source ----------------------------------------------------------------------------


def _photos() -> list[Image.Image]:
    import skimage.data

    out = []
    for name in PHOTOS:
        try:
            photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
            photo.thumbnail((320, 320), Image.Resampling.LANCZOS)  # crops of it are then cheap to resize
            out.append(photo)
        except Exception as exc:  # noqa: BLE001 - a photo missing from this skimage (or its data cache): use the others
            print(f"skipping skimage photo {name}: {exc}")
    if not out:
        raise SystemExit("skimage's bundled photos are not available")
    return out


def _jpeg(image: Image.Image, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_source(path: Path, rows: int, group_rows: int, seed: int = 0) -> dict[str, int]:
    """Write ``rows`` rows to a Parquet file; return what was planted (by kind)."""
    rng = np.random.default_rng(seed)
    photos = _photos()
    planted = {"good": 0, "small": 0, "flat": 0, "blurred": 0, "exact_copy": 0, "empty": 0, "garbage": 0, "truncated": 0}
    kept_bytes: list[bytes] = []  # a few earlier images to copy exactly
    writer = pq.ParquetWriter(path, pa.schema([("key", pa.string()), ("image", pa.binary()), ("caption", pa.string())]))
    keys, images, captions = [], [], []
    try:
        for index in range(rows):
            roll = rng.random()
            if roll < 0.002:
                kind, data = "empty", b""
            elif roll < 0.004:
                kind, data = "garbage", rng.bytes(int(rng.integers(16, 400)))
            elif roll < 0.006 and kept_bytes:
                kind, data = "truncated", kept_bytes[int(rng.integers(len(kept_bytes)))][: int(rng.integers(200, 400))]
            elif roll < 0.016 and kept_bytes:
                kind, data = "exact_copy", kept_bytes[int(rng.integers(len(kept_bytes)))]
            else:
                base = photos[int(rng.integers(len(photos)))]
                side = int(rng.integers(64, min(base.size)))
                left = int(rng.integers(0, base.width - side + 1))
                top = int(rng.integers(0, base.height - side + 1))
                aspect = rng.uniform(0.6, 1.6)
                longest = int(rng.integers(64, 97))  # min_side is set to 56: some are too small
                width, height = (longest, max(8, round(longest / aspect))) if aspect >= 1 else (max(8, round(longest * aspect)), longest)
                crop = base.crop((left, top, left + side, top + side)).resize((width, height), Image.Resampling.BILINEAR)
                kind = "good"
                if roll < 0.03:
                    kind, crop = "flat", Image.new("RGB", crop.size, tuple(int(v) for v in rng.integers(0, 256, 3)))
                    crop.putpixel((0, 0), (int(rng.integers(256)), 0, 0))  # distinct bytes per flat image
                elif roll < 0.05:
                    kind, crop = "blurred", crop.filter(ImageFilter.GaussianBlur(4))
                data = _jpeg(crop)
                if min(width, height) < 56 and kind == "good":
                    kind = "small"
                if len(kept_bytes) < 256 and kind == "good":
                    kept_bytes.append(data)
            planted[kind] += 1
            keys.append(f"{index:09d}")
            images.append(data)
            captions.append(f"synthetic photo {index}" if index % 17 else None)
            if len(keys) == group_rows:
                writer.write_table(pa.table({"key": keys, "image": images, "caption": captions}), row_group_size=group_rows)
                keys, images, captions = [], [], []
        if keys:
            writer.write_table(pa.table({"key": keys, "image": images, "caption": captions}), row_group_size=group_rows)
    finally:
        writer.close()
    return planted


# --- memory sampling ---------------------------------------------------------------------------------


class RssSampler(threading.Thread):
    """Peak RSS of this process (the driver) and of every process under it (the cluster's GCS, raylets
    and Ray workers are its descendants), sampled every ``interval`` seconds."""

    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.me = psutil.Process()
        self.stop_event = threading.Event()
        self.driver_peak = 0
        self.worker_peak = 0  # the largest single Ray worker process
        self.worker_peak_name = ""
        self.cluster_sum_peak = 0  # every descendant together (GCS, raylets, agents, workers)
        self.workers_sum_peak = 0  # the Ray workers together
        self.samples = 0
        self.stage_driver_peak = 0  # the driver's peak since the last take_stage_peak()
        self.cpu_seen: dict[int, float] = {}  # pid -> its last-seen user + system CPU seconds
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)

    def sample(self) -> None:
        with self.lock:
            self._sample()

    def cpu_seconds(self) -> float:
        """CPU seconds (user + system) used so far by the driver and every cluster process seen (a
        process that ended loses its last sampling interval): on a shared machine, rows per CPU-second
        is the per-core rate that wall-clock rows/s cannot give."""
        self.sample()
        with self.lock:
            return sum(self.cpu_seen.values())

    def driver_cpu_seconds(self) -> float:
        times = self.me.cpu_times()
        return times.user + times.system

    def take_stage_peak(self) -> int:
        """The driver's peak RSS since the last call (sampled once more now); starts the next stage's."""
        self.sample()
        with self.lock:
            peak, self.stage_driver_peak = self.stage_driver_peak, 0
        return peak

    def _sample(self) -> None:
        rss = self.me.memory_info().rss
        self.driver_peak = max(self.driver_peak, rss)
        self.stage_driver_peak = max(self.stage_driver_peak, rss)
        times = self.me.cpu_times()
        self.cpu_seen[self.me.pid] = times.user + times.system
        total = workers = 0
        for proc in self.me.children(recursive=True):
            try:
                rss = proc.memory_info().rss
                name = proc.name()
                cmd = " ".join(proc.cmdline()[:3])
                times = proc.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            self.cpu_seen[proc.pid] = times.user + times.system
            total += rss
            if name.startswith("ray::") or "default_worker.py" in cmd:
                workers += rss
                if rss > self.worker_peak:
                    self.worker_peak, self.worker_peak_name = rss, name
        self.cluster_sum_peak = max(self.cluster_sum_peak, total)
        self.workers_sum_peak = max(self.workers_sum_peak, workers)
        self.samples += 1

    def stop(self) -> None:
        self.stop_event.set()
        self.join()
        self.sample()


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


# --- scoring in a thread, the kill in the main thread -------------------------------------------------


class ScoreThread(threading.Thread):
    """``score_run`` off the main thread, so the main thread can kill and add nodes (Ray's
    ``Cluster.add_node`` installs signal handlers, which only the main thread may do)."""

    def __init__(self, run: Path) -> None:
        super().__init__(daemon=True)
        self.run_dir = run
        self.stats = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.stats = score_run(self.run_dir, build_chain(CHAIN), backend="ray")
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc


def committed(score_dir: Path) -> int:
    return len(list(score_dir.glob("shard-*.parquet"))) if score_dir.exists() else 0


# --- the run -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--shard-rows", type=int, default=10_000, help="rows per ingest/score shard")
    parser.add_argument("--group-rows", type=int, default=2_000, help="rows per source row group (one ingest task)")
    parser.add_argument("--node-cpus", type=int, default=1, help="Ray CPUs of each of the two nodes")
    parser.add_argument("--kill-after", type=int, default=1, help="committed score shards before the kill")
    parser.add_argument("--no-replace", action="store_true", help="do not add a fresh node after the kill")
    parser.add_argument("--replace-delay", type=float, default=3.0)
    parser.add_argument("--sample-s", type=float, default=0.5, help="RSS sampling interval")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the source and run here (default: a temp dir, removed)")
    parser.add_argument("--quick", action="store_true", help="a small smoke: 3,000 rows, 500-row shards")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.shard_rows, args.group_rows = 3_000, 500, 500
    if args.rows < 4 * args.shard_rows:
        parser.error("--rows must be at least 4 x --shard-rows, so the kill falls mid-score")

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's single-machine mode: every node of the cluster, and the driver, take 127.0.0.1 as their
    # address and listen on loopback only (as pipeline.engine.init_ray does for a local Ray). Set before
    # ray is first imported, since ray reads it then; the nodes inherit it.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray.cluster_utils import Cluster

    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    source, run = root / "source.parquet", root / "run"
    shutil.rmtree(run, ignore_errors=True)
    figures: dict = {"rows": args.rows, "shard_rows": args.shard_rows, "group_rows": args.group_rows, "node_cpus": args.node_cpus}

    t = time.perf_counter()
    planted = make_source(source, args.rows, args.group_rows)
    figures["generate_s"] = round(time.perf_counter() - t, 2)
    print(f"source: {args.rows:,} rows, {source.stat().st_size / 2**20:,.1f} MiB in {figures['generate_s']} s; planted {planted}")

    sampler = RssSampler(args.sample_s)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.node_cpus, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=args.node_cpus)
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address  # the pipeline's init_ray joins this cluster
    ray.init(address=cluster.address, log_to_driver=False)
    cpus = int(ray.cluster_resources().get("CPU", 0))
    assert cluster.address.startswith("127.0.0.1:"), cluster.address
    print(f"cluster: {len(ray.nodes())} nodes on loopback at {cluster.address}, {cpus} Ray CPUs; machine: {os.cpu_count()} logical CPUs")
    sampler.start()
    stages: dict[str, dict] = {}

    def begin() -> tuple[float, float, float]:
        sampler.take_stage_peak()
        return time.perf_counter(), sampler.cpu_seconds(), sampler.driver_cpu_seconds()

    def measured(start: tuple[float, float, float], rows: int, seconds: float | None = None) -> dict:
        t0, c0, d0 = start
        return {"seconds": seconds if seconds is not None else time.perf_counter() - t0, "rows": rows,
                "cpu_s": sampler.cpu_seconds() - c0, "driver_cpu_s": sampler.driver_cpu_seconds() - d0,
                "driver_peak_rss": sampler.take_stage_peak()}
    try:
        # ingest
        start = begin()
        istats = ingest([source], run, shard_rows=args.shard_rows, backend="ray")
        stages["ingest"] = measured(start, istats.rows_in)
        print(f"ingest: {istats.rows_in:,} rows in {stages['ingest']['seconds']:.1f} s -> {len(istats.shards)} shards, "
              f"{istats.duplicates} duplicates, quarantined {istats.quarantine_reasons}")

        # score, with the worker node killed once
        layout = RunLayout(run)
        start = begin()
        t = start[0]
        attempts, failures, skipped_on_rerun = 0, [], None
        killed_at = replaced_at = None
        committed_at_kill = 0
        while True:
            attempts += 1
            scorer = ScoreThread(run)
            scorer.start()
            while killed_at is None and scorer.is_alive():
                if committed(layout.score) >= args.kill_after:
                    committed_at_kill = committed(layout.score)
                    cluster.remove_node(worker, allow_graceful=False)  # SIGKILL the node's raylet and workers
                    killed_at = time.perf_counter()
                    if not args.no_replace:
                        scorer.join(args.replace_delay)
                        cluster.add_node(num_cpus=args.node_cpus)  # as an autoscaler would
                        replaced_at = time.perf_counter()
                    break
                scorer.join(0.05)
            scorer.join()
            if scorer.error is None:
                sstats = scorer.stats
                break
            exc = scorer.error
            failures.append(f"{type(exc).__name__}: {str(exc)[:300]}")
            print(f"score attempt {attempts} failed ({failures[-1]}); rerunning")
            if attempts >= 3:
                raise exc
        if attempts > 1:
            skipped_on_rerun = sstats.shards_skipped
        score_s = time.perf_counter() - t
        scored_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in layout.score.glob("shard-*.parquet"))
        stages["score"] = measured(start, scored_rows, score_s)
        kill = {
            "killed": killed_at is not None,
            "committed_shards_at_kill": committed_at_kill,
            "killed_after_s": round(killed_at - t, 2) if killed_at else None,
            "replaced_after_s": round(replaced_at - killed_at, 2) if replaced_at else None,
            "score_attempts": attempts,
            "failures": failures,
            "shards_skipped_on_rerun": skipped_on_rerun,
            "shards_total": sstats.shards_total,
        }
        print(f"score: {scored_rows:,} rows in {score_s:.1f} s; kill: {kill}")
        assert kill["killed"], "the worker node was never killed: score finished before --kill-after shards"
        assert scored_rows == istats.ingested, f"scored {scored_rows} rows, ingested {istats.ingested}"

        # select + report (driver only, DuckDB)
        config = parse_config(
            {
                "scorers": CHAIN,
                "filters": {"min_side": 56, "min_clip_score": None, "min_aesthetic": None, "max_nsfw": None,
                            "max_ocr_words": None, "max_ocr_text_area": None},
                "balance": {"target_size": int(args.rows * 0.6)},
            }
        )
        start = begin()
        sel = run_select(run, config)
        stages["select"] = measured(start, sel.rows)
        start = begin()
        build_report(run, config)
        rows = funnel(run)
        stages["report"] = measured(start, sel.rows)
    finally:
        sampler.stop()
        ray.shutdown()
        cluster.shutdown()
        os.environ.pop("RAY_ADDRESS", None)

    by_stage = {r["stage"]: r for r in rows}
    rows_in = by_stage["rows in"]["rows"]
    kept = by_stage["kept"]["rows"]
    duplicates = by_stage["exact duplicates"]["rows"]
    quarantined = sum(r["rows"] for r in rows if r["stage"] == "quarantined")
    dropped = sel.dropped
    assert rows_in == args.rows, f"the funnel has {rows_in} rows in, the source {args.rows}"
    assert rows_in == kept + dropped + quarantined + duplicates
    assert min(kept, dropped, quarantined, duplicates) > 0, "a funnel bucket is empty"

    print()
    print(f"machine: {platform.node()}, {os.cpu_count()} logical CPUs (shared with other jobs: times are upper bounds, rates lower bounds), "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB; Python {platform.python_version()}, Ray {ray.__version__}")
    print("rows/s/CPU: wall-clock rate / the Ray CPUs the stage ran on (select and report: 1, the driver); "
          "rows/CPU-s: rows / the CPU seconds the driver and every cluster process used in the stage; "
          "driver rows/CPU-s: rows / the driver's own CPU seconds (the serial part's ceiling)")
    print(f"{'stage':8} {'rows':>10} {'seconds':>8} {'rows/s':>9} {'rows/s/CPU':>10} {'CPU-s':>8} {'rows/CPU-s':>10} {'driver CPU-s':>12} {'driver rows/CPU-s':>17} {'driver peak':>12}")
    for name, s in stages.items():
        rate = s["rows"] / s["seconds"]
        per = cpus if name in ("ingest", "score") else 1  # select and report run in the driver
        s.update(rows_per_s=round(rate, 1), rows_per_s_per_cpu=round(rate / per, 1), cpus=per,
                 rows_per_cpu_s=round(s["rows"] / max(s["cpu_s"], 1e-9), 1),
                 driver_rows_per_cpu_s=round(s["rows"] / max(s["driver_cpu_s"], 1e-9), 1))
        print(f"{name:8} {s['rows']:>10,} {s['seconds']:>8.1f} {rate:>9,.0f} {rate / per:>10,.0f} {s['cpu_s']:>8.1f} {s['rows_per_cpu_s']:>10,.0f} "
              f"{s['driver_cpu_s']:>12.1f} {s['driver_rows_per_cpu_s']:>17,.0f} {mib(s['driver_peak_rss']):>12}")
    print(f"peak RSS: driver {mib(sampler.driver_peak)}; largest Ray worker {mib(sampler.worker_peak)} ({sampler.worker_peak_name}); "
          f"Ray workers together {mib(sampler.workers_sum_peak)}; every cluster process together {mib(sampler.cluster_sum_peak)} "
          f"({sampler.samples} samples every {args.sample_s} s)")
    print(f"kill: worker node SIGKILLed {kill['killed_after_s']} s into scoring with {kill['committed_shards_at_kill']} of "
          f"{kill['shards_total']} shards committed; score attempts {attempts}"
          + (f", {skipped_on_rerun} committed shards skipped on the rerun" if skipped_on_rerun is not None else " (Ray retried; no rerun needed)"))
    print(f"funnel: rows in {rows_in:,} = kept {kept:,} + dropped {dropped:,} + quarantined {quarantined:,} + duplicates {duplicates:,}")
    print(f"dropped by reason: {sel.dropped_by_reason}")
    print(funnel_markdown(rows))
    figures.update(stages=stages, kill=kill, planted=planted, cpus=cpus,
                   rss={"driver": sampler.driver_peak, "worker_max": sampler.worker_peak, "workers_sum": sampler.workers_sum_peak,
                        "cluster_sum": sampler.cluster_sum_peak},
                   funnel={"rows_in": rows_in, "kept": kept, "dropped": dropped, "quarantined": quarantined, "duplicates": duplicates,
                           "dropped_by_reason": sel.dropped_by_reason, "ingest": asdict(istats) | {"shards": len(istats.shards)}})
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    if args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
