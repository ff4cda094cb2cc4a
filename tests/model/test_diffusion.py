"""The diffusion math against hand computations and against diffusers' own schedulers."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, EDMEulerScheduler

from model import diffusion as D


def test_pixel_space_loss_equals_eq2_on_a_hand_case():
    # D(x) = 2x + 1 per pixel: eq. 2 becomes mean((2 s (ε - ε̂))²) = 4 s² mean((ε - ε̂)²)
    decode = lambda x: 2 * x + 1  # noqa: E731
    z = torch.tensor([[[[1.0, -1.0], [0.5, 0.0]]]])
    eps = torch.tensor([[[[0.2, 0.4], [-0.6, 1.0]]]])
    eps_hat = torch.tensor([[[[0.0, 0.4], [0.4, 0.5]]]])
    ab = torch.tensor([0.64])
    a, s = D.ddpm_scales(ab)  # 0.8, 0.6
    expected = 4 * 0.36 * ((0.2**2 + 0 + 1.0**2 + 0.5**2) / 4)
    assert D.pixel_space_loss(decode, z, eps, eps_hat, a, s).item() == pytest.approx(expected, rel=1e-6)
    # ε̂ = ε gives zero loss whatever the decoder
    assert D.pixel_space_loss(decode, z, eps, eps, a, s).item() == 0.0


def test_noise_offset_adds_a_per_channel_constant_of_the_right_scale():
    shape = (64, 4, 32, 32)
    plain = D.offset_noise(shape, 0.0, torch.Generator().manual_seed(3))
    offset = D.offset_noise(shape, 0.1, torch.Generator().manual_seed(3))
    delta = offset - plain
    # constant over H×W for each (sample, channel) ...
    assert torch.allclose(delta, delta[:, :, :1, :1].expand_as(delta), atol=1e-6)
    # ... of std noise_offset (256 draws of N(0, 0.1²))
    assert delta[:, :, 0, 0].std().item() == pytest.approx(0.1, rel=0.15)


def test_scaled_linear_and_zero_snr_match_diffusers_and_zero_snr_reaches_zero():
    betas = D.scaled_linear_betas()
    ab = D.alphas_cumprod(betas)
    ref = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert torch.allclose(ab.float(), ref.alphas_cumprod, atol=1e-6)
    assert D.snr_from_alphas_cumprod(ab)[-1] > 4e-3  # SD's flaw: terminal SNR ≈ 0.0047, not 0
    zab = D.alphas_cumprod(D.rescale_zero_terminal_snr(betas))
    zref = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)
    assert torch.allclose(zab.float(), zref.alphas_cumprod, atol=1e-6)
    assert D.snr_from_alphas_cumprod(zab)[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert zab[0].item() == pytest.approx(ab[0].item())  # the first step is kept


def test_edm_reaches_near_zero_terminal_snr_and_matches_diffusers_preconditioning():
    sigmas = D.karras_sigmas(10, 0.002, 80.0)
    assert sigmas[0].item() == pytest.approx(80.0) and sigmas[-1].item() == 0.0
    assert D.edm_snr(sigmas[0]).item() < 1e-4
    sched = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)
    sigma = torch.tensor([0.1, 1.0, 20.0])
    c_skip, c_out, c_in, c_noise = D.edm_preconditioning(sigma, 0.5)
    x = torch.randn(3, 1, 1, 1)
    f = torch.randn(3, 1, 1, 1)
    assert torch.allclose(D._bc(c_in, x) * x, sched.precondition_inputs(x, sigma.view(-1, 1, 1, 1)))
    assert torch.allclose(c_noise, sched.precondition_noise(sigma))
    assert torch.allclose(D.edm_denoised(f, x, sigma), sched.precondition_outputs(x, f, sigma.view(-1, 1, 1, 1)))
    # the effective target makes D exact: D(z_σ; σ) with F = target equals z
    z, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    z_sigma = z + D._bc(sigma, z) * eps
    assert torch.allclose(D.edm_denoised(D.edm_target(z, z_sigma, sigma), z_sigma, sigma), z, atol=1e-5)
    assert torch.allclose(D.edm_predicted_noise(D.edm_target(z, z_sigma, sigma), z_sigma, sigma), eps, atol=1e-4)


def test_v_prediction_round_trip_and_min_snr_weights():
    z, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    a, s = D.ddpm_scales(torch.tensor([0.9, 0.1]))
    z_t = D.add_noise(z, eps, a, s)
    v = D.velocity(z, eps, a, s)
    assert torch.allclose(D.ddpm_predicted_noise("v_prediction", v, z_t, a, s), eps, atol=1e-5)
    snr = torch.tensor([0.0, 1.0, 20.0])
    assert torch.allclose(D.min_snr_weights(snr, 5.0, "v_prediction"), torch.tensor([0.0, 0.5, 5 / 21]))
    assert torch.allclose(D.min_snr_weights(snr[1:], 5.0, "epsilon"), torch.tensor([1.0, 0.25]))
