"""The preference flow (issue 15) through the real Prefect CLI against a real Prefect server and a real Label
Studio, on a tiny RANDOM checkpoint: candidates -> the best/worst round, during which the run suspends (no
worker held) until the "people" (scripted rankers) have voted and the relay resumes it -> pairs -> two DPO
steps; the deployment preference/dpo is what `python -m flows serve` registers."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from model.autoencoder import build_kl_autoencoder
from model.bases import Frozen
from model.text import load_text_encoder
from tests.model.conftest import export_tiny_pipeline, tiny

pytestmark = [pytest.mark.prefect, pytest.mark.labelstudio, pytest.mark.slow]


def test_preference_run_suspends_on_its_round_and_the_relay_resumes_it(prefect_stack, monkeypatch):
    from annotation.client import LabelStudioClient, LabelStudioSettings
    from annotation.preference import PreferenceRound, simulate_preference
    from flows.preference import pref_campaign
    from flows.relay import check_once
    from tests.flows.test_evaluate import _state

    for key, value in prefect_stack.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(prefect_stack.workdir)  # where the serve process resolves the relative run_dir
    cfg = tiny()
    tokenizer, text_encoder = load_text_encoder(cfg.text_encoder, cfg.seed)
    torch.manual_seed(0)
    frozen = Frozen(tokenizer, text_encoder, build_kl_autoencoder(cfg.autoencoder).eval())
    checkpoint = export_tiny_pipeline(prefect_stack.workdir / "checkpoints" / "start", frozen)
    params = {"checkpoint": str(checkpoint), "run_dir": "data/runs/pref", "prompts": "drawbench", "n_prompts": 4,
              "steps": 2, "annotator_mode": "people", "votes_per_task": 2, "evaluate": False,
              "overrides": ["preference.max_steps=2", "preference.batch_size=2", "preference.eval_every=1",
                            "preference.val_fraction=0.25"]}
    started = prefect_stack.prefect("deployment", "run", "preference/dpo", "--params", json.dumps(params))
    assert started.returncode == 0, started.stdout + started.stderr
    run_id = next(line.split()[-1] for line in started.stdout.splitlines() if "UUID" in line)
    run = prefect_stack.workdir / "data" / "runs" / "pref"
    with prefect_stack.http() as http:
        _state(http, run_id, {"Suspended"})
        assert json.loads((run / "round" / "waiting.json").read_text())["kind"] == "preference"
        assert check_once(http) == [], "resumed while the round was still open"
        with LabelStudioClient(LabelStudioSettings.from_env()) as admin:  # the "people" rank every task
            simulate_preference(admin, pref_campaign(run), 2, round_=PreferenceRound(votes_per_task=2))
        assert check_once(http) == [run_id]
        assert _state(http, run_id, {"Completed"}) == "Completed"
    assert not (run / "round" / "waiting.json").exists()
    assert pq.read_table(run / "generate" / "manifest.parquet").num_rows == 4 * 5  # 5 candidates per prompt
    summary = json.loads((run / "round" / "summary.json").read_text())
    assert summary["annotations"] == 2 * sum(summary["tasks"].values())
    pairs = pq.read_table(run / "round" / "pairs.parquet").to_pylist()
    assert pairs and {p["feedback"] for p in pairs} == {"human"}
    report = json.loads((run / "train" / "report.json").read_text())
    assert report["steps"] == 2 and report["pairs"]["feedback"] == {"human": len(pairs)}
    assert (run / "train" / "final" / "model_index.json").is_file()
