"""The diffusion math, as small pure functions (k-diffusion style). Tensors in, tensors out.

Two families of noise schedules share one training step:

- discrete DDPM (``scaled_linear``, optionally rescaled to zero terminal SNR): z_t = √ᾱ_t z + √(1-ᾱ_t) ε;
- EDM (Karras et al. 2022, as Playground v2.5 uses it): z_σ = z + σ ε, with the network preconditioned by
  c_in, c_noise, c_skip, c_out so that its input and target both have unit variance.

Both are written as "signal scale a, noise scale s" (z_t = a z + s ε): the DDPM family has a = √ᾱ,
s = √(1-ᾱ); EDM has a = 1, s = σ. The pixel-space loss (eq. 2 of the pixel-space post-training paper) is
written once against (a, s) and so serves both.

Equation numbers: "PS eq. N" = pixel-space-post-training.txt; "EDM eq./table" = Karras et al. 2022;
"ZSNR alg. 1" = Lin et al. 2023 (Common diffusion noise schedules and sample steps are flawed);
"Min-SNR" = Hang et al. 2023.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

# --- discrete (DDPM) schedules ---------------------------------------------------------------


def scaled_linear_betas(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                        beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion's schedule: β linear in √β from √beta_start to √beta_end (float64)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """ZSNR alg. 1: shift and scale √ᾱ so that √ᾱ_T = 0 (pure noise at the last step) while √ᾱ_1 stays.

    Without it, SD's last step keeps SNR ≈ 0.0047: the model never learns to generate from pure noise and
    sampling from pure noise gives muted, mid-grey images (Playground v2.5 §2.1).
    """
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alphas_bar = sqrt_ab**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """ᾱ_t = ∏_{i≤t} (1 - β_i) (PS §3.1)."""
    return torch.cumprod(1.0 - betas, dim=0)


def snr_from_alphas_cumprod(alphas_bar: torch.Tensor) -> torch.Tensor:
    """SNR(t) = ᾱ_t / (1 - ᾱ_t)."""
    return alphas_bar / (1.0 - alphas_bar)


def ddpm_scales(alphas_bar_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, s) = (√ᾱ_t, √(1-ᾱ_t)), the forward process x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε (PS §3.1)."""
    return alphas_bar_t.sqrt(), (1.0 - alphas_bar_t).sqrt()


# --- noise ---------------------------------------------------------------------------------


