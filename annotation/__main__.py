"""python -m annotation <push|status|pull|export|simulate> --round generalist|specialist ...
python -m annotation <ab-pairs|ab-push|ab-status|ab-pull|ab-simulate> --criterion appeal|faithfulness|flaws ...

Label Studio is found from LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY (or LABEL_STUDIO_USER_TOKEN) and
LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT (defaults: those of annotation/labelstudio/start.sh). Without a
token, and for simulate/ab-simulate, dev mode is needed: NEEDLES_DEV=1 (the local stack's development
token, scripted users with random passwords); never set it against a real server.

    push      pool -> tasks in the round's projects (idempotent)
    status    counts, remaining, per-annotator progress and gold flags (JSON); --wait blocks until done
    pull      annotations -> WORK/<round>/annotations.parquet, then decisions and the next pool
    export    a pool (the specialist round's next pool) -> curated Parquet + imagefolder
    simulate  DEV MODE ONLY: scripted annotators answer the open tasks (see annotation/simulated.py)

Active learning and lineage (annotation/active.py, annotation/lineage.py; no server needed):
    active    finished rounds' votes -> a keep-probability head per round (held-out AUC, calibration),
              RUN/annotation/active/ranking.parquet (push --order it) and proposed threshold changes
    lineage   checkpoint -> curated images -> scores, drop reasons -> each round's votes -> source row

The human A/B rounds of the evaluation stage (annotation/abtest.py; WORK is RUN/ab):
    ab-pairs     generation manifest -> WORK/<criterion>/pairs.parquet (comparisons, gold, swapped repeats)
    ab-push      pairs -> tasks in the criterion's projects (idempotent)
    ab-status    counts, remaining, per-annotator progress and gold flags (JSON); --wait blocks until done
    ab-pull      votes -> WORK/<criterion>/votes.parquet, then summary.json (both rules, gold, bias, kappa)
    ab-simulate  DEV MODE ONLY: scripted voters prefer the sharper image

The preference round and preference pairs (annotation/preference.py; WORK is the round's folder):
    pref-candidates, pref-push, pref-status, pref-pull, pref-export   best and worst of 5 in Label Studio
    pref-judge    AI feedback: an automatic judge's pairs;  pref-from-ab: pairs from an A/B round's votes
    pref-simulate DEV MODE ONLY: scripted rankers (sharpest best, blurriest worst)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

import pyarrow.parquet as pq

from annotation.abtest import (
    CRITERIA, ab_status, build_pairs, get_criterion, pull_ab, push_ab, simulate_ab, summarise_ab, wait_for_ab,
)
from annotation.client import LabelStudioClient, LabelStudioSettings
from annotation.curation import decide_round, pull_round, push_round, round_status, wait_for_round
from annotation.active import FEATURE_KINDS, learn, task_priority
from annotation.export import export_curated
from annotation.layout import curated_dir
from annotation.lineage import lineage, lineage_sql, locate
from annotation import preference as preference_cli
from annotation.rounds import ROUNDS, get_round
from annotation.simulated import simulate_round
from pipeline.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m annotation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("push", "status", "pull", "export", "simulate"):
        p = sub.add_parser(name)
        p.add_argument("--round", choices=sorted(ROUNDS), required=name != "export")
        p.add_argument("--campaign", default="needles", help="names the Label Studio projects (1-30 chars)")
        p.add_argument("--work", type=Path, default=Path("runs/annotation"), help="work directory")
        p.add_argument("--target-size", type=int, help="override the round's target size")
        p.add_argument("--overlap", type=int, help="override the round's annotators per task")
        if name in ("push", "pull", "export"):
            p.add_argument("--pool", type=Path, required=True, help="pool Parquet file or shard folder")
        if name in ("push", "status", "pull"):
            p.add_argument("--gold", type=Path, help="gold table: pool columns + gold_answer")
    sub.choices["push"].add_argument("--order", type=Path, metavar="RANKING",
                                     help="import tasks by keep-probability (python -m annotation active's ranking.parquet)")
    sub.choices["status"].add_argument("--wait", type=float, metavar="SECONDS", help="block until complete")
    sub.choices["export"].add_argument("--out", type=Path, help="default: WORK/curated")
    sub.choices["simulate"].add_argument("--annotators", type=int, default=2)
    sub.choices["simulate"].add_argument("--keep-fraction", type=float, default=0.5)
    _add_ab_commands(sub)
    _add_learning_commands(sub)
    preference_cli.add_commands(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the progress
    if args.command.startswith("ab-"):
        return _run_ab(args)
    if args.command in ("active", "lineage"):
        return _run_learning(args)
    if args.command.startswith("pref-"):
        return preference_cli.run_command(args)

    overrides = {k: v for k, v in (("target_size", args.target_size), ("overlap", args.overlap)) if v}
    round_ = get_round(args.round, **overrides) if args.round else None
    try:
        # export needs no server; the others need its address and token (LabelStudioConfigError without one)
        settings = LabelStudioSettings.from_env() if args.command != "export" else None
        if args.command == "push":
            priority = task_priority(args.order) if args.order else None
            result = push_round(args.pool, round_, args.campaign, args.work, settings, gold=args.gold, priority=priority)
            print(json.dumps(asdict(result), indent=2))
        elif args.command == "status":
            if args.wait:
                wait_for_round(round_, args.campaign, settings, timeout_s=args.wait)
            print(json.dumps(round_status(round_, args.campaign, settings, gold=args.gold).to_dict(), indent=2))
        elif args.command == "pull":
            pull_round(round_, args.campaign, args.work, settings, gold=args.gold)
            next_pool = decide_round(round_, args.pool, args.work)
            print(next_pool)
            print((args.work / round_.name / "summary.json").read_text())
        elif args.command == "export":
            print(export_curated(args.pool, args.out or curated_dir(args.work)))
        elif args.command == "simulate":
            with LabelStudioClient(settings) as admin:
                done = simulate_round(admin, round_, args.campaign, args.annotators, args.keep_fraction)
            for name, count in done.items():
                print(f"{name}: {count} tasks")
    except (UserError, TimeoutError) as error:  # Label Studio's, the rounds' and the pools' errors are UserErrors
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _add_learning_commands(sub: argparse._SubParsersAction) -> None:
    active = sub.add_parser("active", help="learn a keep-probability from the finished rounds")
    active.add_argument("--run", type=Path, required=True, help="the pipeline run (RUN/score, RUN/select)")
    active.add_argument("--work", type=Path, help="the rounds' work directory (default: RUN/annotation)")
    active.add_argument("--features", choices=FEATURE_KINDS, default="auto",
                        help="auto: CLIP embeddings, else ImageNet features (MobileNetV2 staged), else the cheap scores")
    active.add_argument("--l2", type=float, default=1.0, help="L2 penalty of the logistic head")
    lineage_ = sub.add_parser("lineage", help="trace a checkpoint back to its votes and sources")
    lineage_.add_argument("checkpoint", type=Path, help="a checkpoint folder holding needles_lineage.json")
    lineage_.add_argument("--curated", type=Path, help="the curated set (default: from the checkpoint's record)")
    lineage_.add_argument("--work", type=Path, help="the rounds' work directory (default: the curated set's parent)")
    lineage_.add_argument("--run", type=Path, help="the pipeline run (default: the work directory's parent)")
    lineage_.add_argument("--out", type=Path, help="write the lineage table (one row per image x round x vote) here")
    lineage_.add_argument("--sql", action="store_true", help="print the DuckDB query instead of running it")


def _run_learning(args: argparse.Namespace) -> int:
    try:
        if args.command == "active":
            result = learn(args.run, args.work, kind=args.features, l2=args.l2)
            print(json.dumps(result.to_dict(), indent=2))
            print("rerun `python -m pipeline report` to see the proposals in the selection report", file=sys.stderr)
        elif args.sql:
            print(lineage_sql(locate(args.checkpoint, args.curated, args.work, args.run)))
        else:
            table, summary = lineage(args.checkpoint, args.curated, args.work, args.run)
            if args.out:
                pq.write_table(table, args.out)
                summary["table"] = str(args.out)
            print(json.dumps(summary, indent=2))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _add_ab_commands(sub: argparse._SubParsersAction) -> None:
    for name in ("ab-pairs", "ab-push", "ab-status", "ab-pull", "ab-simulate"):
        p = sub.add_parser(name)
        p.add_argument("--criterion", choices=sorted(CRITERIA), required=True)
        p.add_argument("--work", type=Path, default=Path("runs/eval/ab"), help="RUN/ab of the evaluation run")
        if name != "ab-pairs":
            p.add_argument("--campaign", default="needles", help="names the Label Studio projects")
            p.add_argument("--votes", type=int, help="override the criterion's votes per pair")
    pairs = sub.choices["ab-pairs"]
    pairs.add_argument("--manifest", type=Path, required=True, help="RUN/generate (holds manifest.parquet)")
    pairs.add_argument("--a", required=True, help="checkpoint label of the candidate (e.g. tuned)")
    pairs.add_argument("--b", required=True, help="checkpoint label of the baseline (e.g. base)")
    pairs.add_argument("--seed", type=int, default=0, help="seeds the left/right coin flips, gold and repeats")
    pairs.add_argument("--gold-fraction", type=float, default=0.05)
    pairs.add_argument("--repeat-fraction", type=float, default=0.05)
    sub.choices["ab-status"].add_argument("--wait", type=float, metavar="SECONDS", help="block until complete")
    sub.choices["ab-simulate"].add_argument("--voters", type=int, default=3)
    sub.choices["ab-simulate"].add_argument("--noise", type=float, default=0.0)
    sub.choices["ab-simulate"].add_argument("--skip-rate", type=float, default=0.0)


def _run_ab(args: argparse.Namespace) -> int:
    try:
        criterion = get_criterion(args.criterion, getattr(args, "votes", None))
        if args.command == "ab-pairs":
            print(build_pairs(args.manifest, args.a, args.b, criterion, args.work, seed=args.seed,
                              gold_fraction=args.gold_fraction, repeat_fraction=args.repeat_fraction))
            return 0
        settings = LabelStudioSettings.from_env()
        if args.command == "ab-push":
            print(json.dumps(asdict(push_ab(criterion, args.campaign, args.work, settings)), indent=2))
        elif args.command == "ab-status":
            if args.wait:
                wait_for_ab(criterion, args.campaign, settings, timeout_s=args.wait)
            print(json.dumps(ab_status(criterion, args.campaign, settings, work=args.work).to_dict(), indent=2))
        elif args.command == "ab-pull":
            print(pull_ab(criterion, args.campaign, args.work, settings))
            print(summarise_ab(criterion, args.work).read_text())
        else:
            with LabelStudioClient(settings) as admin:
                done = simulate_ab(admin, criterion, args.campaign, args.voters, args.noise, args.skip_rate)
            for name, count in done.items():
                print(f"{name}: {count['answered']} answered, {count['skipped']} skipped")
    except (UserError, TimeoutError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
