"""Preference tuning (PS §3.2, eqs. 4-7): the losses on hand-computed tiny tensors, their gradient signs,
the shared-noise step against the supervised objective on every schedule, and a tiny-model run in which
AI-feedback pairs (sharp over blurred) raise the sharpness of generations over SFT alone."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageFilter

from model import preference as P
from model.config import load_config
from model.objective import diffusion_loss, draw_noise, generator, training_alphas_cumprod

from tests.model.conftest import tiny


def _tensor(values):
    """(B, 1, 1, n) predictions for rows of ``values``."""
    return torch.tensor(values, dtype=torch.float32).reshape(len(values), 1, 1, -1)


# winner / loser predictions against a zero target, and the reference's; per-sample errors by hand:
#   e_θ^w = (0.1² + 0.3²)/2 = 0.05   e_ref^w = (0.2² + 0.2²)/2 = 0.04
#   e_θ^l = (0.4² + 0²)/2   = 0.08   e_ref^l = 0.04
PRED_W, PRED_L, REF = [[0.1, 0.3]], [[0.4, 0.0]], [[0.2, 0.2]]


def test_per_sample_error_is_the_mean_squared_error_of_each_sample():
    errors = P.per_sample_error(_tensor(PRED_W + PRED_L), torch.zeros(2, 1, 1, 2))
    assert errors.tolist() == pytest.approx([0.05, 0.08])


def test_dpo_loss_known_answer():
    # δ = (0.05 - 0.04) - (0.08 - 0.04) = -0.03; β = 20: margin = -β δ = 0.6; L = -log σ(0.6) = log(1 + e^-0.6)
    zero = torch.zeros(1, 1, 1, 2)
    e = {k: P.per_sample_error(_tensor(v), zero) for k, v in (("w", PRED_W), ("l", PRED_L), ("ref", REF))}
    loss, margin = P.dpo_loss(e["w"], e["l"], e["ref"], e["ref"], beta=20.0)
    assert margin.item() == pytest.approx(0.6, abs=1e-6)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.6)), abs=1e-6)  # 0.43743...
    # the policy equal to the reference: δ = 0, L = log 2 whatever the images
    loss, margin = P.dpo_loss(e["w"], e["l"], e["w"], e["l"], beta=20.0)
    assert (margin.item(), loss.item()) == pytest.approx((0.0, math.log(2)))


def test_simpo_loss_known_answer():
    # -β (e^w - e^l) = -20 (0.05 - 0.08) = 0.6; with γ = 0.5: L = -log σ(0.1) = log(1 + e^-0.1)
    zero = torch.zeros(1, 1, 1, 2)
    e_w, e_l = P.per_sample_error(_tensor(PRED_W), zero), P.per_sample_error(_tensor(PRED_L), zero)
    loss, margin = P.simpo_loss(e_w, e_l, beta=20.0, gamma=0.5)
    assert margin.item() == pytest.approx(0.6, abs=1e-6)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.1)), abs=1e-6)
    assert P.simpo_loss(e_l, e_w, beta=20.0)[0].item() == pytest.approx(math.log(1 + math.exp(0.6)), abs=1e-6)


def test_total_is_latent_plus_mu_pixel():
    assert P.preference_total(torch.tensor(0.4), torch.tensor(0.3), 2.0).item() == pytest.approx(1.0)
    assert P.preference_total(torch.tensor(0.4), None, 2.0).item() == pytest.approx(0.4)


@pytest.mark.parametrize("objective", ["dpo", "simpo"])
def test_gradient_descent_lowers_the_winner_error_and_raises_the_loser_error(objective):
    pred_w, pred_l = _tensor(PRED_W).requires_grad_(), _tensor(PRED_L).requires_grad_()
    ref = _tensor(REF).requires_grad_()
    zero = torch.zeros(1, 1, 1, 2)
    errors = {"w": P.per_sample_error(pred_w, zero), "l": P.per_sample_error(pred_l, zero),
              "ref_w": P.per_sample_error(ref, zero), "ref_l": P.per_sample_error(ref, zero)}
    loss, _ = P.pair_loss(objective, errors, beta=20.0)
    loss.backward()
    assert ref.grad is None or not ref.grad.any()  # the reference is frozen: no gradient reaches it
    with torch.no_grad():
        e_w = P.per_sample_error(pred_w - 0.1 * pred_w.grad, zero).item()
        e_l = P.per_sample_error(pred_l - 0.1 * pred_l.grad, zero).item()
    assert e_w < 0.05 and e_l > 0.08


def test_calibrated_beta_puts_the_median_margin_at_one():
    beta = P.calibrated_beta(torch.tensor([0.010, 0.020, 0.030]), torch.tensor([0.012, 0.016, 0.031]))
    assert beta == pytest.approx(1 / 0.002)
    with pytest.raises(ValueError, match="identical"):
        P.calibrated_beta(torch.ones(2), torch.ones(2))


class _Linear(torch.nn.Module):
    """A toy 'UNet' whose output is w x (enough to check the step's algebra by hand)."""

    def __init__(self, w: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w))

    def forward(self, x, t, encoder_hidden_states=None):
        return SimpleNamespace(sample=self.w * x)


