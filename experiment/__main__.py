"""``python -m experiment <haystack|run|calibrate> --help``: the small-scale quality-tuning experiment.

Errors a user can fix (a UserError: an unknown profile, a missing earlier step) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pipeline.errors import UserError


def cmd_haystack(args) -> None:
    from experiment.haystack import make_haystack

    print(make_haystack(Path(args.out), args.count, args.seed, args.size))


def cmd_run(args) -> None:
    from experiment.run import STEPS, run

    steps = tuple(args.step) if args.step else STEPS
    print(run(Path(args.out), args.profile, args.seed, steps, progress=args.progress, threads=args.threads or None,
              replicates=args.replicate))


def cmd_calibrate(args) -> None:
    """How the pixel q-estimator follows each planted defect: mean parts over clean scenes, per strength."""
    import dataclasses

    import numpy as np

    from experiment.haystack import PARTS, draw_scene, render
    from experiment.quality import estimate

    rng = np.random.default_rng(args.seed)
    scenes = [draw_scene(rng, defect_rate=0.0) for _ in range(args.scenes)]
    table = {}
    for defect in ("exposure", "washout", "clutter", "blur", "text", "blocking"):
        table[defect] = {}
        for strength in (0.0, 0.25, 0.5, 0.75, 1.0):
            est = [estimate(render(dataclasses.replace(s, **{defect: strength}), args.size)) for s in scenes]
            table[defect][strength] = {"q": float(np.mean([e.q for e in est]))} | {
                p: float(np.mean([getattr(e, p) for e in est])) for p in PARTS}
    print(json.dumps(table, indent=1))


def main(argv: list[str] | None = None) -> int:
    from experiment.run import PROFILES, STEPS

    parser = argparse.ArgumentParser(prog="python -m experiment", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("haystack", help="write a synthetic haystack (images, captions.jsonl, truth.parquet)")
    p.add_argument("out")
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64)
    p.set_defaults(fn=cmd_haystack)
    p = sub.add_parser("run", help="the experiment: haystack, curation, arms, judges, report (resumable)")
    p.add_argument("--out", default="data/experiment")
    p.add_argument("--profile", default="cpu", choices=sorted(PROFILES))
    p.add_argument("--seed", type=int, default=0, help="haystack, curation, subsets and prompts")
    p.add_argument("--step", action="append", choices=STEPS, help="run only these steps (repeatable); "
                   "default: all, each skipped when its outputs exist")
    p.add_argument("--progress", action="store_true", help="training progress bars")
    p.add_argument("--replicate", type=int, action="append", help="train/generate/judge only this replicate "
                   "(repeatable; default: all of the profile's)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default); ignored on CUDA")
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("calibrate", help="the q-estimator's parts against each planted defect's strength")
    p.add_argument("--scenes", type=int, default=16)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--size", type=int, default=64)
    p.set_defaults(fn=cmd_calibrate)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.fn(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
