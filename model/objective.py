"""The training objective: the noise schedule, one step's loss (latent + pixel-space), and the seeded
generators every random draw comes from. model/train.py runs it; model/diffusion.py holds the math."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, EDMEulerScheduler

from model import diffusion as D
from model.bases import unet_conditioning
from model.config import Config, StageConfig


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


def diffusion_loss(unet: torch.nn.Module, z: torch.Tensor, cond: dict[str, torch.Tensor], cfg: Config, stage: StageConfig,
                   generator: torch.Generator, alphas_bar: torch.Tensor,
                   decode: Callable[[torch.Tensor], torch.Tensor] | None) -> tuple[torch.Tensor, dict[str, float]]:
    """L = L_latent + λ L_pixel (PS eq. 3) for scaled latents z and their conditioning ``cond`` (text, and
    for SDXL pooled text and time_ids). ``decode`` maps scaled latents to pixels (needed only when λ > 0)."""
    d = cfg.diffusion
    b = z.shape[0]
    eps = D.offset_noise(tuple(z.shape), stage.noise_offset, generator).to(z.device, z.dtype)
    if d.schedule == "edm":
        sigma = D.edm_training_sigmas(b, d.p_mean, d.p_std, generator).to(z.device, torch.float32)
        a, s = torch.ones_like(sigma), sigma
        z_t = D.add_noise(z, eps, a, s)
        _, _, c_in, c_noise = D.edm_preconditioning(sigma, d.sigma_data)
        out = unet(D._bc(c_in, z_t) * z_t, c_noise, **unet_conditioning(cond)).sample
        target = D.edm_target(z, z_t, sigma, d.sigma_data)
        weights = torch.ones(b, device=z.device)
        eps_hat = D.edm_predicted_noise(out, z_t, sigma, d.sigma_data) if stage.pixel_loss_weight else None
    else:
        t = torch.randint(0, d.num_train_timesteps, (b,), generator=generator).to(z.device)
        ab = alphas_bar.to(z.device)[t]
        a, s = D.ddpm_scales(ab)
        z_t = D.add_noise(z, eps, a, s)
        out = unet(z_t, t, **unet_conditioning(cond)).sample
        target = D.ddpm_target(d.prediction_type, z, eps, a, s)
        weights = (D.min_snr_weights(D.snr_from_alphas_cumprod(ab), d.min_snr_gamma, d.prediction_type)
                   if d.min_snr_gamma else torch.ones(b, device=z.device))
        eps_hat = D.ddpm_predicted_noise(d.prediction_type, out, z_t, a, s) if stage.pixel_loss_weight else None
    latent = (weights * F.mse_loss(out.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))).mean()
    parts = {"latent": latent.item()}
    loss = latent
    if stage.pixel_loss_weight:
        pixel = D.pixel_space_loss(decode, z, eps, eps_hat, a, s)
        loss = loss + stage.pixel_loss_weight * pixel
        parts["pixel"] = pixel.item()
    return loss, parts


def generator(seed: int, *stream: int) -> torch.Generator:
    """An independent generator per (seed, purpose, draw): any draw can be replayed on its own."""
    return torch.Generator().manual_seed(hash((seed, *stream)) & 0x7FFF_FFFF_FFFF_FFFF)
