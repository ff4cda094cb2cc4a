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

A fine-tuned SDXL base is a StableDiffusionXLPipeline folder. A LoRA run's folder holds only the adapter
(``pytorch_lora_weights.safetensors``) and ``needles_lora.json`` naming its base: ``load_pipeline`` loads
the base and then ``pipe.load_lora_weights(folder)``, as one would by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from model.autoencoder import load_pretrained_autoencoder


def load_pipeline(path: str | Path, torch_dtype: torch.dtype | None = None):
    """The stock pipeline of a checkpoint folder (StableDiffusionPipeline or StableDiffusionXLPipeline),
    with the LoRA adapter applied when ``path`` is a LoRA folder."""
    from model.lora import lora_base

    base = lora_base(Path(path))
    if base is not None:
        pipe = load_pipeline(base, torch_dtype)
        pipe.load_lora_weights(str(path))
        return pipe
    if not (Path(path) / "model_index.json").is_file():
        from model.checkpoints import CheckpointError

        raise CheckpointError(f"{path} is not a checkpoint to sample from: no model_index.json (a diffusers pipeline "
                              f"folder such as OUT/quality_tune/best) and no LoRA folder")
    vae = load_pretrained_autoencoder(str(path), "vae")
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype else {}
    if torch_dtype:
        vae = vae.to(torch_dtype)
    pipe = pipeline_class(path).from_pretrained(path, vae=vae, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_class(path: str | Path):
    name = json.loads((Path(path) / "model_index.json").read_text()).get("_class_name")
    return StableDiffusionXLPipeline if name == "StableDiffusionXLPipeline" else StableDiffusionPipeline


def weights_folder(path: str | Path) -> Path:
    """The folder holding a checkpoint's unet/ and vae/ configs: its base's for a LoRA folder."""
    from model.lora import lora_base

    return lora_base(Path(path)) or Path(path)


#: guidance rescale of a zero-terminal-SNR schedule: without it such models over-expose under classifier-free
#: guidance (Lin et al. 2024, §3.4; 0.7 as the paper)
ZERO_SNR_GUIDANCE_RESCALE = 0.7


def guidance_rescale(pipe) -> float:
    """The ``guidance_rescale`` to sample ``pipe`` with: 0.7 when its scheduler is rescaled to zero terminal
    SNR, else 0 (training's sample grids, the evaluation's generations and `sample` all use this)."""
    return ZERO_SNR_GUIDANCE_RESCALE if pipe.scheduler.config.get("rescale_betas_zero_snr") else 0.0