def test_pixel_term_through_a_linear_decoder_is_four_s_squared_times_the_latent_error():
    """ε-prediction and D(z) = 2z: PS eq. 6's ‖D(az + sε) - D(az + sε̂)‖² = 4 s² ‖ε - ε̂‖², per sample."""
    cfg = load_config("tiny", ["diffusion.min_snr_gamma=null"])
    torch.manual_seed(0)
    z_w, z_l = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    noise = draw_noise(tuple(z_w.shape), cfg, 0.0, generator(0, 9), training_alphas_cumprod(cfg))
    errors = P.pair_errors(_Linear(0.5), z_w, z_l, noise, {"text": torch.zeros(3, 1, 8)}, cfg, lambda z: 2 * z)
    s2 = noise.s**2
    assert torch.allclose(errors["pixel_w"], 4 * s2 * errors["w"], rtol=1e-4)
    assert torch.allclose(errors["pixel_l"], 4 * s2 * errors["l"], rtol=1e-4)


@pytest.mark.parametrize("schedule", [["diffusion.schedule=scaled_linear"],
                                      ["diffusion.schedule=zero_snr", "diffusion.prediction_type=v_prediction"],
                                      ["diffusion.schedule=edm"]])
def test_pair_errors_match_the_supervised_loss_on_every_schedule(frozen, schedule):
    """The same draws as objective.diffusion_loss: with min-SNR off, the mean winner error IS its latent
    loss (a tiny random UNet), so eq. 4-5 regress exactly what SFT regresses, under ε, v and EDM."""
    from model.bases import build_unet

    cfg = tiny("diffusion.min_snr_gamma=null", "quality_tune.pixel_loss_weight=0", *schedule)
    unet = build_unet(cfg, frozen, 32)
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    cond = {"text": torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(2))}
    alphas = training_alphas_cumprod(cfg)
    with torch.no_grad():
        sft, _ = diffusion_loss(unet, z, cond, cfg, cfg.quality_tune, generator(0, 5), alphas, None)
        noise = draw_noise(tuple(z.shape), cfg, cfg.quality_tune.noise_offset, generator(0, 5), alphas)
        errors = P.pair_errors(unet, z, z.flip(0), noise, cond, cfg, None)
    assert errors["w"].mean().item() == pytest.approx(sft.item(), rel=1e-4)


