"""Flow ``preference`` (deployment ``dpo``): preference tuning of a checkpoint (issue 15).

    generate (5 seeds per prompt) -> pairs -> train-pref -> evaluate (the evaluate/ab-test deployment)

The pairs come from the preference round in Label Studio (``annotator_mode`` people or simulated: candidates,
push, wait until every task has its votes, pull, export) or, with ``annotator_mode`` ai, from the automatic
sharpness judge, labelled AI feedback (and the training then takes only that source). Like the other flows it
holds no logic: each step calls model/ or annotation/ with paths.

    RUN/generate/            the candidates (model.evaluation.generate)
    RUN/round/               candidates.parquet, votes.parquet, summary.json, pairs.parquet (annotation/preference.py)
    RUN/train/               best/, final/, report.json (model/train_pref.py)
    RUN/eval/                the evaluate flow's run: tuned against the starting checkpoint

Like curate and evaluate, a run suspends while people vote (RUN/round/waiting.json, flows/waiting.py): it
holds no worker, the relay resumes it when every task has its votes, and the re-executed run answers the
generation and the push from Prefect's cache (a run not started from a deployment polls in-process instead).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow, task
from prefect.artifacts import create_link_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import Field

from flows.caching import stage_key
from flows.lock import run_dir_lock
from flows.params import FlowParams, data_path, flow_parameters, output_dir
from flows.waiting import WAITING_FILE, done_waiting, wait_for_people

#: the deployment `python -m flows serve` registers for this flow
DEPLOYMENT = "dpo"


class PrefParams(FlowParams):
    """Preference tuning of one checkpoint (PS §3.2): candidates, pairs, Diffusion-DPO / SimPO, evaluation."""

    checkpoint: str = Field(description="the pipeline folder to tune (needles' own, or an SD/SDXL base)")
    run_dir: str = Field("data/runs/preference", description="where candidates, the round, training and evaluation go")
    prompts: str = Field("parti", description="parti, drawbench or a prompt file")
    n_prompts: int = Field(64, ge=2, description="prompts to draw (seeded, balanced over categories)")
    candidates: int = Field(5, ge=2, description="images per prompt shown together (PS §4: 5)")
    steps: int = Field(25, ge=1, description="sampling steps of the candidates")
    annotator_mode: Literal["people", "simulated", "ai"] = Field(
        "people", description="people: the Label Studio round; simulated: scripted rankers (demo); ai: the sharpness judge")
    votes_per_task: int = Field(3, ge=1, description="annotators per task of the round")
    round_timeout_s: int = Field(7 * 24 * 3600, ge=60, description="how long a suspended round may wait for people")
    overrides: list[str] = Field(default_factory=list, description="preference.* config overrides (key=value)")
    evaluate: bool = Field(True, description="start an evaluate/ab-test run of the tuned checkpoint against the start")


def round_dir(run_dir: str | Path) -> Path:
    """RUN/round: the preference round's candidates, votes, pairs and (while it is open) waiting.json."""
    return Path(run_dir) / "round"


def pref_campaign(run: Path) -> str:
    """The Label Studio campaign of a run folder's preference round (one per run folder)."""
    return f"pref-{hashlib.sha256(str(run.resolve()).encode()).hexdigest()[:10]}"


def _round(candidates: int, votes: int):
    from annotation.preference import PreferenceRound

    return PreferenceRound(candidates=candidates, votes_per_task=votes)


def _settings():
    from annotation.client import LabelStudioSettings

    return LabelStudioSettings.from_env()


def _push_key(ctx, p) -> str:
    work = round_dir(p["run_dir"])
    config = [p["campaign"], p["candidates"], p["votes"], str(work.resolve())]
    return stage_key("pref-push", config, [p["manifest"]], (work / "candidates.parquet").is_file())


@task(name="pref-push", cache_key_fn=_push_key, persist_result=True, retries=2, retry_delay_seconds=10)
def push_stage(manifest: str, run_dir: str, campaign: str, candidates: int, votes: int) -> dict:
    """Candidates (best-and-worst tasks, with gold) -> the Label Studio round."""
    from annotation.preference import build_candidates, push_preference

    round_ = _round(candidates, votes)
    build_candidates(Path(manifest).parent, round_dir(run_dir), round_=round_)
    return push_preference(campaign, round_dir(run_dir), _settings(), round_)


