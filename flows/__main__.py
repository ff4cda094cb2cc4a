"""``python -m flows <serve|relay|up|down|where|run|evaluate>``

serve   serve the deployments curate/quality-set, train-qt/train-qt, evaluate/ab-test and preference/dpo (a long-running process)
relay   resume suspended curate and evaluate runs when their annotation round completes (a long-running process)
up      start the local stack: Prefect server, serve, relay, Label Studio (PID files in .run/)
down    stop all of them by PID
where   print where the latest curated set, report and checkpoint are
run     run a deployment (``run curate/quality-set --params JSON``), follow it, and on failure print why and exit 1
evaluate  run the evaluate/ab-test deployment on two checkpoints (--base, --tuned) and print where the report is
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

#: runs of each deployment that may be *running* at once (Prefect's deployment concurrency limit; more wait
#: in AwaitingConcurrencySlot). A suspended run holds no slot, so runs waiting on people never block others;
#: one curation's scoring, one training, one evaluation's generation already fill a host's Ray, GPU or CPUs.
CONCURRENCY = {"quality-set": 1, "train-qt": 1, "ab-test": 1, "dpo": 1}


def serve() -> None:
    from prefect import serve as prefect_serve

    from flows.curate import curate
    from flows.evaluate import DEPLOYMENT as EVAL_DEPLOYMENT
    from flows.evaluate import evaluate
    from flows.preference import DEPLOYMENT as PREF_DEPLOYMENT
    from flows.preference import preference
    from flows.train import train_qt

    prefect_serve(
        curate.to_deployment(
            name="quality-set",
            parameters={"sources": ["data/sample"]},  # relative to the data root (flows/params.py)
            concurrency_limit=CONCURRENCY["quality-set"],
            description="Emu-style curation: automatic filters -> pool -> generalist -> specialist -> curated set",
        ),
        train_qt.to_deployment(name="train-qt", concurrency_limit=CONCURRENCY["train-qt"],
                               description="quality-tune the LDM on the latest curated set"),
        evaluate.to_deployment(name=EVAL_DEPLOYMENT, concurrency_limit=CONCURRENCY[EVAL_DEPLOYMENT],
                               description="did quality-tuning help? generations, automatic judges, human A/B "
                               "rounds in Label Studio, report"),
        preference.to_deployment(name=PREF_DEPLOYMENT, concurrency_limit=CONCURRENCY[PREF_DEPLOYMENT],
                                 description="preference tuning: candidates, best/worst round or AI feedback, "
                                 "Diffusion-DPO / SimPO, evaluation"),
    )


def run_and_follow(deployment: str, parameters: dict, poll_s: float = 2.0) -> int:
    """Start a run of ``deployment`` and follow it to its end, printing each state it enters; 0 when it
    completes, else the final state's message (the exception that failed it) on stderr and 1. A run that
    suspends on a round waits for the relay to resume it, as ``prefect deployment run --watch`` would."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

    try:
        run = run_deployment(deployment, parameters=parameters, timeout=0)
    except ObjectNotFound:
        print(f"error: no deployment {deployment!r} (is `python -m flows serve` running? `make up`)", file=sys.stderr)
        return 2
    except PrefectHTTPStatusError as exc:  # e.g. parameters the deployment's schema refuses
        detail = exc.response.json().get("detail", exc.response.text) if exc.response.content else str(exc)
        print(f"error: {deployment}: {' '.join(str(detail).split())}", file=sys.stderr)
        return 2
    print(f"flow run {run.name} ({run.id}) of {deployment} started")
    seen = None
    with get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(run.id).state
            if state.name != seen:
                seen = state.name
                note = ": waiting for annotators in Label Studio; the relay resumes it" if state.is_paused() else ""
                print(f"{run.name}: {state.name}{note}", flush=True)
            if state.is_final():
                break
            time.sleep(poll_s)
    if state.is_completed():
        return 0
    print(f"error: flow run {run.name} ({run.id}) ended {state.name}: {' '.join((state.message or '').split())}",
          file=sys.stderr)
    return 1