def test_per_image_conditioning_reaches_its_own_image(frozen):
    """A cond entry of 2B rows (SDXL's time_ids: each image's own size and crop) gives the winners the first
    B rows and the losers the last B, as if each side ran alone with its own rows; B+1 rows is an error."""
    from model.bases import build_unet

    cfg = tiny()
    unet = build_unet(cfg, frozen, 32)
    z_w, z_l = torch.randn(2, 2, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    text = torch.randn(4, 77, 32, generator=torch.Generator().manual_seed(8))
    noise = draw_noise(tuple(z_w.shape), cfg, 0.0, generator(0, 9), training_alphas_cumprod(cfg))
    with torch.no_grad():
        both = P.pair_errors(unet, z_w, z_l, noise, {"text": text}, cfg, None)
        winners = P.pair_errors(unet, z_w, z_w, noise, {"text": text[:2]}, cfg, None)
        losers = P.pair_errors(unet, z_l, z_l, noise, {"text": text[2:]}, cfg, None)
        shared = P.pair_errors(unet, z_w, z_l, noise, {"text": text[:2]}, cfg, None)
    assert torch.allclose(both["w"], winners["w"], rtol=1e-5) and torch.allclose(both["l"], losers["l"], rtol=1e-5)
    assert not torch.allclose(both["l"], shared["l"], rtol=1e-5), "the losers' own rows made no difference"
    with pytest.raises(ValueError, match="3 rows for 2 pairs"):
        P.pair_errors(unet, z_w, z_l, noise, {"text": text[:3]}, cfg, None)


@pytest.mark.parametrize("objective", ["dpo", "simpo"])
def test_identical_winner_and_loser_give_log_two(frozen, objective):
    """Shared t and ε: the same image as winner and loser has equal errors, so the loss is log 2 (and DPO
    against itself is log 2 for any pair); μ > 0 adds μ log 2."""
    import copy

    from model.bases import build_unet

    cfg = tiny()
    unet = build_unet(cfg, frozen, 32)
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    cond = {"text": torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(4))}
    noise = draw_noise(tuple(z.shape), cfg, 0.0, generator(0, 6), training_alphas_cumprod(cfg))
    decode = frozen.vae.decode
    step = P.preference_loss(unet, copy.deepcopy(unet), z, z.clone(), cond, cfg, objective, beta=1000.0,
                             pixel_beta=100.0, mu=2.0, gamma=0.0, noise=noise, decode=lambda x: decode(x).sample)
    assert step.loss.item() == pytest.approx(3 * math.log(2), rel=1e-4)
    assert step.margin.abs().max().item() < 1e-6


# --- a tiny run: AI-feedback pairs (sharp over blurred) raise the sharpness of generations ----------------

SFT = ["quality_tune.max_steps=40", "quality_tune.learning_rate=1e-3", "quality_tune.eval_every=1000",
       "quality_tune.sample_every=1000", "quality_tune.checkpoint_every=1000", "quality_tune.ema_decay=null",
       "quality_tune.val_fraction=0.1", "quality_tune.pixel_loss_weight=0", "data.bucket_aspect_ratios=[1.0]"]
PREF = ["preference.feedback=[ai]", "preference.max_steps=20", "preference.batch_size=4", "preference.learning_rate=3e-4",
        "preference.eval_every=10", "preference.val_fraction=0.25"]


def _candidates(curated: Path, out: Path) -> pa.Table:
    """Per curated photo (its caption the prompt), the photo and four blurred copies: the judge's candidates."""
    rows = []
    out.mkdir(parents=True, exist_ok=True)
    for i, line in enumerate((curated / "metadata.jsonl").read_text().splitlines()):
        meta = json.loads(line)
        photo = Image.open(curated / meta["file_name"]).convert("RGB")
        for k, radius in enumerate([0, 1, 2, 3, 4]):
            path = out / f"{i:02d}-{k}.png"
            (photo.filter(ImageFilter.GaussianBlur(radius)) if radius else photo).save(path)
            rows.append({"prompt_id": f"p{i:02d}", "prompt": meta["text"], "image_path": str(path)})
    return pa.Table.from_pylist(rows)


