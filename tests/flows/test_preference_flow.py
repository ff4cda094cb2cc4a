"""The preference flow (issue 15) through the real Prefect CLI against a real Prefect server and a real Label
Studio, on a tiny RANDOM checkpoint: candidates -> the best/worst round answered by the scripted rankers ->
pairs -> two DPO steps; the deployment preference/dpo is what `python -m flows serve` registers."""

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


def test_preference_deployment_with_simulated_rankers(prefect_stack):
    cfg = tiny()
    tokenizer, text_encoder = load_text_encoder(cfg.text_encoder, cfg.seed)
    torch.manual_seed(0)
    frozen = Frozen(tokenizer, text_encoder, build_kl_autoencoder(cfg.autoencoder).eval())
    checkpoint = export_tiny_pipeline(prefect_stack.workdir / "checkpoints" / "start", frozen)
    params = {"checkpoint": str(checkpoint), "run_dir": "data/runs/pref", "prompts": "drawbench", "n_prompts": 4,
              "steps": 2, "annotator_mode": "simulated", "votes_per_task": 2, "evaluate": False,
              "overrides": ["preference.max_steps=2", "preference.batch_size=2", "preference.eval_every=1",
                            "preference.val_fraction=0.25"]}
    done = prefect_stack.prefect("deployment", "run", "preference/dpo", "--params", json.dumps(params),
                                 "--watch", "--watch-timeout", "800")
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    run = prefect_stack.workdir / "data" / "runs" / "pref"
    assert pq.read_table(run / "generate" / "manifest.parquet").num_rows == 4 * 5  # 5 candidates per prompt
    summary = json.loads((run / "round" / "summary.json").read_text())
    assert summary["annotations"] == 2 * sum(summary["tasks"].values())
    pairs = pq.read_table(run / "round" / "pairs.parquet").to_pylist()
    assert pairs and {p["feedback"] for p in pairs} == {"human"}
    report = json.loads((run / "train" / "report.json").read_text())
    assert report["steps"] == 2 and report["pairs"]["feedback"] == {"human": len(pairs)}
    assert (run / "train" / "final" / "model_index.json").is_file()
