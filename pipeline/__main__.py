"""``python -m pipeline <sample|ingest|score|select|report|run|weights> --help``

Each command is one stage over a run directory (see pipeline/layout.py); ``run`` does all of them.
Errors a user can fix (a missing path, a bad config key, no image column: a pipeline.errors.UserError)
print one line and exit 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path


def _config(args):
    from pipeline.config import load_config

    return load_config(args.config)


def _print(result) -> None:
    print(json.dumps(asdict(result) if is_dataclass(result) else result, indent=2, default=str))


def cmd_sample(args) -> None:
    from pipeline.sample import generate_sample

    print(generate_sample(Path(args.out), n=args.n, seed=args.seed))


def cmd_ingest(args) -> None:
    from pipeline.ingest import ingest

    cfg = _config(args)
    _print(
        ingest(
            args.sources,
            Path(args.run),
            shard_rows=cfg.ingest.shard_rows,
            thumbnail_size=cfg.ingest.thumbnail_size,
            progress=not args.quiet,
            backend=args.backend,  # run: the same backend as scoring
        )
    )


def cmd_score(args) -> None:
    from pipeline.engine import score_run
    from pipeline.scorers import build_chain

    cfg = _config(args)
    scorers = build_chain({name: opts for name, opts in cfg.scorers.items()})
    _print(score_run(Path(args.run), scorers, backend=args.backend, progress=not args.quiet))


def cmd_select(args) -> None:
    from pipeline.select import run_select

    _print(run_select(Path(args.run), _config(args)))


def cmd_report(args) -> None:
    from pipeline.report import build_report

    print(build_report(Path(args.run), _config(args)))


def cmd_run(args) -> None:
    for step in (cmd_ingest, cmd_score, cmd_select, cmd_report):
        step(args)


def cmd_weights(args) -> None:
    from pipeline.weights import prefetch_all

    _print(prefetch_all(_config(args)))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, fn, help, run=True, sources=False, config=True):
        sp = sub.add_parser(name, help=help, description=help)
        if sources:
            sp.add_argument("sources", nargs="+", help="image folders (with captions.jsonl/.csv), Parquet files, WebDataset .tar shards; globs allowed")
        if run:
            sp.add_argument("--run", required=True, help="the run directory every stage reads and writes")
        if config:
            sp.add_argument("--config", default=None, help="pipeline YAML (default: the packaged configs/pipeline.yaml)")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
        sp.set_defaults(fn=fn)
        return sp

    s = add("sample", cmd_sample, "generate the embedded sample (real photos + controlled defects)", run=False, config=False)
    s.add_argument("out")
    s.add_argument("--n", type=int, default=300)
    s.add_argument("--seed", type=int, default=0)
    ingest = add("ingest", cmd_ingest, "read sources into ingest shards (hash, header, thumbnail); bad rows to quarantine", sources=True)
    ingest.add_argument("--backend", choices=["local", "ray"], default="local", help="inspect images in a local process pool or in Ray tasks per source unit")
    for name, fn, help in (
        ("score", cmd_score, "run the configured scorers over the ingest shards (Ray, or --backend local)"),
        ("run", cmd_run, "ingest, score, select and report in one go (--backend: ingest and score on Ray, or local)"),
    ):
        sp = add(name, fn, help, sources=name == "run")
        sp.add_argument("--backend", choices=["ray", "local"], default="ray")
    add("select", cmd_select, "apply thresholds and the domain-balanced cut; write the pool")
    add("report", cmd_report, "write the funnel, histograms and contact sheets as HTML")
    add("weights", cmd_weights, "pre-stage every model the config names (run where there is network)", run=False)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    from pipeline.errors import UserError

    # What a user can fix is a UserError (every stage's error class, WeightsError included): one line,
    # exit 2, as in `python -m model`. Anything else, an OSError included, is a bug and keeps its traceback.
    try:
        args.fn(args)
    except UserError as exc:
        print("error: " + " ".join(line.strip() for line in str(exc).splitlines() if line.strip()), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
