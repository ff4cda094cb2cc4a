"""Annotations needed to reach the curated set: random order vs the learned keep-probability order
(issue 16, annotation/active.py), with simulated annotators on a haystack of known quality.

    .venv/bin/python benchmarks/bench_active.py --count 3000 --seeds 10 --target 30 --batch 100 \
        --figure benchmarks/active_curve.png

1. the synthetic haystack (experiment/haystack.py: images whose quality q we planted) is ingested and
   scored by the pipeline itself (size + technical: the cheap scores, local backend);
2. features as the head reads them in production (annotation.active.run_features): the cheap scores, and
   the ImageNet MobileNetV2 features of the thumbnails when its weights are staged ($TORCH_HOME);
3. per seed, simulated annotators decide keep when q + N(0, noise^2) > the (1 - keep_rate) quantile of q;
   the pool is annotated in batches, in a random order or in the order of a head refitted after each
   batch on the decisions so far; the count is the annotations until ``target`` keeps (Emu: 2K of 200K,
   here scaled to ``target`` of ``count``);
4. prints per feature kind the mean annotations needed with a bootstrap 95% CI over seeds, the saving with
   its paired bootstrap CI, and the mean curve (keeps found after k annotations); ``--figure`` draws it.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from annotation.active import compare_orders, imagenet_available, run_features  # noqa: E402
from experiment.haystack import make_haystack, read_truth  # noqa: E402
from pipeline.engine import score_run  # noqa: E402
from pipeline.ingest import ingest  # noqa: E402
from pipeline.scorers import build_chain  # noqa: E402


def quality_by_id(run: Path, haystack: Path) -> dict[str, float]:
    truth = read_truth(haystack)
    q = dict(zip(truth["file_name"].to_pylist(), truth["q"].to_pylist()))
    rows = duckdb.sql(f"SELECT id, source_key FROM '{run}/ingest/shard-*.parquet'").fetchall()
    return {i: q[key] for i, key in rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=3000, help="haystack images")
    parser.add_argument("--seeds", type=int, default=10, help="simulated campaigns per order")
    parser.add_argument("--target", type=int, default=30, help="keeps to reach (the curated set)")
    parser.add_argument("--batch", type=int, default=100, help="annotations between refits")
    parser.add_argument("--keep-rate", type=float, default=0.03, help="share of q above the annotators' threshold")
    parser.add_argument("--noise", type=float, default=0.03, help="annotator noise (sd, in units of q)")
    parser.add_argument("--features", nargs="+", default=["scores", "imagenet"], choices=["scores", "imagenet"])
    parser.add_argument("--figure", type=Path, help="PNG of the curves")
    parser.add_argument("--work", type=Path, help="keep the haystack and run here (default: a temporary folder)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        haystack, run = work / "haystack", work / "run"
        t0 = time.perf_counter()
        if not (haystack / "truth.parquet").exists():
            make_haystack(haystack, args.count, seed=0)
        if not run.exists():
            ingest([haystack], run, shard_rows=1000)
            score_run(run, build_chain({"size": {}, "technical": {}}), backend="local")
        quality = quality_by_id(run, haystack)
        print(f"haystack {args.count} images, ingested and scored in {time.perf_counter() - t0:.0f}s")
        kinds = [k for k in args.features if k != "imagenet" or imagenet_available()]
        if len(kinds) < len(args.features):
            print("imagenet features skipped: MobileNetV2 is not staged under $TORCH_HOME/hub/checkpoints")
        results = {}
        for kind in kinds:
            t0 = time.perf_counter()
            features = run_features(run, kind)
            q = np.array([quality[i] for i in features.ids])
            threshold = float(np.quantile(q, 1 - args.keep_rate))
            t1 = time.perf_counter()
            results[kind] = compare_orders(features.matrix, q, args.target, args.batch, args.seeds, threshold, args.noise,
                                           kind)
            r = results[kind]
            print(f"\n[{kind}: {features.matrix.shape[1]} features in {t1 - t0:.0f}s; simulation {time.perf_counter() - t1:.0f}s]")
            print(f"pool {r.pool}, annotators keep {r.keep_rate:.1%} (q > {threshold:.3f} + N(0, {args.noise}^2)), "
                  f"target {r.target} keeps, batches of {r.batch}, {args.seeds} seeds")
            for order in ("random", "learned"):
                low, high = r.ci[order]
                print(f"  {order:8s} annotations needed: mean {r.mean[order]:7.1f} (95% CI {low:.1f}-{high:.1f}); "
                      f"per seed {r.needed[order]}")
            print(f"  saving: {r.saving:.1%} (95% CI {r.saving_ci[0]:.1%}-{r.saving_ci[1]:.1%})")
            print("  annotations   keeps found (mean): random  learned")
            for k in sorted({args.batch, 2 * args.batch, 4 * args.batch, 8 * args.batch, 16 * args.batch}):
                cells = [f"{c[min(k, len(c)) - 1]:6.1f}" for c in (r.curves["random"], r.curves["learned"])]
                print(f"  {k:11d}   {'  '.join(cells)}")
        print(f"\nmachine: {platform.machine()} {platform.system()}, python {platform.python_version()}")
        if args.figure:
            draw(results, args)
    return 0


def draw(results: dict, args: argparse.Namespace) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    first = next(iter(results.values()))  # the random order is the same campaign whatever the features
    ax.plot(np.arange(1, len(first.curves["random"]) + 1), first.curves["random"], "--", color="grey",
            label="random order")
    for kind, r in results.items():
        curve = r.curves["learned"]
        ax.plot(np.arange(1, len(curve) + 1), curve, "-", label=f"learned order ({kind} features)")
    ax.axhline(args.target, color="black", lw=0.6)
    ax.set_xlabel("annotations")
    ax.set_ylabel("keeps found (mean over seeds; a campaign stops at the target)")
    ax.set_title(f"haystack of {args.count}: reaching {args.target} keeps, random vs learned order")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.figure, dpi=110)
    print(f"figure: {args.figure}")


if __name__ == "__main__":
    sys.exit(main())
