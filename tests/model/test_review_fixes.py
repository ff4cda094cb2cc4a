"""Issue 14 item 4, the review of model/: the pixel-space loss weight calibrated "to balance the magnitudes"
(PS eq. 3) and the pixel-only ablation, bucket weights that bound how often an image repeats, offset noise
with EDM, and the 16-channel Fourier + adversarial autoencoder preset. The models are the tiny
RANDOMLY-INITIALISED ones of tests/model/conftest.py (text encoder, autoencoder) and tiny UNets from config."""

from __future__ import annotations

import collections
import json
import logging
import warnings

import numpy as np
import pytest
import torch

from model.autoencoder import train_autoencoder
from model.bases import build_unet
from model.config import ConfigError, ConfigWarning, load_config
from model.data import BalancedBucketSampler, bucket_weights, crop_to_bucket
from model.objective import diffusion_loss, generator, training_alphas_cumprod
from model.train import StageRun, run_stage
from tests.model.conftest import photo_variants, tiny

AUTO = ["quality_tune.pixel_loss_weight=auto", "quality_tune.pixel_loss_calibration_batches=3"]


# --- 1. the pixel-space loss weight ------------------------------------------------------------------


def test_auto_lambda_balances_the_weighted_pixel_term_against_the_latent_term(frozen, curated_dir, tmp_path):
    cfg = tiny(*AUTO, "quality_tune.pixel_loss_balance=0.5")
    run = StageRun(cfg, cfg.quality_tune, curated_dir, tmp_path / "qt", frozen, None, None)
    calibration = run.state["pixel_calibration"]
    lam = run.stage.pixel_loss_weight
    assert calibration["pixel_loss_weight"] == lam and calibration["batches"] == 3
    # measured again through the loss the steps minimise, one term at a time, on the calibration batches
    pixel_only = run.stage.model_copy(update={"latent_loss_weight": 0.0})
    latent_only = run.stage.model_copy(update={"pixel_loss_weight": 0.0})
    weighted_pixel, latent = [], []
    with torch.no_grad():
        for draw in range(3):
            z, cond = run.cache.gather(*run.sampler.batch(draw))
            weighted_pixel.append(run.loss(run.unet, z, cond, generator(cfg.seed, 3, draw), pixel_only)[0].item())
            latent.append(run.loss(run.unet, z, cond, generator(cfg.seed, 3, draw), latent_only)[0].item())
    assert np.mean(weighted_pixel) / np.mean(latent) == pytest.approx(0.5, rel=1e-4)
    assert calibration["pixel_to_latent"] == pytest.approx(np.mean(weighted_pixel) / lam / np.mean(latent), rel=1e-4)


def test_auto_lambda_is_recorded_and_a_resumed_run_reuses_it(frozen, curated_dir, tmp_path, caplog):
    first = tiny(*AUTO, "quality_tune.max_steps=2")
    a = run_stage(first, first.quality_tune, curated_dir, tmp_path / "qt", frozen, progress=False)
    report = json.loads((tmp_path / "qt" / "report.json").read_text())
    assert report["pixel_calibration"] == a.pixel_calibration and report["pixel_loss_weight"] == a.pixel_loss_weight
    assert a.pixel_loss_weight == a.pixel_calibration["pixel_loss_weight"] > 0
    # resumed with another balance: measured again, λ would be 4x; it is the recorded one
    resumed_cfg = tiny(*AUTO, "quality_tune.max_steps=3", "quality_tune.pixel_loss_balance=4.0")
    with caplog.at_level(logging.INFO, logger="model.train"):
        resumed = run_stage(resumed_cfg, resumed_cfg.quality_tune, curated_dir, tmp_path / "qt", frozen, progress=False)
    assert resumed.steps == 3 and "reusing the calibrated pixel-loss weight" in caplog.text
    assert "calibrated on" not in caplog.text
    assert resumed.pixel_calibration == a.pixel_calibration and resumed.pixel_loss_weight == a.pixel_loss_weight


def test_latent_loss_weight_zero_leaves_only_the_weighted_pixel_term(frozen):
    cfg = tiny("quality_tune.latent_loss_weight=0", "quality_tune.pixel_loss_weight=3.0")
    torch.manual_seed(0)
    unet = build_unet(cfg, frozen, 64)
    z = torch.randn(2, 4, 8, 8)
    cond = {"text": torch.randn(2, 77, 32)}

    def decode(x):
        return frozen.vae.decode(x).sample

    ab = training_alphas_cumprod(cfg)
    loss, parts = diffusion_loss(unet, z, cond, cfg, cfg.quality_tune, generator(0, 5), ab, decode)
    assert parts["latent"] > 0 and loss.item() == pytest.approx(3.0 * parts["pixel"], rel=1e-6)
    assert torch.isfinite(loss) and loss.requires_grad

    def grads(stage) -> list[torch.Tensor]:
        unet.zero_grad()
        diffusion_loss(unet, z, cond, cfg, stage, generator(0, 5), ab, decode)[0].backward()
        return [p.grad.clone() for p in unet.parameters()]

    # the gradient is the pixel term's alone: full = pixel-only + latent-only, and the latent part is not 0
    pixel_grad = grads(cfg.quality_tune)
    latent_grad = grads(cfg.quality_tune.model_copy(update={"latent_loss_weight": 1.0, "pixel_loss_weight": 0.0}))
    full_grad = grads(cfg.quality_tune.model_copy(update={"latent_loss_weight": 1.0}))
    assert all(torch.allclose(f, p + q, atol=1e-5) for f, p, q in zip(full_grad, pixel_grad, latent_grad))
    assert max(g.abs().max().item() for g in latent_grad) > 1e-3
    with pytest.raises(ConfigError, match="both 0"):
        tiny("quality_tune.latent_loss_weight=0", "quality_tune.pixel_loss_weight=0")
    with pytest.raises(ConfigError, match="not calibrated"):
        diffusion_loss(unet, z, cond, cfg, tiny(*AUTO).quality_tune, generator(0, 5), ab, decode)


