"""The DAG through the real Prefect CLI against a real Prefect server, with a real Label Studio:
`prefect deployment run curate/quality-set --watch` on the embedded sample with the simulated annotators;
a run suspended on an open round and resumed by the relay once people finish it."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.report import funnel
from pipeline.sample import generate_sample

pytestmark = [pytest.mark.prefect, pytest.mark.labelstudio, pytest.mark.slow]


def _params(stack, name: str, **extra) -> str:
    sample = stack.workdir / "data" / "sample"
    if not sample.exists():
        generate_sample(sample, n=60, seed=1)
    return json.dumps({
        "sources": ["data/sample"], "run_dir": f"data/runs/{name}", "generalist_target": 20,
        "specialist_target": 8, "backend": "local", **extra,
    })


def _check_funnel_adds_up(run_dir: Path) -> None:
    rows = {row["stage"]: row["rows"] for row in funnel(run_dir)}
    removed = sum(n for stage, n in rows.items() if stage not in ("rows in", "ingested", "kept"))
    assert rows["rows in"] == rows["kept"] + removed > 0


# a smoke-sized training and evaluation: the chain, not the model, is under test here
TRAIN = {"train": True, "preset": "tiny", "train_overrides": [
    "autoencoder.train_steps=10", "pretrain.0.max_steps=4", "pretrain.1.max_steps=2", "quality_tune.max_steps=4",
    "quality_tune.eval_every=2", "sample.num_inference_steps=2"]}
EVALUATE = {"evaluate": True, "eval_params": {"n_prompts": 4, "seeds": 1, "steps": 2, "criteria": ["appeal"],
                                              "votes_per_pair": {"appeal": 2}}}


def test_deployment_run_with_simulated_annotators_trains_and_chains_into_evaluation(prefect_stack, shared_dir):
    done = prefect_stack.prefect(
        "deployment", "run", "curate/quality-set", "--params",
        _params(prefect_stack, "simulated", annotator_mode="simulated", learned_order=True, **TRAIN, **EVALUATE),
        "--watch", "--watch-timeout", "1200",
    )
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    run_dir = prefect_stack.workdir / "data" / "runs" / "simulated"
    curated = run_dir / "annotation" / "curated"
    metadata = [json.loads(line) for line in (curated / "metadata.jsonl").read_text().splitlines()]
    assert 0 < len(metadata) <= 8
    assert all((curated / m["file_name"]).is_file() and m["text"] for m in metadata)
    _check_funnel_adds_up(run_dir)
    pool_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in (run_dir / "pool").glob("*.parquet"))
    assert pool_rows > len(metadata)

    # learned_order: a head learned from the generalist round's votes before the specialist round was pushed;
    # the simulated annotators vote by hash, so it must not beat a constant and must leave the order alone
    active = json.loads((run_dir / "annotation" / "active" / "summary.json").read_text())
    generalist = [r for r in active["rounds"] if r["round"] == "generalist"]
    assert generalist or "generalist" in active["skipped_rounds"], active
    ranking = pq.read_table(run_dir / "annotation" / "active" / "ranking.parquet")
    pool_ids = {i for p in (run_dir / "pool").glob("*.parquet") for i in pq.read_table(p, columns=["id"])["id"].to_pylist()}
    assert pool_ids <= set(ranking["id"].to_pylist())  # every task of the specialist round had a priority
    if generalist and not generalist[0]["beats_constant"]:
        assert set(ranking["keep_probability"].to_pylist()) == {1.0}

    # training chained into its own evaluate/ab-test run: tuned vs its base, KID against the curated set
    assert (run_dir / "train-qt" / "quality_tune" / "best" / "model_index.json").is_file()
    with prefect_stack.http() as http:
        runs = http.post("/flow_runs/filter", json={"flows": {"name": {"any_": ["evaluate"]}}}).json()
        mine = [r for r in runs if r["parameters"].get("run_dir") == str((run_dir / "eval").resolve())]
        assert len(mine) == 1, [r["parameters"].get("run_dir") for r in runs]
        evaluation = _wait_state(http, mine[0]["id"], {"Completed"}, timeout=900)
    params = evaluation["parameters"]
    assert params["checkpoints"]["tuned"].endswith("quality_tune/best") and params["reference"] == str(curated.resolve())
    assert params["annotator_mode"] == "simulated" and params["n_prompts"] == 4
    judges = json.loads((run_dir / "eval" / "judges" / "summary.json").read_text())
    assert set(judges["distribution"]["kid"]) == {"base", "tuned"}
    assert (run_dir / "eval" / "report" / "index.html").is_file()


def _flow_run(http, run_id: str) -> dict:
    return http.get(f"/flow_runs/{run_id}").json()


def _wait_state(http, run_id: str, names: set[str], timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = _flow_run(http, run_id)
        if run["state"]["name"] in names:
            return run
        assert run["state"]["type"] not in ("FAILED", "CRASHED", "CANCELLED"), run["state"].get("message")
        time.sleep(2)
    raise AssertionError(f"run {run_id} did not reach {names} in {timeout} s; last: {run['state']['name']}")


def _broken_suspended_runs(http, workdir: Path) -> list[str]:
    """Runs of the curate deployment left Suspended in ways the relay cannot check: its run_dir gone, its
    waiting.json half written, its Label Studio projects deleted (the record names a campaign with none)."""
    deployment = http.get("/deployments/name/curate/quality-set").json()
    suspended = {"type": "PAUSED", "name": "Suspended", "state_details": {"pause_reschedule": True}}
    ids = []
    for name in ("broken-gone", "broken-half-written", "broken-projects-deleted"):
        run = http.post(f"/deployments/{deployment['id']}/create_flow_run", json={
            "parameters": {"sources": ["data/sample"], "run_dir": f"data/runs/{name}"}, "state": suspended}).json()
        assert run.get("state_name") == "Suspended", run
        ids.append(run["id"])
        waiting = workdir / "data" / "runs" / name / "annotation" / "generalist" / "waiting.json"
        if name == "broken-half-written":
            waiting.parent.mkdir(parents=True)
            waiting.write_text(json.dumps({"flow_run_id": run["id"], "kind": "curation"})[:20])
        elif name == "broken-projects-deleted":
            waiting.parent.mkdir(parents=True)
            waiting.write_text(json.dumps({"flow_run_id": run["id"], "kind": "curation", "round": "generalist",
                                           "target": 20, "campaign": "deleted-00000000"}))
    return ids


def test_round_suspends_survives_a_prefect_restart_and_relay_resumes(prefect_stack, monkeypatch, caplog):
    """Also: the suspended run keeps its run_dir (a second run on it fails at once, naming the holder), and
    runs the relay cannot check do not stop it resuming this one."""
    from annotation.client import LabelStudioClient, LabelStudioSettings
    from annotation.rounds import get_round
    from annotation.simulated import SimulatedAnnotator, hash_rule
    from flows.curate import campaign_name
    from flows.lock import holder
    from flows.relay import _with_retry, check_once

    for key, value in prefect_stack.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(prefect_stack.workdir)
    params = _params(prefect_stack, "people", annotator_mode="people")
    started = prefect_stack.prefect("deployment", "run", "curate/quality-set", "--params", params)
    assert started.returncode == 0, started.stdout + started.stderr
    run_id = next(line.split()[-1] for line in started.stdout.splitlines() if "UUID" in line)
    settings = LabelStudioSettings.from_env()
    admin = LabelStudioClient(settings)
    campaign = campaign_name("data/runs/people")
    run_dir = prefect_stack.workdir / "data" / "runs" / "people"
    with prefect_stack.http() as http:
        broken = []
        try:
            for round_name, target in (("generalist", 20), ("specialist", 8)):
                _wait_state(http, run_id, {"Suspended"})
                if round_name == "generalist":
                    # The Prefect server restarts while the round is open: nothing is lost.
                    prefect_stack.server.stop()
                    prefect_stack.server.start(prefect_stack.env)
                    assert _flow_run(http, run_id)["state"]["name"] == "Suspended"
                    # A second run on the same run_dir fails at once, naming the suspended holder.
                    assert holder(run_dir)["flow_run_id"] == run_id
                    second = subprocess.run([sys.executable, "-m", "flows", "run", "curate/quality-set", "--params",
                                             params], env={**os.environ, **prefect_stack.env},
                                            capture_output=True, text=True, timeout=300, check=False)
                    assert second.returncode == 1, second.stdout + second.stderr
                    assert "is in use by flow run " in second.stderr and run_id in second.stderr, second.stderr
                    assert holder(run_dir)["flow_run_id"] == run_id
                    broken = _broken_suspended_runs(http, prefect_stack.workdir)
                # caplog's handler on the relay's own logger: Prefect's logging setup may stop the record
                # propagating to the root logger (the test then failed when run alone, passed in the suite)
                relay_log = logging.getLogger("flows.relay")
                relay_log.addHandler(caplog.handler)
                try:
                    with caplog.at_level("ERROR", logger="flows.relay"):
                        assert check_once(http) == [], "resumed while the round was still open"
                finally:
                    relay_log.removeHandler(caplog.handler)
                for broken_id in (broken[0], broken[2]):  # gone; projects deleted (the half-written one is skipped)
                    assert any(broken_id in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
                round_ = get_round(round_name, target_size=target)
                for i in range(round_.overlap):  # the "people" finish the round
                    email = f"person-{i}@needles.test"
                    SimulatedAnnotator(email, f"password-{i}", hash_rule(round_, email, 0.7)).annotate(admin, round_, campaign)
                assert check_once(http) == [run_id]
            final = _wait_state(http, run_id, {"Completed"})
            assert all(_flow_run(http, b)["state"]["name"] == "Suspended" for b in broken)
        finally:
            for broken_id in broken:  # retried: a reset keep-alive connection once failed the test here
                _with_retry(lambda: http.delete(f"/flow_runs/{broken_id}"))
    assert final["state"]["type"] == "COMPLETED"
    assert (prefect_stack.workdir / "data/runs/people/annotation/curated/metadata.jsonl").is_file()
    assert holder(run_dir) is None  # given back at the end


def test_label_studio_down_when_a_round_starts_fails_with_a_clear_message(tmp_path, monkeypatch):
    """The push task (Prefect retries it twice) gives up with one message naming the server."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from annotation.client import LabelStudioError
    from flows.curate import push_stage
    from tests.annotation.conftest import photo_rows, pool_schema
    from tests.conftest import free_port

    pool = tmp_path / "pool"
    pool.mkdir()
    pq.write_table(pa.Table.from_pylist(photo_rows(["coffee", "rocket"]), schema=pool_schema()), pool / "shard-00000.parquet")
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("LABEL_STUDIO_URL", dead)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "a-token-nobody-checks")  # no dev-mode fallback needed
    monkeypatch.setenv("LABEL_STUDIO_RETRY_BUDGET_S", "2")
    monkeypatch.setenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", str(tmp_path / "files"))
    started = time.monotonic()
    with pytest.raises(LabelStudioError) as failure:
        push_stage.fn(str(pool), "generalist", 1, "down", str(tmp_path / "work"))
    assert "127.0.0.1" in str(failure.value) and time.monotonic() - started < 30
    assert push_stage.retries == 2


def test_campaign_names_fit_label_studio_and_differ_per_run_folder():
    from annotation.curation import _check_campaign
    from flows.curate import campaign_name

    long = campaign_name("data/runs/quality-set-2024-06-portraits-and-landscapes")
    _check_campaign(long)  # fits the 30 characters project titles leave (it once failed the push)
    assert long.startswith("quality-set-2024-06-p")
    assert campaign_name("data/a/quality-set") != campaign_name("data/b/quality-set")
    assert campaign_name("data/a/quality-set") == campaign_name("data/a/../a/quality-set")
