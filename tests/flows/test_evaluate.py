"""The evaluate flow through the real Prefect CLI against a real Prefect server and a real Label Studio:
`prefect deployment run evaluate/ab-test --watch` on two tiny RANDOM checkpoints with the simulated voters
(who prefer the sharper image): generations, judges, one A/B round, the report and its artifact."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from model.autoencoder import build_kl_autoencoder
from model.text import load_text_encoder
from model.train import Frozen
from tests.model.conftest import export_tiny_pipeline, tiny

pytestmark = [pytest.mark.prefect, pytest.mark.labelstudio, pytest.mark.slow]


def test_evaluate_deployment_with_simulated_voters(prefect_stack):
    cfg = tiny()
    tokenizer, text_encoder = load_text_encoder(cfg.text_encoder, cfg.seed)
    torch.manual_seed(0)
    frozen = Frozen(tokenizer, text_encoder, build_kl_autoencoder(cfg.autoencoder).eval())
    root = prefect_stack.workdir / "checkpoints"
    base = export_tiny_pipeline(root / "base", frozen, seed=0)
    tuned = export_tiny_pipeline(root / "tuned", frozen, seed=1)
    params = {"checkpoints": {"tuned": str(tuned), "base": str(base)}, "run_dir": "data/runs/eval", "prompts": "drawbench",
              "n_prompts": 6, "seeds": 1, "steps": 2, "criteria": ["appeal"], "votes_per_pair": {"appeal": 2},
              "annotator_mode": "simulated"}
    done = prefect_stack.prefect("deployment", "run", "evaluate/ab-test", "--params", json.dumps(params),
                                 "--watch", "--watch-timeout", "800")
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