def test_dpo_on_sharp_over_blurred_pairs_raises_the_sharpness_of_generations(shared_dir, curated_dir, tmp_path):
    """The real pretrained TAEF2 autoencoder (../shared; a random one decodes noise whose sharpness means
    nothing), a TINY RANDOMLY-INITIALISED CLIP and UNet, the UNet pretrained 40 steps on 12 photos: the SFT
    checkpoint. The sharpness judge picks best and worst of each photo's 5 candidates (the photo and four
    blurred copies: AI feedback); DPO on those pairs; both checkpoints generate the same prompts and seeds
    and the judge scores the images."""
    from annotation.preference import judge_pairs, sharpness
    from model.autoencoder import load_taesd
    from model.bases import Frozen
    from model.evaluation.generate import generate
    from model.text import load_text_encoder
    from model.train import run_stage
    from model.train_pref import train_preference

    weights = shared_dir / "weights" / "taesd"
    taef2 = ["autoencoder.kind=taesd", f"autoencoder.encoder_path={weights}/taef2_encoder.pth",
             f"autoencoder.decoder_path={weights}/taef2_decoder.pth"]
    cfg = tiny(*taef2, *SFT)
    frozen = Frozen(*load_text_encoder(cfg.text_encoder, cfg.seed),
                    load_taesd(weights / "taef2_encoder.pth", weights / "taef2_decoder.pth").eval().requires_grad_(False))
    sft = run_stage(cfg, cfg.quality_tune, curated_dir, tmp_path / "sft", frozen, progress=False).final
    pairs = judge_pairs(_candidates(curated_dir, tmp_path / "candidates"), tmp_path / "pairs.parquet")
    result = train_preference(sft, pairs, tmp_path / "dpo", overrides=PREF, progress=False)
    assert result.pairs == {"train": 10, "held_out": 2, "feedback": {"ai": 12}}  # held out by a seeded hash of the prompt
    first, last = result.history[0], result.history[-1]
    assert (first["val_reward_margin"], first["val_loss"]) == (0.0, pytest.approx(math.log(2)))  # DPO starts at its reference
    assert last["val_preference_accuracy"] == 1.0 and last["val_reward_margin"] > 1 and last["val_loss"] < 0.3

    prompts = pa.table({"prompt_id": [f"q{i}" for i in range(4)], "category": ["x"] * 4,
                        "prompt": ["a red fox", "a cup of coffee", "an astronaut", "a rocket"]})
    manifest = pq.read_table(generate({"sft": sft, "dpo": result.final}, prompts, 2, tmp_path / "generate", steps=8,
                                      guidance_scale=1.0)).to_pylist()
    mean = {label: sum(sharpness((tmp_path / "generate" / r["image_path"]).read_bytes()) for r in manifest
                       if r["checkpoint"] == label) / 8 for label in ("sft", "dpo")}
    print(f"judge's sharpness of generations: {mean}")
    assert mean["dpo"] > 1.5 * mean["sft"], mean


def test_cli_trains_simpo_with_the_pixel_term_and_refuses_unlisted_feedback(frozen, curated_dir, tmp_path, capsys):
    """``python -m model train-pref`` on a RANDOM tiny pipeline (tests/model/conftest.py): two SimPO steps with
    μ = 2 write best/final pipelines and the report; human-only runs refuse AI-feedback pairs (exit 2)."""
    from annotation.preference import judge_pairs
    from model.__main__ import main
    from model.pipeline import load_pipeline
    from tests.model.conftest import export_tiny_pipeline

    checkpoint = export_tiny_pipeline(tmp_path / "start", frozen)
    four = [r for r in _candidates(curated_dir, tmp_path / "candidates").to_pylist() if r["prompt_id"] < "p04"]
    pairs = judge_pairs(pa.Table.from_pylist(four), tmp_path / "pairs.parquet")
    args = ["train-pref", "--checkpoint", str(checkpoint), "--pairs", str(pairs), "--out", str(tmp_path / "out")]
    steps = ["--set", "preference.max_steps=2", "--set", "preference.eval_every=1", "--set", "preference.batch_size=2"]
    assert main([*args, *steps]) == 2
    assert "feedback {'ai': 4} but this run takes only ['human']" in capsys.readouterr().err
    assert main([*args, *steps, "--set", "preference.feedback=[ai]", "--set", "preference.objective=simpo",
                 "--set", "preference.pixel_loss_weight=2", "--set", "preference.simpo_gamma=0.5"]) == 0
    printed = capsys.readouterr().out
    assert "held-out preference accuracy" in printed and "'ai': 4" in printed
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["objective"] == "simpo" and report["steps"] == 2 and report["pixel_beta"] > 0
    assert {"val_pixel_preference_accuracy", "val_pixel_reward_margin"} <= set(report["history"][-1])
    assert load_pipeline(tmp_path / "out" / "final").unet.config.in_channels == 4


