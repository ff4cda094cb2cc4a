"""Flow ``curate`` (deployment ``quality-set``): ingest -> automatic filters (Ray) -> pool -> generalist
round -> specialist round -> curated set -> optionally the train-qt flow.

The flow holds no logic of its own: each task calls one function of pipeline/, annotation/ or model/ with
paths. Stage tasks are cached on their inputs (config section + input files, flows/caching.py) with
persisted results, so a rerun after a crash or a config change redoes only what changed; inside a stage
the work is resumable too (scoring skips finished shards).

While a round is open the run *suspends* (no worker held); the relay (flows/relay.py) resumes it when
Label Studio reports every task done, and the run re-executes from the top with every finished stage
answered from the cache.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.caching import stage_key
from flows.lock import run_dir_lock
from flows.params import CurateParams, flow_parameters
from flows.waiting import curation_waiting, done_waiting, wait_for_people


def _config(config: str | None, pool_size: int | None = None):
    from pipeline.config import load_config

    cfg = load_config(config)
    if pool_size is not None:
        cfg = cfg.model_copy(update={"balance": cfg.balance.model_copy(update={"target_size": pool_size})})
    return cfg


def _present(path: Path) -> bool:
    return path.exists() and any(path.iterdir()) if path.is_dir() else path.exists()


def _as_dict(result: Any) -> dict:
    from dataclasses import asdict, is_dataclass

    return json.loads(json.dumps(asdict(result) if is_dataclass(result) else result, default=str))


# --- the automatic stages -------------------------------------------------------------------


def _ingest_key(ctx, p) -> str:
    from pipeline.layout import RunLayout

    cfg = _config(p["config"])
    layout = RunLayout(p["run_dir"])
    # The output location is part of the key: the same sources ingested into another run are other work.
    section = {"ingest": cfg.ingest.model_dump(), "into": str(layout.ingest.resolve())}
    return stage_key("ingest", section, p["sources"], _present(layout.ingest))


@task(name="ingest", cache_key_fn=_ingest_key, persist_result=True, retries=1)
def ingest_stage(sources: list[str], run_dir: str, config: str | None, backend: str = "local") -> dict:
    from pipeline.ingest import ingest

    cfg = _config(config)
    # the same outputs on either backend (tests/pipeline/test_ingest_ray.py), so the cache key leaves it out
    stats = ingest(sources, Path(run_dir), shard_rows=cfg.ingest.shard_rows, thumbnail_size=cfg.ingest.thumbnail_size,
                   backend=backend)
    return _as_dict(stats)


def _score_key(ctx, p) -> str:
    from pipeline.layout import RunLayout

    layout = RunLayout(p["run_dir"])
    return stage_key("score", _config(p["config"]).scorers, [layout.ingest], _present(layout.score))


@task(name="score", cache_key_fn=_score_key, persist_result=True)
def score_stage(run_dir: str, config: str | None, backend: str = "ray") -> dict:
    from pipeline.engine import score_run
    from pipeline.scorers import build_chain

    return _as_dict(score_run(Path(run_dir), build_chain(_config(config).scorers), backend=backend))


def _select_key(ctx, p) -> str:
    from pipeline.layout import RunLayout

    layout = RunLayout(p["run_dir"])
    cfg = _config(p["config"], p["pool_size"])
    section = {"filters": cfg.filters.model_dump(), "balance": cfg.balance.model_dump()}
    return stage_key("select", section, [layout.ingest, layout.score], _present(layout.pool))


@task(name="select", cache_key_fn=_select_key, persist_result=True)
def select_stage(run_dir: str, config: str | None, pool_size: int | None) -> dict:
    from pipeline.select import run_select

    return _as_dict(run_select(Path(run_dir), _config(config, pool_size)))


def _report_key(ctx, p) -> str:
    from pipeline.layout import RunLayout

    layout = RunLayout(p["run_dir"])
    section = _config(p["config"], p["pool_size"]).report.model_dump()
    return stage_key("report", section, [layout.select], _present(layout.report))


@task(name="report", cache_key_fn=_report_key, persist_result=True)
def report_stage(run_dir: str, config: str | None, pool_size: int | None) -> str:
    from pipeline.report import build_report, funnel, funnel_markdown

    html = build_report(Path(run_dir), _config(config, pool_size))
    rows = funnel(Path(run_dir))
    create_markdown_artifact(funnel_markdown(rows), key="funnel", description="rows in = kept + dropped + quarantined")
    create_link_artifact(html.resolve().as_uri(), link_text="selection report (funnel, histograms, contact sheets)", key="selection-report")
    return str(html)


# --- the human rounds -------------------------------------------------------------------------


def _round(name: str, target: int):
    from annotation.rounds import get_round

    return get_round(name, target_size=target)


def _settings():
    from annotation.client import LabelStudioSettings

    return LabelStudioSettings.from_env()


def _push_key(ctx, p) -> str:
    order = [p["order"]] if p.get("order") else []
    return stage_key(f"push-{p['round_name']}", [p["campaign"], p["target"]], [p["pool"], *order], True)


@task(name="push-round", cache_key_fn=_push_key, persist_result=True, retries=2, retry_delay_seconds=10)
def push_stage(pool: str, round_name: str, target: int, campaign: str, work: str, order: str | None = None) -> dict:
    """``order``: a ranking.parquet (annotation/active.py); its likely keeps are imported, so served, first."""
    from annotation.active import task_priority
    from annotation.curation import push_round

    priority = task_priority(Path(order)) if order else None
    return _as_dict(push_round(Path(pool), _round(round_name, target), campaign, Path(work), _settings(),
                               priority=priority))


# never cached: it learns from the round just decided, and is cheap next to the round itself
@task(name="learn-keep-probability", cache_policy=NO_CACHE)
def active_stage(run_dir: str, work: str) -> str | None:
    """A keep-probability head on the finished rounds' votes; the ranking's path (uniform when no head
    beats a constant, so the order is then the pool's own), or None when the run cannot teach one."""
    from annotation.active import ActiveError, learn

    try:
        result = learn(Path(run_dir), Path(work))
    except ActiveError as error:  # e.g. no stored features: said here, and the round keeps the pool's order
        print(f"learned order not used: {error}")
        return None
    create_markdown_artifact(
        f"## keep-probability heads\n\n```json\n{json.dumps(result.to_dict(), indent=2, default=str)[:20000]}\n```",
        key="keep-probability", description="held-out AUC and calibration per round; proposed threshold changes")
    return str(result.ranking)


@task(name="simulated-annotators", retries=2, retry_delay_seconds=10)
def simulate_stage(round_name: str, target: int, campaign: str, keep_fraction: float) -> dict:
    """DEMO/TEST MODE: scripted annotators answer every open task by a fixed rule (annotation/simulated.py)."""
    from annotation.client import LabelStudioClient
    from annotation.simulated import simulate_round

    round_ = _round(round_name, target)
    return simulate_round(LabelStudioClient(_settings()), round_, campaign, round_.overlap, keep_fraction)


# never cached: a run that re-executes after a resume must see the round as it is now, not as it was
@task(name="round-status", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
def status_stage(round_name: str, target: int, campaign: str) -> dict:
    from annotation.curation import round_status

    return round_status(_round(round_name, target), campaign, _settings(), per_annotator=False).to_dict()


@task(name="pull-and-decide", retries=2, retry_delay_seconds=10)
def pull_stage(pool: str, round_name: str, target: int, campaign: str, work: str) -> str:
    from annotation.curation import decide_round, pull_round
    from annotation.layout import RoundLayout

    round_ = _round(round_name, target)
    pull_round(round_, campaign, Path(work), _settings())
    next_pool = decide_round(round_, Path(pool), Path(work))
    summary = json.loads(RoundLayout(Path(work), round_name).summary.read_text())
    create_markdown_artifact(
        f"## {round_name} round\n\n```json\n{json.dumps(summary, indent=2, default=str)[:20000]}\n```",
        key=f"{round_name}-round",
        description="counts, shortfall, agreement and gold accuracy",
    )
    return str(next_pool)


def human_round(round_name: str, pool: str, params: CurateParams, campaign: str, work: Path,
                order: str | None = None) -> str:
    """Push the pool (in ``order``'s ranking when given), wait for people (suspended), then pull, decide
    and return the next round's pool."""
    target = params.generalist_target if round_name == "generalist" else params.specialist_target
    push_stage(pool, round_name, target, campaign, str(work), order)
    if params.annotator_mode == "simulated":
        # recall round: each simulated annotator keeps ~half; precision round: most of what reaches it
        simulate_stage(round_name, target, campaign, 0.5 if round_name == "generalist" else 0.8)
    status = status_stage(round_name, target, campaign)
    if not status["complete"]:
        from annotation.curation import wait_for_round

        wait_for_people(
            curation_waiting(work, round_name),
            {"kind": "curation", "round": round_name, "target": target, "campaign": campaign},
            status.get("tasks"), status["remaining"], params.round_timeout_s,
            lambda: wait_for_round(_round(round_name, target), campaign, _settings(), timeout_s=params.round_timeout_s),
        )
    next_pool = pull_stage(pool, round_name, target, campaign, str(work))
    done_waiting(curation_waiting(work, round_name))
    return next_pool


@task(name="export-curated", persist_result=True)
def export_stage(pool: str, work: str) -> str:
    from annotation.export import export_curated
    from annotation.layout import curated_dir

    out = export_curated(Path(pool), curated_dir(Path(work)))
    create_link_artifact(Path(out).resolve().as_uri(), link_text="curated set (Parquet + imagefolder)", key="curated-set")
    return str(out)


def campaign_name(run_dir: str) -> str:
    """Label Studio project titles for this run: one campaign per run directory, as ``<folder name, cut to
    21 characters>-<8 hex of the resolved path's hash>`` so that it always fits the 30 characters project
    titles leave it and two run folders of the same name never share projects."""
    import hashlib
    import re

    path = Path(run_dir).resolve()
    slug = re.sub(r"[^a-z0-9-]+", "-", path.name.lower())[:21].strip("-") or "curate"
    return f"{slug}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


@flow(name="curate", log_prints=True, persist_result=True)
@flow_parameters(CurateParams)
def curate(**values: Any) -> dict:
    """Curate a quality-tuning set from ``sources`` (flows/params.py: CurateParams)."""
    params = CurateParams.parse(values)
    with run_dir_lock(params.run_dir):
        return _curate(params)


def _curate(params: CurateParams) -> dict:
    from model.evaluation.layout import EvalLayout
    from pipeline.layout import RunLayout

    layout = RunLayout(params.run_dir)
    ingest_stage(params.sources, params.run_dir, params.config, params.backend)
    score_stage(params.run_dir, params.config, params.backend)
    select_stage(params.run_dir, params.config, params.pool_size)
    report = report_stage(params.run_dir, params.config, params.pool_size)

    work = layout.annotation
    campaign = campaign_name(params.run_dir)
    generalist_pool = human_round("generalist", str(layout.pool), params, campaign, work)
    order = active_stage(params.run_dir, str(work)) if params.learned_order else None
    specialist_pool = human_round("specialist", generalist_pool, params, campaign, work, order)
    curated = export_stage(specialist_pool, str(work))
    result = {"report": report, "curated": curated, "pool": str(layout.pool)}
    if params.train:
        from flows.train import train_qt

        training = train_qt(data_dir=curated, out_dir=str(layout.train_qt), preset=params.preset,
                            overrides=params.train_overrides)
        result["training"] = training
        if params.evaluate:  # its own deployment run: it suspends on its A/B rounds like this flow on its rounds
            from flows.evaluate import EvalParams, start_evaluation

            evaluation = EvalLayout(layout.eval.resolve())
            run = start_evaluation(EvalParams(
                checkpoints={"base": training["base"], "tuned": training["checkpoint"]}, baseline="base",
                run_dir=str(evaluation.run), reference=str(Path(curated).resolve()),
                annotator_mode=params.annotator_mode, round_timeout_s=params.round_timeout_s, **params.eval_params),
                wait=False)
            result["evaluation"] = {"flow_run_id": str(run.id), "run_dir": str(evaluation.run)}
            print(f"evaluation run {run.id} started (deployment evaluate/ab-test): the report will be "
                  f"{evaluation.report / 'index.html'}")
    print(json.dumps(result, indent=2))
    return result
