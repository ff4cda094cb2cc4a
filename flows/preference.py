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

Unlike curate and evaluate, the round is waited for inside the run (polling Label Studio's counters), so a
run holds its worker while people vote.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow
from prefect.artifacts import create_link_artifact
from pydantic import Field

from flows.lock import run_dir_lock
from flows.params import FlowParams, data_path, flow_parameters, output_dir

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
    round_timeout_s: int = Field(7 * 24 * 3600, ge=60, description="how long to wait for the round")
    overrides: list[str] = Field(default_factory=list, description="preference.* config overrides (key=value)")
    evaluate: bool = Field(True, description="start an evaluate/ab-test run of the tuned checkpoint against the start")


def _pairs(params: PrefParams, run: Path, manifest: Path) -> tuple[Path, list[str]]:
    """The pairs table and the feedback sources it holds."""
    from annotation import preference as AP

    if params.annotator_mode == "ai":
        return AP.judge_pairs(manifest.parent, run / "round" / "pairs.parquet"), ["ai"]
    from annotation.client import LabelStudioClient, LabelStudioSettings

    settings = LabelStudioSettings.from_env()
    round_ = AP.PreferenceRound(candidates=params.candidates, votes_per_task=params.votes_per_task)
    campaign = f"pref-{hashlib.sha256(str(run.resolve()).encode()).hexdigest()[:10]}"  # one per run folder
    AP.build_candidates(manifest.parent, run / "round", round_=round_)
    AP.push_preference(campaign, run / "round", settings, round_)
    if params.annotator_mode == "simulated":
        with LabelStudioClient(settings) as admin:
            AP.simulate_preference(admin, campaign, params.votes_per_task, round_=round_)
    deadline = time.monotonic() + params.round_timeout_s
    while not (status := AP.preference_status(campaign, settings, round_)).complete:
        if time.monotonic() > deadline:
            raise TimeoutError(f"preference round {campaign}: {status.remaining} of {status.tasks} tasks still open")
        time.sleep(30)
    AP.pull_preference(campaign, run / "round", settings, round_)
    return AP.export_pairs(run / "round", campaign), ["human"]


@flow(name="preference", log_prints=True)
@flow_parameters(PrefParams)
def preference(**values: Any) -> dict:
    """Preference-tune a checkpoint (flows/preference.py: PrefParams)."""
    params = PrefParams.parse(values)
    from model.evaluation import load_prompts
    from model.evaluation.generate import generate
    from model.train_pref import train_preference

    run = output_dir(params.run_dir)  # inside the data root, as every flow's output
    checkpoint = data_path(params.checkpoint)
    with run_dir_lock(run):
        prompts = load_prompts(params.prompts, n=params.n_prompts)
        manifest = generate({"current": checkpoint}, prompts, params.candidates, run / "generate", steps=params.steps)
        pairs, feedback = _pairs(params, run, manifest)
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
