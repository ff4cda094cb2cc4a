"""Preference tuning's objective (pixel-space post-training §3.2, eqs. 4-7): Diffusion-DPO with a frozen
reference UNet, SimPO without one, each with an optional pixel-space term. Pure functions, next to the
supervised objective (model/objective.py), on the same diffusion math (model/diffusion.py).

For a pair of latents z^w (winner) and z^l (loser) of one prompt, both are noised with the SAME timestep (or
EDM σ) and the SAME noise ε (Wallace et al. 2024 §4: the comparison must differ only by the image), and the
per-sample error of a network is the mean over elements of its squared regression error,

    e(z) = mean ‖target - F(z_t, t)‖²     (the schedule's own target: ε, v, or EDM's F target)

    DPO   (PS eq. 4):  L = -log σ(-β [(e_θ(z^w) - e_ref(z^w)) - (e_θ(z^l) - e_ref(z^l))])
    SimPO (PS eq. 5):  L = -log σ(-β [e_θ(z^w) - e_θ(z^l)] - γ)           (Meng et al. 2024; γ the margin)

The pixel variants (PS eq. 6) measure e in pixel space through the frozen decoder, with PS eq. 2's
``diffusion.pixel_space_loss`` (the noisy latent decoded with the true ε and with the predicted ε̂), and
the total is L = L_latent + μ L_pixel (PS eq. 7).

Scale: the errors are means over ~10⁴-10⁵ elements, so per-sample differences are ~1e-3 to 1e-2 and β must
be of order 1/|δ| for σ to see them (Diffusion-DPO uses β = 5000 on SD 1.5's latents). ``calibrated_beta``
picks β so that |β δ| ≈ 1 on the first batch, δ being the winner-loser error difference (for DPO the
policy-minus-reference difference is 0 at the start, so the winner-loser difference, the scale it grows
towards, sets β there too).

The implicit reward margin of a pair is the sigmoid's argument before the SimPO margin: r = -β δ; the
model prefers the winner (preference accuracy) where r > 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from model import diffusion as D
from model.config import Config
from model.objective import NoiseDraw, predict

Objective = Literal["dpo", "simpo"]


# --- the losses on per-sample errors ----------------------------------------------------------------


def per_sample_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """e = mean over every element but the batch of (prediction - target)², in float32 (shape (B,))."""
    return F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(dim=1)


def dpo_loss(err_w: torch.Tensor, err_l: torch.Tensor, ref_err_w: torch.Tensor, ref_err_l: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PS eq. 4 (Diffusion-DPO): mean over pairs of -log σ(-β [(e_θ^w - e_ref^w) - (e_θ^l - e_ref^l)]),
    and each pair's implicit reward margin -β δ. The reference errors carry no gradient."""
    delta = (err_w - ref_err_w.detach()) - (err_l - ref_err_l.detach())
    margin = -beta * delta
    return -F.logsigmoid(margin).mean(), margin