@task(name="simulated-rankers", retries=2, retry_delay_seconds=10)
def simulate_stage(campaign: str, candidates: int, votes: int) -> dict:
    """DEMO/TEST MODE: scripted rankers who order the candidates by sharpness (annotation/preference.py)."""
    from annotation.client import LabelStudioClient
    from annotation.preference import simulate_preference

    with LabelStudioClient(_settings()) as admin:
        return simulate_preference(admin, campaign, votes, round_=_round(candidates, votes))


# never cached: a run that re-executes after a resume must see the round as it is now
@task(name="pref-status", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
def status_stage(campaign: str, candidates: int, votes: int) -> dict:
    from annotation.preference import preference_status

    return preference_status(campaign, _settings(), _round(candidates, votes)).to_dict()


@task(name="pref-pull-and-export", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
def pull_stage(run_dir: str, campaign: str, candidates: int, votes: int) -> str:
    from annotation.preference import export_pairs, pull_preference

    pull_preference(campaign, round_dir(run_dir), _settings(), _round(candidates, votes))
    return str(export_pairs(round_dir(run_dir), campaign))


def _wait_here(campaign: str, candidates: int, votes: int, timeout_s: int) -> None:
    """A run not started from a deployment: poll Label Studio's counters in this process."""
    from annotation.preference import preference_status

    deadline = time.monotonic() + timeout_s
    while not (status := preference_status(campaign, _settings(), _round(candidates, votes))).complete:
        if time.monotonic() > deadline:
            raise TimeoutError(f"preference round {campaign}: {status.remaining} of {status.tasks} tasks still open")
        time.sleep(30)


def _pairs(params: PrefParams, run: Path, manifest: str) -> tuple[Path, list[str]]:
    """The pairs table and the feedback sources it holds."""
    from annotation import preference as AP

    if params.annotator_mode == "ai":
        return AP.judge_pairs(Path(manifest).parent, round_dir(run) / "pairs.parquet"), ["ai"]
    campaign, n, votes = pref_campaign(run), params.candidates, params.votes_per_task
    push_stage(manifest, str(run), campaign, n, votes)
    if params.annotator_mode == "simulated":
        simulate_stage(campaign, n, votes)
    status = status_stage(campaign, n, votes)
    waiting = round_dir(run) / WAITING_FILE
    if not status["complete"]:
        wait_for_people(waiting, {"kind": "preference", "round": "preference", "campaign": campaign,
                                  "candidates": n, "votes": votes},
                        status.get("tasks"), status["remaining"], params.round_timeout_s,
                        lambda: _wait_here(campaign, n, votes, params.round_timeout_s))
    pairs = Path(pull_stage(str(run), campaign, n, votes))
    done_waiting(waiting)
    return pairs, ["human"]


@flow(name="preference", log_prints=True, persist_result=True)
@flow_parameters(PrefParams)
def preference(**values: Any) -> dict:
    """Preference-tune a checkpoint (flows/preference.py: PrefParams)."""
    params = PrefParams.parse(values)
    from flows.evaluate import generate_stage
    from model.train_pref import train_preference

    run = output_dir(params.run_dir)  # inside the data root, as every flow's output
    checkpoint = data_path(params.checkpoint)
    with run_dir_lock(run):
        # the candidates: `candidates` seeds per prompt of the current checkpoint (cached on its files)
        manifest = generate_stage({"current": str(checkpoint)}, str(run), params.prompts, params.n_prompts,
                                  params.candidates, params.steps, 5.0, None)
        pairs, feedback = _pairs(params, run, manifest)
        # train-pref resumes from RUN/train/checkpoints when a run is re-executed after a crash
        overrides = [f"preference.feedback={feedback}", *params.overrides]
        result = train_preference(checkpoint, pairs, run / "train", overrides=overrides, progress=False)
    create_link_artifact(Path(result.checkpoint).resolve().as_uri(), link_text="preference-tuned pipeline",
                         key="preference-checkpoint")
    summary = {"pairs": str(pairs), "checkpoint": str(result.checkpoint), "history": result.history[-1:]}
    if params.evaluate:
        from flows.evaluate import EvalParams, start_evaluation

        started = start_evaluation(EvalParams(
            checkpoints={"base": str(checkpoint), "tuned": str(result.checkpoint)}, baseline="base",
            run_dir=str(run / "eval"), annotator_mode="people" if params.annotator_mode == "people" else "simulated"),
            wait=False)
        summary["evaluation"] = {"flow_run_id": str(started.id), "run_dir": str(run / "eval")}
    print(summary)
    return summary