def offset_noise(shape: tuple[int, ...], noise_offset: float, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ε + noise_offset · δ with δ ~ N(0, 1) drawn once per (sample, channel) and broadcast over H×W.

    The per-channel constant lets the model shift an image's mean brightness, which plain ε cannot teach
    it to do (Guttenberg's offset noise). Emu uses 0.02 in the last pre-training stage and 0.1 while
    quality-tuning.
    """
    eps = torch.randn(shape, generator=generator, dtype=dtype)
    if noise_offset:
        eps = eps + noise_offset * torch.randn((*shape[:2], 1, 1), generator=generator, dtype=dtype)
    return eps


def add_noise(z: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """z_t = a z + s ε (a, s broadcast per sample)."""
    return _bc(a, z) * z + _bc(s, z) * eps


def velocity(z: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """v = a ε - s z (Salimans & Ho 2022), the v-prediction target."""
    return _bc(a, z) * eps - _bc(s, z) * z


def ddpm_target(prediction_type: str, z: torch.Tensor, eps: torch.Tensor, a: torch.Tensor,
                s: torch.Tensor) -> torch.Tensor:
    """What the UNet regresses to: ε (PS eq. 1) or v."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return velocity(z, eps, a, s)
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def ddpm_predicted_noise(prediction_type: str, model_output: torch.Tensor, z_t: torch.Tensor,
                         a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """ε̂ from the network output: itself for ε-prediction, ε̂ = a v̂ + s z_t for v-prediction (a² + s² = 1)."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return _bc(a, z_t) * model_output + _bc(s, z_t) * z_t
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weight per sample, for a loss written on the ε or v target.

    Min-SNR weights the x0-loss by min(SNR, γ); on the ε target that is min(SNR, γ)/SNR and on the v
    target min(SNR, γ)/(SNR + 1). It stops the many low-noise steps dominating the gradient.
    """
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if prediction_type == "epsilon":
        return clipped / snr.clamp_min(1e-12)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


# --- EDM -----------------------------------------------------------------------------------


def edm_training_sigmas(batch_size: int, p_mean: float = -1.2, p_std: float = 1.2,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """ln σ ~ N(P_mean, P_std²) (EDM table 1, "training")."""
    return (p_mean + p_std * torch.randn(batch_size, generator=generator, dtype=torch.float64)).exp()


def edm_preconditioning(sigma: torch.Tensor, sigma_data: float = 0.5) -> tuple[torch.Tensor, ...]:
    """(c_skip, c_out, c_in, c_noise) of EDM table 1, so D(x; σ) = c_skip x + c_out F(c_in x; c_noise).

    These are exactly diffusers' ``EDMEulerScheduler`` preconditioning for ε-prediction, so a model
    trained here samples with the stock scheduler.
    """
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1.0 / (sigma**2 + sigma_data**2).sqrt()
    c_noise = 0.25 * sigma.log()
    return c_skip, c_out, c_in, c_noise


def edm_target(z: torch.Tensor, z_sigma: torch.Tensor, sigma: torch.Tensor,
               sigma_data: float = 0.5) -> torch.Tensor:
    """F's effective target (z - c_skip z_σ) / c_out (EDM eq. 8). Regressing F to it with weight 1 equals
    the EDM loss λ(σ)‖D - z‖² with λ = 1/c_out²."""
    c_skip, c_out, _, _ = edm_preconditioning(sigma, sigma_data)
    return (z - _bc(c_skip, z) * z_sigma) / _bc(c_out, z)


def edm_denoised(model_output: torch.Tensor, z_sigma: torch.Tensor, sigma: torch.Tensor,
                 sigma_data: float = 0.5) -> torch.Tensor:
    """D(z_σ; σ) = c_skip z_σ + c_out F."""
    c_skip, c_out, _, _ = edm_preconditioning(sigma, sigma_data)
    return _bc(c_skip, z_sigma) * z_sigma + _bc(c_out, z_sigma) * model_output


def edm_predicted_noise(model_output: torch.Tensor, z_sigma: torch.Tensor, sigma: torch.Tensor,
                        sigma_data: float = 0.5) -> torch.Tensor:
    """ε̂ = (z_σ - D(z_σ; σ)) / σ."""
    return (z_sigma - edm_denoised(model_output, z_sigma, sigma, sigma_data)) / _bc(sigma, z_sigma)


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM eq. 5: σ_i = (σ_max^{1/ρ} + i/(n-1) (σ_min^{1/ρ} - σ_max^{1/ρ}))^ρ, descending, then 0."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    inv = sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    return torch.cat([inv**rho, torch.zeros(1, dtype=torch.float64)])


def edm_snr(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """SNR of z_σ = z + σ ε for data of std σ_data: σ_data² / σ². At σ_max = 80 it is ≈ 4e-5, i.e. the
    schedule reaches (near-)zero terminal SNR by construction (Playground v2.5 §2.1)."""
    return sigma_data**2 / sigma**2


# --- the pixel-space loss ------------------------------------------------------------------


def pixel_space_loss(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, eps: torch.Tensor,
                     eps_hat: torch.Tensor, a: torch.Tensor, s: torch.Tensor,
                     reduce: bool = True) -> torch.Tensor:
    """PS eq. 2: ‖D(a z + s ε) - D(a z + s ε̂)‖², both sides decoded from the noisy latent at the *current*
    timestep (not from a predicted x0, which PS §4.4 / eq. 8 shows gives blurry targets).

    The target side is decoded without a graph; the prediction side keeps it, so the gradient flows
    through the (frozen) decoder into ε̂ and on to the UNet only. Mean over pixels; per sample if not
    ``reduce``.
    """
    with torch.no_grad():
        target = decode(add_noise(z, eps, a, s))
    pred = decode(add_noise(z, eps_hat, a, s))
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return per_sample.mean() if reduce else per_sample


def _bc(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample scalars shaped (B,) -> (B, 1, 1, 1) in ``like``'s dtype and device."""
    v = torch.as_tensor(v, device=like.device)
    return v.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

