"""Data-parallel training through accelerate, as on a multi-GPU node, here with two CPU processes (torchrun,
gloo): two processes with micro-batch 2 must train the same weights as one process accumulating two
micro-batches of 2, because every draw (batch, noise, caption dropout) is a pure function of its index and
rank r takes draws r, r + world, ... Rank 0 alone trains the autoencoder, encodes the latent cache and
writes checkpoints, grids and reports; the others wait for it and reuse what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.__main__ import main
from tests.model.conftest import write_imagefolder

QT = ["quality_tune.max_steps=4", "quality_tune.batch_size=4", "quality_tune.micro_batch_size=2",
      "quality_tune.eval_every=2", "quality_tune.sample_every=100", "quality_tune.checkpoint_every=2",
      "quality_tune.early_stopping_patience=null", "quality_tune.learning_rate=1e-3",
      "quality_tune.pixel_loss_weight=1.0", "sample.num_inference_steps=2", "sample.prompts=['a fox']"]


def unet_weights(path: Path) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(path / "unet").state_dict()


def launch(args: list[str], overrides: list[str], processes: int) -> subprocess.CompletedProcess:
    """``python ARGS --set ...`` in one process, or in ``processes`` under torchrun (gloo on the CPU)."""
    for s in overrides:
        args = [*args, "--set", s]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(launcher + args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def train_qt(data: Path, out: Path, base: Path, autoencoder: Path, processes: int) -> subprocess.CompletedProcess:
    return launch(["-m", "model", "train-qt", "--preset", "tiny", "--data", str(data), "--out", str(out),
                   "--base", str(base), "--set", f"autoencoder.path={autoencoder}"], QT, processes)


def test_two_processes_train_the_weights_one_process_trains_with_accumulation(tmp_path):
    data = write_imagefolder(tmp_path / "curated", 12)
    # a base checkpoint and an autoencoder, made once in-process
    setup = tmp_path / "setup"
    assert main(["train-qt", "--preset", "tiny", "--data", str(data), "--out", str(setup),
                 "--set", "autoencoder.train_steps=5", "--set", "pretrain.0.max_steps=2",
                 "--set", "pretrain.1.max_steps=2", "--set", "quality_tune.max_steps=1",
                 "--set", "sample.num_inference_steps=2"]) == 0
    base = setup / "pretrain" / "01-pretrain-128" / "final"
    autoencoder = setup / "autoencoder"

    two = train_qt(data, tmp_path / "two", base, autoencoder, processes=2)
    one = train_qt(data, tmp_path / "one", base, autoencoder, processes=1)
    assert "final checkpoint (step 4, stopped: max_steps)" in one.stdout
    assert "final checkpoint (step 4, stopped: max_steps)" in two.stdout

    start = unet_weights(base)
    w1 = unet_weights(tmp_path / "one" / "quality_tune" / "final")
    w2 = unet_weights(tmp_path / "two" / "quality_tune" / "final")
    moved = max((w1[k] - start[k]).abs().max().item() for k in start)
    apart = max((w1[k] - w2[k]).abs().max().item() for k in start)
    print(f"weights moved by {moved:.3e} from the base; one vs two processes differ by {apart:.3e}")
    assert moved > 1e-3, "training must have changed the weights"
    # (g0 + g1) / 2 after the all-reduce equals g0 / 2 + g1 / 2 from accumulation bit for bit on this CPU;
    # a GPU's reduction order may differ in the last bits, hence a tolerance relative to the update
    assert apart <= 1e-3 * moved, f"two processes differ from one by {apart:.2e}; training moved weights by {moved:.2e}"

    reports = {run: json.loads((tmp_path / run / "quality_tune" / "report.json").read_text()) for run in ("one", "two")}
    assert (reports["two"]["processes"], reports["two"]["accumulation_steps"]) == (2, 1)
    assert (reports["one"]["processes"], reports["one"]["accumulation_steps"]) == (1, 2)
    assert [h["val_loss"] for h in reports["one"]["history"]] == [h["val_loss"] for h in reports["two"]["history"]]

    # one writer: the two-process run has exactly the checkpoints, grids and report of the one-process run
    for run in ("one", "two"):
        qt = tmp_path / run / "quality_tune"
        assert sorted(p.name for p in (qt / "checkpoints").iterdir()) == ["latest.json", "step-0000002", "step-0000004"]
        assert (qt / "report.json").is_file() and (qt / "best" / "model_index.json").is_file()


def test_two_processes_preference_tune_the_weights_one_process_does(frozen, curated_dir, tmp_path):
    """Data-parallel Diffusion-DPO with the pixel term: each of two processes takes every other pair of a batch of
    4 (and its share of the same noise draw), the gradients are averaged: the weights of one process on the
    whole batch, to float rounding. Rank 0 alone encodes the pairs and writes checkpoints, pipelines and the report."""
    import pyarrow as pa

    from annotation.preference import judge_pairs
    from tests.model.conftest import export_tiny_pipeline
    from tests.model.test_preference import _candidates

    checkpoint = export_tiny_pipeline(tmp_path / "start", frozen)
    rows = [r for r in _candidates(curated_dir, tmp_path / "candidates").to_pylist() if r["prompt_id"] < "p06"]
    pairs = judge_pairs(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")

    def train_pref(out: Path, processes: int) -> subprocess.CompletedProcess:
        # SGD: Adam's first steps divide each gradient by its own size, which turns the last-bit differences of
        # a batch of 4 vs two of 2 (other kernel blocking) into whole-step differences where gradients are ~0
        return launch(["-m", "model", "train-pref", "--checkpoint", str(checkpoint), "--pairs", str(pairs),
                       "--out", str(out)],
                      ["preference.feedback=[ai]", "preference.max_steps=3", "preference.batch_size=4",
                       "preference.optimizer=sgd", "preference.learning_rate=0.05", "preference.eval_every=3",
                       "preference.checkpoint_every=2", "preference.val_fraction=0.2", "preference.pixel_loss_weight=1"],
                      processes)

    train_pref(tmp_path / "two", 2)
    train_pref(tmp_path / "one", 1)
    start = unet_weights(checkpoint)
    w1, w2 = unet_weights(tmp_path / "one" / "final"), unet_weights(tmp_path / "two" / "final")
    moved = max((w1[k] - start[k]).abs().max().item() for k in start)
    apart = max((w1[k] - w2[k]).abs().max().item() for k in start)
    print(f"weights moved by {moved:.3e}; one vs two processes differ by {apart:.3e}")
    assert moved > 1e-4, "preference tuning must have changed the weights"
    assert apart <= 1e-3 * moved, f"two processes differ from one by {apart:.2e}; training moved weights by {moved:.2e}"
    reports = {run: json.loads((tmp_path / run / "report.json").read_text()) for run in ("one", "two")}
    assert reports["one"]["beta"] == reports["two"]["beta"]
    assert [(reports[r]["processes"], reports[r]["pairs_per_process_per_step"]) for r in ("one", "two")] == [(1, 4), (2, 2)]
    # β ~ 1/δ amplifies the weights' rounding differences (1e-7) into the held-out loss's fifth digit
    assert ([h["val_loss"] for h in reports["two"]["history"]] ==
            pytest.approx([h["val_loss"] for h in reports["one"]["history"]], rel=1e-4))
    for run in ("one", "two"):
        assert sorted(p.name for p in (tmp_path / run / "checkpoints").iterdir()) == [
            "latest.json", "step-0000002", "step-0000003"]