def simpo_loss(err_w: torch.Tensor, err_l: torch.Tensor, beta: float,
               gamma: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """PS eq. 5 (SimPO, no reference): mean over pairs of -log σ(-β (e_θ^w - e_θ^l) - γ), and each pair's
    reward margin -β (e_θ^w - e_θ^l). Meng et al.'s length normalisation is the mean over elements of e."""
    margin = -beta * (err_w - err_l)
    return -F.logsigmoid(margin - gamma).mean(), margin


def pair_loss(objective: Objective, errors: dict[str, torch.Tensor], beta: float,
              gamma: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 4 or 5 on ``errors`` = {"w", "l"} (and {"ref_w", "ref_l"} for DPO)."""
    if objective == "dpo":
        return dpo_loss(errors["w"], errors["l"], errors["ref_w"], errors["ref_l"], beta)
    if objective == "simpo":
        return simpo_loss(errors["w"], errors["l"], beta, gamma)
    raise ValueError(f"unknown preference objective {objective!r} (dpo | simpo)")


def preference_total(latent: torch.Tensor, pixel: torch.Tensor | None, mu: float) -> torch.Tensor:
    """PS eq. 7: L = L_latent + μ L_pixel (the latent term alone when μ = 0 or there is no pixel term)."""
    return latent if pixel is None or not mu else latent + mu * pixel


def calibrated_beta(err_w: torch.Tensor, err_l: torch.Tensor, target: float = 1.0) -> float:
    """β such that the median |β (e^w - e^l)| of a batch is ``target`` (≈ 1: the sigmoid's responsive range)."""
    scale = (err_w.detach() - err_l.detach()).abs().median().item()
    if not scale > 0:
        raise ValueError("cannot calibrate β: every pair has identical winner and loser errors (identical images?)")
    return target / scale


# --- one step's errors -------------------------------------------------------------------------------


def pair_errors(unet: torch.nn.Module, z_w: torch.Tensor, z_l: torch.Tensor, noise: NoiseDraw,
                cond: dict[str, torch.Tensor], cfg: Config,
                decode: Callable[[torch.Tensor], torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Per-sample latent errors of winner and loser ({"w", "l"}), and with ``decode`` their pixel-space
    errors (PS eq. 6, {"pixel_w", "pixel_l"}). Winner and loser go through the network as one batch of
    2B, with the noise repeated: the same t and ε for both. A ``cond`` entry of B rows (the prompt's
    embeddings) serves both; one of 2B rows (SDXL's time_ids: each image's own size and crop) is the
    winners' rows, then the losers'."""
    b = z_w.shape[0]
    both = NoiseDraw(*(torch.cat([v, v]) for v in (noise.eps, noise.a, noise.s, noise.time)))
    z = torch.cat([z_w, z_l])
    for key, value in cond.items():
        if value.shape[0] not in (b, 2 * b):
            raise ValueError(f"cond[{key!r}] has {value.shape[0]} rows for {b} pairs: give {b} (shared) or {2 * b} "
                             f"(winners, then losers)")
    out, target, eps_hat = predict(unet, z, both, {k: v if v.shape[0] == 2 * b else torch.cat([v, v])
                                                   for k, v in cond.items()}, cfg)
    err = per_sample_error(out, target)
    errors = {"w": err[:b], "l": err[b:]}
    if decode is not None:
        eps, a, s = (v.to(z.device) for v in (both.eps, both.a, both.s))
        pixel = D.pixel_space_loss(decode, z, eps.to(z.dtype), eps_hat, a, s, reduce=False)
        errors |= {"pixel_w": pixel[:b], "pixel_l": pixel[b:]}
    return errors


@dataclass
class PreferenceStep:
    """One step's total loss (PS eq. 7), its parts, and the per-pair reward margins of each term."""

    loss: torch.Tensor
    parts: dict[str, float]
    margin: torch.Tensor  # latent term's -β δ per pair
    pixel_margin: torch.Tensor | None


def preference_loss(unet: torch.nn.Module, reference: torch.nn.Module | None, z_w: torch.Tensor,
                    z_l: torch.Tensor, cond: dict[str, torch.Tensor], cfg: Config, objective: Objective,
                    beta: float, pixel_beta: float, mu: float, gamma: float, noise: NoiseDraw,
                    decode: Callable[[torch.Tensor], torch.Tensor] | None) -> PreferenceStep:
    """L = L_latent + μ L_pixel (PS eq. 7) with L_* the DPO (eq. 4; ``reference`` the frozen UNet) or
    SimPO (eq. 5) loss on latent and pixel-space (eq. 6) errors. ``decode`` maps scaled latents to pixels
    and is needed only when μ > 0."""
    if objective == "dpo" and reference is None:
        raise ValueError("DPO needs the frozen reference UNet")
    decode = decode if mu else None
    errors = pair_errors(unet, z_w, z_l, noise, cond, cfg, decode)
    if objective == "dpo":
        with torch.no_grad():
            ref = pair_errors(reference, z_w, z_l, noise, cond, cfg, decode)
        errors |= {f"ref_{k}": v for k, v in ref.items()}
    latent, margin = pair_loss(objective, errors, beta, gamma)
    parts = {"latent": latent.item(), "err_w": errors["w"].mean().item(), "err_l": errors["l"].mean().item()}
    pixel = pixel_margin = None
    if decode is not None:
        pix = {k.replace("pixel_", ""): v for k, v in errors.items() if "pixel_" in k}
        pixel, pixel_margin = pair_loss(objective, pix, pixel_beta, gamma)
        parts["pixel"] = pixel.item()
    return PreferenceStep(preference_total(latent, pixel, mu), parts, margin.detach(),
                          None if pixel_margin is None else pixel_margin.detach())
