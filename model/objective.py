"""The training objective: the noise schedule, one step's loss (latent + pixel-space), and the seeded
generators every random draw comes from. model/train.py runs it; model/diffusion.py holds the math."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, EDMEulerScheduler

from model import diffusion as D
from model.bases import unet_conditioning
from model.config import Config, ConfigError, StageConfig


def sampling_scheduler(cfg: Config):
    """The diffusers scheduler that samples what the training math trains (same schedule and targets)."""
    d = cfg.diffusion
    if d.schedule == "edm":
        return EDMEulerScheduler(sigma_min=d.sigma_min, sigma_max=d.sigma_max, sigma_data=d.sigma_data,
                                 prediction_type="epsilon", num_train_timesteps=d.num_train_timesteps)
    zero_snr = d.schedule == "zero_snr"
    return DDIMScheduler(num_train_timesteps=d.num_train_timesteps, beta_start=d.beta_start, beta_end=d.beta_end,
                         beta_schedule="scaled_linear", prediction_type=d.prediction_type, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, rescale_betas_zero_snr=zero_snr,
                         # ZSNR §3.3: sample from the last (pure-noise) step, which "leading" spacing skips
                         timestep_spacing="trailing" if zero_snr else "leading")


def training_alphas_cumprod(cfg: Config) -> torch.Tensor:
    d = cfg.diffusion
    betas = D.scaled_linear_betas(d.num_train_timesteps, d.beta_start, d.beta_end)
    if d.schedule == "zero_snr":
        betas = D.rescale_zero_terminal_snr(betas)
    return D.alphas_cumprod(betas).float()


# --- the loss --------------------------------------------------------------------------------------


@dataclass
class NoiseDraw:
    """One training draw: ε (with offset noise), the signal/noise scales (a, s) of z_t = a z + s ε, and the
    network's time input (a timestep for the DDPM schedules, σ for EDM). Preference tuning gives one draw
    to a winner and its loser (model/preference.py)."""

    eps: torch.Tensor
    a: torch.Tensor
    s: torch.Tensor
    time: torch.Tensor


def draw_noise(shape: tuple[int, ...], cfg: Config, noise_offset: float, generator: torch.Generator,
               alphas_bar: torch.Tensor) -> NoiseDraw:
    """ε, then t (or EDM σ, Karras et al. 2022's log-normal) per sample, on the CPU from ``generator``."""
    d, b = cfg.diffusion, shape[0]
    eps = D.offset_noise(shape, noise_offset, generator)
    if d.schedule == "edm":
        sigma = D.edm_training_sigmas(b, d.p_mean, d.p_std, generator).float()
        return NoiseDraw(eps, torch.ones_like(sigma), sigma, sigma)
    t = torch.randint(0, d.num_train_timesteps, (b,), generator=generator)
    a, s = D.ddpm_scales(alphas_bar.cpu()[t])
    return NoiseDraw(eps, a.float(), s.float(), t)


def predict(unet: torch.nn.Module, z: torch.Tensor, noise: NoiseDraw, cond: dict[str, torch.Tensor],
            cfg: Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(network output, its regression target, predicted noise ε̂) for scaled latents z noised by ``noise``:
    the DDPM ε/v targets, or EDM's preconditioned F target."""
    d = cfg.diffusion
    eps, a, s, time = (v.to(z.device) for v in (noise.eps, noise.a, noise.s, noise.time))
    eps = eps.to(z.dtype)
    z_t = D.add_noise(z, eps, a, s)
    if d.schedule == "edm":
        _, _, c_in, c_noise = D.edm_preconditioning(time, d.sigma_data)
        out = unet(D._bc(c_in, z_t) * z_t, c_noise, **unet_conditioning(cond)).sample
        return out, D.edm_target(z, z_t, time, d.sigma_data), D.edm_predicted_noise(out, z_t, time, d.sigma_data)
    out = unet(z_t, time, **unet_conditioning(cond)).sample
    return (out, D.ddpm_target(d.prediction_type, z, eps, a, s),
            D.ddpm_predicted_noise(d.prediction_type, out, z_t, a, s))


def diffusion_loss(unet: torch.nn.Module, z: torch.Tensor, cond: dict[str, torch.Tensor], cfg: Config, stage: StageConfig,
                   generator: torch.Generator, alphas_bar: torch.Tensor,
                   decode: Callable[[torch.Tensor], torch.Tensor] | None) -> tuple[torch.Tensor, dict[str, float]]:
    """L = w L_latent + λ L_pixel (PS eq. 3; w = ``latent_loss_weight``, 1 but for the pixel-only ablation)
    for scaled latents z and their conditioning ``cond`` (text, and for SDXL pooled text and time_ids).
    ``decode`` maps scaled latents to pixels (needed only when λ > 0). λ must be a number here: a stage
    with ``pixel_loss_weight: auto`` is resolved by model/train.py's calibration first. ``parts`` holds
    the unweighted terms."""
    d = cfg.diffusion
    if stage.pixel_loss_weight == "auto":
        raise ConfigError(f"stage {stage.name}: pixel_loss_weight is 'auto' but was not calibrated; "
                          f"model.train.StageRun measures it (or pass a number)")
    pixel_weight = float(stage.pixel_loss_weight)
    noise = draw_noise(tuple(z.shape), cfg, stage.noise_offset, generator, alphas_bar)
    out, target, eps_hat = predict(unet, z, noise, cond, cfg)
    if d.schedule != "edm" and d.min_snr_gamma:
        ab = alphas_bar.cpu()[noise.time].to(z.device)
        weights = D.min_snr_weights(D.snr_from_alphas_cumprod(ab), d.min_snr_gamma, d.prediction_type)
    else:
        weights = torch.ones(z.shape[0], device=z.device)
    latent = (weights * F.mse_loss(out.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))).mean()
    parts = {"latent": latent.item()}
    loss = stage.latent_loss_weight * latent
    if pixel_weight:
        eps, a, s = (v.to(z.device) for v in (noise.eps, noise.a, noise.s))
        pixel = D.pixel_space_loss(decode, z, eps.to(z.dtype), eps_hat, a, s)
        loss = loss + pixel_weight * pixel
        parts["pixel"] = pixel.item()
    return loss, parts


def balance_pixel_loss(terms: list[dict[str, float]], balance: float) -> dict:
    """λ of PS eq. 3 chosen "to balance the magnitudes" (PS §4, implementation details): λ = balance x
    mean L_latent / mean L_pixel over the measured ``terms`` (diffusion_loss's parts), so that
    λ·L_pixel / L_latent = balance on those batches. Issue 14's review measured the pixel term at ~0.025x
    the latent one with TAEF2 + EDM: a fixed λ = 4 gave it ~10% of the loss, not a balanced share."""
    latent = sum(t["latent"] for t in terms) / len(terms)
    pixel = sum(t["pixel"] for t in terms) / len(terms)
    if not (math.isfinite(latent) and math.isfinite(pixel) and latent > 0 and pixel > 0):
        raise ValueError(f"pixel-loss calibration measured mean latent {latent} and pixel {pixel} over {len(terms)} "
                         f"batches; both must be finite and above 0 to balance them")
    return {"batches": len(terms), "latent": latent, "pixel": pixel, "pixel_to_latent": pixel / latent,
            "balance": balance, "pixel_loss_weight": balance * latent / pixel}


def generator(seed: int, *stream: int) -> torch.Generator:
    """An independent generator per (seed, purpose, draw): any draw can be replayed on its own."""
    return torch.Generator().manual_seed(hash((seed, *stream)) & 0x7FFF_FFFF_FFFF_FFFF)