def where(root: Path | None = None) -> None:
    from flows.params import data_root

    root = data_root() if root is None else root

    def newest(pattern: str) -> str:
        found = sorted(root.glob(pattern), key=lambda p: p.stat().st_mtime)
        return str(found[-1]) if found else "(none yet)"

    print(f"curated set:  {newest('**/annotation/curated')}")
    print(f"report:       {newest('**/report/index.html')}")
    print(f"checkpoint:   {newest('**/train-qt/**/model_index.json').rsplit('/', 1)[0]}")
    print(f"sample grids: {newest('**/train-qt/**/samples/*.png')}")


def run_evaluation(args: argparse.Namespace) -> int:
    """Start the ``evaluate/ab-test`` deployment; with simulated voters wait for it and print the report's
    path, with people print where to follow it (the run suspends until they have voted)."""
    from pydantic import ValidationError

    from flows.evaluate import start_evaluation
    from flows.params import EvalParams
    from model.evaluation.layout import EvalLayout

    checkpoints = {"tuned": str(Path(args.tuned).resolve()), "base": str(Path(args.base).resolve())}
    try:  # every parameter checked before the run starts, with the reason in one line each
        params = EvalParams(checkpoints=checkpoints, baseline="base", run_dir=args.run_dir,
                            prompts=args.prompts, n_prompts=args.n_prompts, seeds=args.seeds, steps=args.steps,
                            reference=args.reference, criteria=args.criteria, annotator_mode=args.annotators)
    except ValidationError as error:
        for e in error.errors():
            print(f"error: {'.'.join(map(str, e['loc']))}: {e['msg']}", file=sys.stderr)
        return 2
    wait = args.annotators == "simulated"
    run = start_evaluation(params, wait)
    report = EvalLayout(Path(params.run_dir)).report / "index.html"
    if not wait:
        print(f"evaluation run {run.id} started: it suspends while people vote in Label Studio and the relay resumes "
              f"it; follow it in the Prefect UI, the report will be {report}")
        return 0
    if not run.state.is_completed():
        print(f"evaluation run {run.id} ended {run.state.name}: {run.state.message}", file=sys.stderr)
        return 1
    print(f"evaluation report: {report}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["serve", "relay", "up", "down", "where", "run", "evaluate"])
    parser.add_argument("deployment", nargs="?", help="run: the deployment, e.g. curate/quality-set")
    parser.add_argument("--params", default="{}", help="run: the parameters as a JSON object")
    parser.add_argument("--no-labelstudio", action="store_true", help="up/down: leave Label Studio alone")
    group = parser.add_argument_group("evaluate")
    group.add_argument("--base", help="the baseline pipeline folder")
    group.add_argument("--tuned", help="the quality-tuned pipeline folder")
    group.add_argument("--run-dir", default="data/runs/eval",
                       help="inside the data root (NEEDLES_DATA_DIR, default ./data)")
    group.add_argument("--annotators", choices=["people", "simulated"], default="people")
    group.add_argument("--prompts", default="parti", help="parti, drawbench or a prompt file")
    group.add_argument("--n-prompts", type=int)
    group.add_argument("--seeds", type=int, default=2)
    group.add_argument("--steps", type=int, default=25)
    group.add_argument("--reference", help="reference images for KID (folder, imagefolder or Parquet)")
    group.add_argument("--criteria", nargs="*", default=["appeal", "faithfulness", "flaws"])
    args = parser.parse_args(argv)
    if args.command == "evaluate" and not (args.base and args.tuned):
        parser.error("evaluate needs --base and --tuned")
    if args.command == "run":
        if not args.deployment:
            parser.error("run needs a deployment, e.g. curate/quality-set")
        try:
            parameters = json.loads(args.params)
        except ValueError as exc:
            parser.error(f"--params is not JSON: {exc}")
        if not isinstance(parameters, dict):
            parser.error("--params must be a JSON object of parameter names and values")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from flows import stack

    if args.command == "serve":
        serve()
    elif args.command == "relay":
        from flows.relay import run_forever

        run_forever()
    elif args.command == "up":
        stack.up(with_labelstudio=not args.no_labelstudio)
    elif args.command == "down":
        stack.down(with_labelstudio=not args.no_labelstudio)
    elif args.command == "run":
        return run_and_follow(args.deployment, parameters)
    elif args.command == "evaluate":
        return run_evaluation(args)
    else:
        where()
    return 0


if __name__ == "__main__":
    sys.exit(main())
