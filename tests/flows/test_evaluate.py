"""The evaluate flow through the real Prefect CLI against a real Prefect server and a real Label Studio, on two
tiny RANDOM checkpoints: with the simulated voters (who prefer the sharper image) it runs to the report; with
people it suspends on its A/B round, and the relay resumes it once they have voted."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from model.autoencoder import build_kl_autoencoder
from model.text import load_text_encoder
from model.bases import Frozen
from tests.model.conftest import export_tiny_pipeline, tiny

pytestmark = [pytest.mark.prefect, pytest.mark.labelstudio, pytest.mark.slow]


@pytest.fixture(scope="module")
def checkpoints(prefect_stack) -> dict[str, str]:
    cfg = tiny()
    tokenizer, text_encoder = load_text_encoder(cfg.text_encoder, cfg.seed)
    torch.manual_seed(0)
    frozen = Frozen(tokenizer, text_encoder, build_kl_autoencoder(cfg.autoencoder).eval())
    root = prefect_stack.workdir / "checkpoints"
    return {"tuned": str(export_tiny_pipeline(root / "tuned", frozen, seed=1)),
            "base": str(export_tiny_pipeline(root / "base", frozen, seed=0))}


def _params(checkpoints: dict, run: str, mode: str) -> str:
    return json.dumps({"checkpoints": checkpoints, "run_dir": f"data/runs/{run}", "prompts": "drawbench",
                       "n_prompts": 6, "seeds": 1, "steps": 2, "criteria": ["appeal"],
                       "votes_per_pair": {"appeal": 2}, "annotator_mode": mode})


def test_evaluate_deployment_with_simulated_voters(prefect_stack, checkpoints):
    done = prefect_stack.prefect("deployment", "run", "evaluate/ab-test", "--params",
                                 _params(checkpoints, "eval", "simulated"), "--watch", "--watch-timeout", "800")
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"

    run = prefect_stack.workdir / "data" / "runs" / "eval"
    manifest = pq.read_table(run / "generate" / "manifest.parquet")
    assert manifest.num_rows == 2 * 6
    judges = json.loads((run / "judges" / "summary.json").read_text())
    assert set(judges["per_checkpoint"]) == {"tuned", "base"}
    summary = json.loads((run / "ab" / "tuned-vs-base" / "appeal" / "summary.json").read_text())
    votes = pq.read_table(run / "ab" / "tuned-vs-base" / "appeal" / "votes.parquet")
    pairs = pq.read_table(run / "ab" / "tuned-vs-base" / "appeal" / "pairs.parquet")
    # every pair got its 2 votes, and every vote is in the table (valid or with its exclusion reason)
    assert votes.num_rows == summary["counts"]["votes"] == 2 * pairs.num_rows
    comparison = summary["comparison"]["plurality"]
    assert comparison["n_pairs"] == 6 and comparison["wins"] + comparison["ties"] + comparison["losses"] == 6
    html = (run / "report" / "index.html").read_text()
    assert "tuned-vs-base/appeal" in html and (run / "report" / "win-tie-lose.png").stat().st_size > 1000


def _state(http, run_id: str, names: set[str], timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = http.get(f"/flow_runs/{run_id}").json()["state"]
        if state["name"] in names:
            return state["name"]
        assert state["type"] not in ("FAILED", "CRASHED", "CANCELLED"), state.get("message")
        time.sleep(2)
    raise AssertionError(f"run {run_id} did not reach {names} in {timeout} s")


def test_evaluate_suspends_on_its_ab_round_and_the_relay_resumes_it(prefect_stack, checkpoints, monkeypatch):
    from annotation.abtest import SharpnessVoter, get_criterion
    from annotation.client import LabelStudioClient, LabelStudioSettings
    from flows.evaluate import eval_campaign
    from flows.relay import check_once

    for key, value in prefect_stack.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(prefect_stack.workdir)  # where the serve process resolves the relative run_dir
    started = prefect_stack.prefect("deployment", "run", "evaluate/ab-test", "--params",
                                    _params(checkpoints, "eval-people", "people"))
    assert started.returncode == 0, started.stdout + started.stderr
    run_id = next(line.split()[-1] for line in started.stdout.splitlines() if "UUID" in line)
    run = Path("data/runs/eval-people")
    with prefect_stack.http() as http:
        _state(http, run_id, {"Suspended"})
        assert (run / "ab" / "tuned-vs-base" / "appeal" / "waiting.json").is_file()
        assert check_once(http) == [], "resumed while the round was still open"
        admin = LabelStudioClient(LabelStudioSettings.from_env())
        criterion = get_criterion("appeal", votes_per_pair=2)
        for i in range(2):  # the "people" vote on every pair
            SharpnessVoter(f"viewer-{i}@needles.test", f"password-{i}").vote(
                admin, criterion, eval_campaign(str(run), "tuned", "base"))
        assert check_once(http) == [run_id]
        assert _state(http, run_id, {"Completed"}) == "Completed"
    assert (run / "report" / "index.html").is_file()
    assert not (run / "ab" / "tuned-vs-base" / "appeal" / "waiting.json").exists()