# SD-2-v (v-prediction, full fine-tuning) passed too (2026-12-03); left out of the suite for time: its
# schedule is covered by the shared-noise test above and full fine-tuning by the sharpness run
@pytest.mark.parametrize("family, overrides", [("sdxl", ['preference.lora={"rank": 4}'])])
def test_dpo_on_public_bases_full_and_lora(curated_dir, tmp_path, family, overrides):
    """A TINY RANDOMLY-INITIALISED SDXL pipeline (tests/builders.py; pooled text and time_ids) with a LoRA
    adapter, whose DPO reference is the same UNet with the adapter off: two DPO steps with the pixel term at
    64 px; the result loads in the stock pipeline (full fine-tuning of a base takes the other branch)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from annotation.preference import judge_pairs
    from model.lora import LORA_WEIGHTS
    from model.train_pref import train_preference
    from tests.builders import tiny_random_sd_pipeline

    base = tiny_random_sd_pipeline(tmp_path / family, family)
    four = [r for r in _candidates(curated_dir, tmp_path / "candidates").to_pylist() if r["prompt_id"] < "p04"]
    pairs = judge_pairs(pa.Table.from_pylist(four), tmp_path / "pairs.parquet")
    result = train_preference(base, pairs, tmp_path / "out", overrides=[
        "preference.feedback=[ai]", "preference.max_steps=2", "preference.batch_size=2", "preference.eval_every=1",
        "preference.resolution=64", "preference.pixel_loss_weight=1",
        # the public presets train in bf16, and accelerate keeps a process's first precision: the other
        # tests of a session run in fp32 on the CPU
        "mixed_precision=no", *overrides], progress=False)
    assert result.steps == 2 and result.history[0]["val_loss"] == pytest.approx(2 * math.log(2), rel=1e-4)
    assert result.history[-1]["val_loss"] != result.history[0]["val_loss"], "the policy moved away from its reference"
    if overrides:
        assert (result.final / LORA_WEIGHTS).is_file()
        pipe = StableDiffusionXLPipeline.from_pretrained(base)
        pipe.load_lora_weights(str(result.final))
    else:
        pipe = StableDiffusionPipeline.from_pretrained(result.final)
        assert pipe.scheduler.config.prediction_type == "v_prediction"
    image = pipe("a fox", num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64)


def test_an_interrupted_run_resumes_where_the_uninterrupted_one_ends(frozen, curated_dir, tmp_path):
    """Four DPO steps in one go vs two steps, then the same output folder rerun to four: the same weights
    and held-out history (every step's batch and noise are seeded by the step; the optimizer, LR schedule and
    β come from the checkpoint). Other pairs on that folder are refused."""
    from annotation.preference import judge_pairs
    from model.checkpoints import CheckpointError
    from model.train_pref import train_preference
    from tests.model.conftest import export_tiny_pipeline

    checkpoint = export_tiny_pipeline(tmp_path / "start", frozen)
    rows = _candidates(curated_dir, tmp_path / "candidates").to_pylist()
    pairs = judge_pairs(pa.Table.from_pylist([r for r in rows if r["prompt_id"] < "p04"]), tmp_path / "pairs.parquet")
    common = ["preference.feedback=[ai]", "preference.batch_size=2", "preference.eval_every=1",
              "preference.checkpoint_every=2", "preference.learning_rate=1e-3"]

    def run(out: Path, steps: int):
        return train_preference(checkpoint, pairs, out, overrides=[*common, f"preference.max_steps={steps}"],
                                progress=False)

    whole = run(tmp_path / "whole", 4)
    first = run(tmp_path / "resumed", 2)
    assert first.steps == 2 and (tmp_path / "resumed" / "checkpoints" / "step-0000002").is_dir()
    resumed = run(tmp_path / "resumed", 4)
    assert resumed.steps == 4 and resumed.beta == whole.beta
    assert [h["step"] for h in resumed.history] == [0, 1, 2, 3, 4]
    assert [h["val_loss"] for h in resumed.history] == pytest.approx([h["val_loss"] for h in whole.history], rel=1e-6)
    from diffusers import UNet2DConditionModel

    w = UNet2DConditionModel.from_pretrained(whole.final / "unet").state_dict()
    r = UNet2DConditionModel.from_pretrained(resumed.final / "unet").state_dict()
    assert all(torch.allclose(w[k], r[k], atol=1e-6) for k in w)
    start = UNet2DConditionModel.from_pretrained(checkpoint / "unet").state_dict()
    assert not all(torch.equal(start[k], r[k]) for k in start), "the resumed run trained nothing"

    other = judge_pairs(pa.Table.from_pylist([r for r in rows if "p04" <= r["prompt_id"] < "p08"]),
                        tmp_path / "other.parquet")
    with pytest.raises(CheckpointError, match="other pairs"):
        train_preference(checkpoint, other, tmp_path / "resumed", overrides=[*common, "preference.max_steps=6"],
                         progress=False)


def test_pair_latents_are_streamed_to_disk_and_an_interrupted_encoding_resumes(frozen, curated_dir, tmp_path):
    """The images are read from the Parquet file a batch at a time into memory-mapped arrays; a rerun with the
    same key encodes only what is missing (rows past the last finished batch), another key starts over."""
    import numpy as np

    from annotation.preference import PROMPT, judge_pairs
    from model.train_pref import encode_pairs

    rows = _candidates(curated_dir, tmp_path / "candidates").to_pylist()
    pairs = judge_pairs(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    prompts = pq.read_table(pairs, columns=[PROMPT]).column(PROMPT).to_pylist()
    n = len(prompts)
    assert n >= 6

    def encode(key: str):
        return encode_pairs(pairs, prompts, frozen, 32, 0.5, torch.device("cpu"), tmp_path / "latents", key,
                            batch_size=2)

    first = encode("k")
    assert isinstance(first.z_w, np.memmap) and first.z_w.shape[0] == n and first.time_ids_l.shape == (n, 6)
    reference = {name: np.array(getattr(first, name)) for name in ("z_w", "z_l", "time_ids_w", "time_ids_l")}
    assert not np.allclose(reference["z_w"], reference["z_l"])
    # as if the process died after the second batch: later rows never written
    del first
    for name in ("z_w", "z_l"):
        array = np.load(tmp_path / "latents" / f"{name}.npy", mmap_mode="r+")
        array[4:] = 0
        array.flush()
    (tmp_path / "latents" / "meta.json").write_text(json.dumps({"key": "k", "done": 4}))
    resumed = encode("k")
    assert all(np.array_equal(reference[name], np.array(getattr(resumed, name))) for name in reference)
    assert json.loads((tmp_path / "latents" / "meta.json").read_text())["done"] == n
    # rows before "done" are trusted, not re-encoded: marking them and resuming keeps the mark
    array = np.load(tmp_path / "latents" / "z_w.npy", mmap_mode="r+")
    array[0] = 7.0
    array.flush()
    assert float(encode("k").z_w[0].max()) == 7.0
    assert np.array_equal(np.array(encode("other").z_w), reference["z_w"])  # another key: encoded afresh
