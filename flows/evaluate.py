"""Flow ``evaluate`` (deployment ``ab-test``): did quality-tuning help? generate -> automatic judges -> human
A/B rounds in Label Studio (suspended while people vote, resumed by the relay) -> report.

Like ``curate``, the flow holds no logic: each task calls model/evaluation or annotation/abtest with paths, is
cached on its inputs (checkpoint folders, prompts, settings) with persisted results, and a run re-executed
after a resume answers every finished stage from the cache.

    RUN/generate/        the same prompts and seeds for every checkpoint (manifest.parquet + images)
    RUN/judges/          aesthetic, CLIP score (when CLIP is staged), OCR words, sharpness/contrast, KID/CMMD
    RUN/ab/<A>-vs-<B>/<criterion>/   pairs, votes, summary of one A/B question for one candidate
    RUN/report/index.html
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.caching import stage_key
from flows.lock import run_dir_lock
from flows.params import EvalParams, data_root, flow_parameters
from flows.waiting import done_waiting, wait_for_people

#: the deployment `python -m flows serve` registers for this flow
DEPLOYMENT = "ab-test"


def _layout(run_dir: str):
    from model.evaluation.layout import EvalLayout

    return EvalLayout(Path(run_dir))


def comparison_dir(run_dir: str, candidate: str, baseline: str) -> Path:
    """RUN/ab/<candidate>-vs-<baseline>: the A/B work folder of one comparison (one subfolder per criterion)."""
    return _layout(run_dir).ab / f"{candidate}-vs-{baseline}"


def eval_campaign(run_dir: str, candidate: str, baseline: str) -> str:
    """Label Studio project titles of one comparison: ``<run folder, cut to 12>-<8 hex of run and pair>`` (at
    most 21 characters, so "<campaign> · ab-faithfulness · <part>" fits Label Studio's 50)."""
    path = Path(run_dir).resolve()
    slug = re.sub(r"[^a-z0-9-]+", "-", path.name.lower())[:12].strip("-") or "eval"
    digest = hashlib.sha256(f"{path}\0{candidate}\0{baseline}".encode()).hexdigest()[:8]
    return f"{slug}-{digest}"


def start_evaluation(params: EvalParams, wait: bool):
    """Start a run of the ``evaluate/ab-test`` deployment with ``params``; ``wait``: until it ends (returns
    the finished run), else at once (the run suspends while people vote and the relay resumes it)."""
    from prefect.deployments import run_deployment

    return run_deployment(f"evaluate/{DEPLOYMENT}", timeout=None if wait else 0,
                          parameters=params.model_dump(exclude_defaults=True) | {
                              "checkpoints": params.checkpoints, "run_dir": params.run_dir})


def latest_checkpoints(root: Path | None = None) -> tuple[Path, Path]:
    """The newest training run's base (last pre-training stage) and quality-tuned (best) pipelines under
    ``root`` (default: the data root)."""
    root = data_root() if root is None else root
    tuned = sorted(root.glob("**/quality_tune/best/model_index.json"), key=lambda p: p.stat().st_mtime)
    for best in reversed(tuned):
        train_dir = best.parents[2]
        bases = sorted(train_dir.glob("pretrain/*/final/model_index.json"))
        if bases:
            return bases[-1].parent, best.parent
    raise FileNotFoundError(f"no trained base and quality-tuned pair under {root}/ (run `make demo` first)")


# --- generate and judge -------------------------------------------------------------------------


def _generate_key(ctx, p) -> str:
    layout = _layout(p["run_dir"])
    # The output folder is part of every key: the same work written into another run is other work.
    settings = {k: p[k] for k in ("checkpoints", "prompts", "n_prompts", "seeds", "steps", "guidance_scale", "resolution")}
    settings["into"] = str(layout.run.resolve())
    inputs = [*p["checkpoints"].values(), *([p["prompts"]] if Path(p["prompts"]).exists() else [])]
    return stage_key("generate", settings, inputs, layout.manifest.is_file())


@task(name="generate", cache_key_fn=_generate_key, persist_result=True)
def generate_stage(checkpoints: dict[str, str], run_dir: str, prompts: str, n_prompts: int | None, seeds: int,
                   steps: int, guidance_scale: float, resolution: int | None) -> str:
    from model.evaluation.generate import generate
    from model.evaluation.prompts import load_prompts, selection_prompts

    # the prompts that chose a checkpoint during training are not reported on (issue 10, item 6)
    chose = selection_prompts(checkpoints.values())
    for path, used in chose.items():
        print(f"left out the {len(used)} prompts that chose {path} during training")
    table = load_prompts(prompts, n=n_prompts, exclude={p for used in chose.values() for p in used})
    return str(generate(checkpoints, table, seeds, _layout(run_dir).generate, steps=steps, guidance_scale=guidance_scale,
                        height=resolution, width=resolution))


def _judge_key(ctx, p) -> str:
    layout = _layout(p["run_dir"])
    inputs = [layout.manifest, *([p["reference"]] if p["reference"] else [])]
    section = {"reference": p["reference"], "into": str(layout.run.resolve())}
    return stage_key("judges", section, inputs, layout.judges_summary.is_file())


@task(name="judges", cache_key_fn=_judge_key, persist_result=True)
def judge_stage(run_dir: str, reference: str | None) -> dict:
    from model.evaluation.judges import judge

    layout = _layout(run_dir)
    summary = judge(layout.generate, layout.judges, reference)
    for name, reason in summary.get("skipped", {}).items():
        print(f"judge {name} skipped: {reason}")
    return summary


# --- the human A/B rounds -------------------------------------------------------------------------


def _criterion(name: str, votes: int | None):
    from annotation.abtest import get_criterion

    return get_criterion(name, votes_per_pair=votes)


def _settings():
    from annotation.client import LabelStudioSettings

    return LabelStudioSettings.from_env()


def _pairs_key(ctx, p) -> str:
    from annotation.layout import ABLayout

    pairs = ABLayout(Path(p["work"]), p["criterion"]).pairs
    section = [p["candidate"], p["baseline"], str(pairs.resolve())]
    return stage_key(f"pairs-{p['criterion']}", section, [p["manifest"]], pairs.is_file())


@task(name="ab-pairs", cache_key_fn=_pairs_key, persist_result=True)
def pairs_stage(manifest: str, candidate: str, baseline: str, criterion: str, work: str) -> str:
    from annotation.abtest import build_pairs

    return str(build_pairs(Path(manifest).parent, candidate, baseline, _criterion(criterion, None), Path(work)))


def _push_key(ctx, p) -> str:
    return stage_key(f"ab-push-{p['criterion']}", [p["campaign"], p["votes"]], [p["pairs"]], True)


@task(name="ab-push", cache_key_fn=_push_key, persist_result=True, retries=2, retry_delay_seconds=10)
def push_stage(pairs: str, criterion: str, votes: int | None, campaign: str, work: str) -> dict:
    from dataclasses import asdict

    from annotation.abtest import push_ab

    return asdict(push_ab(_criterion(criterion, votes), campaign, Path(work), _settings()))


@task(name="simulated-voters", retries=2, retry_delay_seconds=10)
def simulate_stage(criterion: str, votes: int | None, campaign: str) -> dict:
    """DEMO/TEST MODE: scripted voters who prefer the sharper image (annotation/abtest.py)."""
    from annotation.abtest import simulate_ab
    from annotation.client import LabelStudioClient

    criterion_ = _criterion(criterion, votes)
    done = simulate_ab(LabelStudioClient(_settings()), criterion_, campaign, criterion_.votes_per_pair)
    return {who: dict(counts) for who, counts in done.items()}


# never cached: a run that re-executes after a resume must see the round as it is now
@task(name="ab-status", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
def status_stage(criterion: str, votes: int | None, campaign: str) -> dict:
    from annotation.abtest import ab_status

    return ab_status(_criterion(criterion, votes), campaign, _settings()).to_dict()


@task(name="ab-pull-and-summarise", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
def pull_stage(criterion: str, votes: int | None, campaign: str, work: str) -> str:
    from annotation.abtest import pull_ab, summarise_ab

    criterion_ = _criterion(criterion, votes)
    pull_ab(criterion_, campaign, Path(work), _settings())
    return str(summarise_ab(criterion_, Path(work)))


def ab_round(manifest: str, candidate: str, baseline: str, criterion: str, params: EvalParams) -> dict:
    """Pairs -> push -> (people vote, the run suspended) -> pull -> summary of one criterion."""
    from annotation.abtest import wait_for_ab
    from annotation.layout import ABLayout

    work = comparison_dir(params.run_dir, candidate, baseline)
    campaign = eval_campaign(params.run_dir, candidate, baseline)
    votes = params.votes_per_pair.get(criterion)
    pairs = pairs_stage(manifest, candidate, baseline, criterion, str(work))
    push_stage(pairs, criterion, votes, campaign, str(work))
    if params.annotator_mode == "simulated":
        simulate_stage(criterion, votes, campaign)
    status = status_stage(criterion, votes, campaign)
    waiting = ABLayout(work, criterion).waiting
    if not status["complete"]:
        wait_for_people(
            waiting, {"kind": "ab", "round": criterion, "votes": votes, "campaign": campaign},
            status.get("tasks"), status["remaining"], params.round_timeout_s,
            lambda: wait_for_ab(_criterion(criterion, votes), campaign, _settings(), timeout_s=params.round_timeout_s),
        )
    summary = json.loads(Path(pull_stage(criterion, votes, campaign, str(work))).read_text())
    done_waiting(waiting)
    return summary


# --- report -----------------------------------------------------------------------------------------


@task(name="eval-report", cache_policy=NO_CACHE)
def report_stage(run_dir: str, baseline: str) -> str:
    from model.evaluation.report import build_report, win_table

    html = build_report(Path(run_dir))
    rows = win_table(Path(run_dir))
    if rows:
        create_table_artifact(rows, key="win-tie-lose", description=f"A/B win / tie / lose against {baseline}, 95% CIs "
                              "from a cluster bootstrap over prompts")
    create_link_artifact(html.resolve().as_uri(), link_text="evaluation report", key="evaluation-report")
    return str(html)


@flow(name="evaluate", log_prints=True, persist_result=True)
@flow_parameters(EvalParams)
def evaluate(**values: Any) -> dict:
    """Compare ``checkpoints`` ({label: pipeline folder}) against ``baseline`` (flows/params.py: EvalParams)."""
    params = EvalParams.parse(values)
    with run_dir_lock(params.run_dir):
        return _evaluate(params)


def _evaluate(params: EvalParams) -> dict:
    manifest = generate_stage(params.checkpoints, params.run_dir, params.prompts, params.n_prompts, params.seeds,
                              params.steps, params.guidance_scale, params.resolution)
    judge_stage(params.run_dir, params.reference)
    ab = {}
    for candidate in params.candidates:
        for criterion in params.criteria:
            summary = ab_round(manifest, candidate, params.baseline, criterion, params)
            ab[f"{candidate}-vs-{params.baseline}/{criterion}"] = summary["comparison"]
    report = report_stage(params.run_dir, params.baseline)
    result = {"report": report, "manifest": manifest, "ab": ab}
    print(f"evaluation report: {report}")
    return result