# --- 2. bucket weights ------------------------------------------------------------------------------

SIZES = [1500, 300, 150, 30, 20]  # a 2,000-image set: square, 4:3, 3:4, 16:9, 9:16


def repeat_ratios_counted(sampler: BalancedBucketSampler, members: list[list[int]], draws: int) -> list[float]:
    """Per bucket: the mean times its images were drawn over ``draws`` draws / the mean over all images."""
    seen = collections.Counter(i for d in range(draws) for i in sampler.batch(d)[1])
    counts = np.array([seen[i] for m in members for i in m])
    return [np.mean([seen[i] for i in m]) / counts.mean() for m in members]


def test_bucket_weights_bound_how_often_an_image_repeats():
    members, start = [], 0
    for n in SIZES:
        members.append(list(range(start, start + n)))
        start += n
    equal = BalancedBucketSampler(members, 4, seed=0)  # Playground's equal draw
    before = repeat_ratios_counted(equal, members, 50 * equal.round_length)
    assert before[-1] == pytest.approx(20.0) and before[-1] / before[0] == pytest.approx(75.0)
    default = load_config("tiny").data
    fixed = BalancedBucketSampler(members, 4, 0, default.bucket_weight_alpha, default.max_repeat_ratio)
    after = repeat_ratios_counted(fixed, members, 5 * fixed.round_length)
    assert max(after) <= default.max_repeat_ratio * 1.01 and max(after) / min(after) < 6, after
    assert after == pytest.approx(fixed.repeat_ratios(), rel=1e-9)
    # the small buckets keep more than their proportional share of the draws (aspect ratios represented)
    shares = bucket_weights(SIZES, default.bucket_weight_alpha, default.max_repeat_ratio)
    assert sum(shares) == pytest.approx(1.0) and shares[-1] > 3 * SIZES[-1] / sum(SIZES)
    proportional = BalancedBucketSampler(members, 4, 0, alpha=1.0)
    assert max(repeat_ratios_counted(proportional, members, 5 * proportional.round_length)) < 1.02


def test_weighted_sampler_is_a_pure_function_of_seed_and_draw():
    members = [list(range(200)), list(range(200, 230)), list(range(230, 238))]
    draws = [0, 7, 4095, 4096, 9000, 3]
    a = BalancedBucketSampler(members, 4, 3, alpha=0.5, max_repeat_ratio=4.0)
    b = BalancedBucketSampler(members, 4, 3, alpha=0.5, max_repeat_ratio=4.0)
    assert [a.batch(d) for d in draws] == [b.batch(d) for d in reversed(draws)][::-1]
    assert [a.batch(d) for d in draws] != [BalancedBucketSampler(members, 4, 4, 0.5, 4.0).batch(d) for d in draws]


# --- 3. offset noise with EDM ----------------------------------------------------------------------


def test_offset_noise_with_edm_is_a_config_warning_and_the_edm_preset_has_none():
    with pytest.warns(ConfigWarning, match="quality-tune .noise_offset 0.1.*Playground v2.5"):
        cfg = tiny("diffusion.schedule=edm")
    assert cfg.quality_tune.noise_offset == 0.1  # still applied as configured: a warning, not a change
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        tiny("diffusion.schedule=edm", "quality_tune.noise_offset=0", "pretrain.1.noise_offset=0")
        mid = load_config("mid")
        tiny()  # DDPM: offset noise is what the tiny preset means
    assert mid.diffusion.schedule == "edm" and not any(s.noise_offset for s in [*mid.pretrain, mid.quality_tune])


# --- 4. the 16-channel Fourier + adversarial autoencoder --------------------------------------------


def test_ae16_preset_trains_and_reports_psnr_ssim_and_kid(staged_mobilenet, tmp_path):
    from model.evaluation.distribution import ImageNetFeatures

    cfg = load_config("ae16", ["autoencoder.train_steps=4", "autoencoder.train_batch_size=4"]).autoencoder
    assert cfg.latent_channels == 16 and cfg.fourier_frequencies > 0 and cfg.adversarial_weight > 0
    images = torch.stack([crop_to_bucket(im, (cfg.train_resolution,) * 2) for im, _ in photo_variants(10)])
    metrics = train_autoencoder(cfg, images[4:], images[:4], tmp_path / "ae", progress=False,
                                features=ImageNetFeatures(device="cpu"))
    assert set(metrics) == {"psnr", "ssim", "kid"} and all(np.isfinite(v) for v in metrics.values()), metrics
    assert 0 < metrics["psnr"] < 40 and -1 < metrics["ssim"] < 1
