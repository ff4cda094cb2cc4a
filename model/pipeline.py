"""Loading a checkpoint of this stage for sampling.

Every checkpoint folder (``best/``, ``final/``) is a stock ``StableDiffusionPipeline``: UNet2DConditionModel,
CLIP text encoder and tokenizer, DDIMScheduler (or EDMEulerScheduler for the EDM schedule, whose
preconditioning matches diffusers' exactly), and the autoencoder. When the autoencoder is a stock diffusers
class (AutoencoderKL, AutoencoderTiny) plain ``StableDiffusionPipeline.from_pretrained(path)`` loads it.
When it is one of this repo's two extensions (``AutoencoderTinyMidBlockGN`` for TAEF2's 32-channel
latents, ``FourierAutoencoderKL``), diffusers cannot import the class from the folder by itself, so pass
it in::

    from model.pipeline import load_pipeline
    pipe = load_pipeline("OUT/quality_tune/best")        # = StableDiffusionPipeline.from_pretrained(
    image = pipe("a red fox in the snow").images[0]      #     path, vae=load_pretrained_autoencoder(path, "vae"))
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from model.autoencoder import load_pretrained_autoencoder


def load_pipeline(path: str | Path, torch_dtype: torch.dtype | None = None) -> StableDiffusionPipeline:
    vae = load_pretrained_autoencoder(str(path), "vae")
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype else {}
    if torch_dtype:
        vae = vae.to(torch_dtype)
    pipe = StableDiffusionPipeline.from_pretrained(path, vae=vae, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe
