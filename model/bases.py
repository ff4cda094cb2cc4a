"""What a stage starts from and does not train: the frozen models (tokenizers, text encoders, autoencoder)
and the UNet's starting weights, for three families of base.

    needles   a folder this repo wrote (needles_config.yaml beside model_index.json), or none (pre-training):
              the config's own text encoder and autoencoder, one text encoder, UNet2DConditionModel
    sd        a diffusers StableDiffusionPipeline folder of the SD 1.x / 2.x family: its VAE, CLIP tokenizer
              and text encoder, UNet and scheduler (epsilon or v-prediction; the training schedule is
              taken from its scheduler config)
    sdxl      a StableDiffusionXLPipeline folder: two text encoders (penultimate hidden states concatenated,
              the second's pooled projection as ``text_embeds``) and the size/crop micro-conditioning
              ``time_ids`` = (original h, w, crop top, left, target h, w) of each image (SDXL §2.2)

A base is a local folder or a Hugging Face hub id. Nothing downloads during a run: a hub id is read from
the hub cache under $NEEDLES_WEIGHTS_DIR/huggingface, where ``python -m model weights --base ID`` (on a
machine with network) staged it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from model.autoencoder import (ChannelMismatchError, downsample_factor, latent_channels, load_autoencoder,
                               load_pretrained_autoencoder)
from model.config import Config
from model.text import load_text_encoder
from pipeline.errors import UserError

log = logging.getLogger(__name__)

#: model_index.json's pipeline class -> family
FAMILIES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}
NEEDLES_MARKER = "needles_config.yaml"


class BaseError(UserError, ValueError):
    """A base that cannot be used: unsupported family, not staged, or not matching the config."""


@dataclass
class Frozen:
    """What a stage does not train. ``family`` says how the text conditions the UNet (see the module)."""

    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    family: str = "needles"
    tokenizer_2: object | None = None
    text_encoder_2: torch.nn.Module | None = None
    scheduler_config: dict | None = None  # the base's own (sd, sdxl); None = the config's schedule
    source: str | None = None  # the public base's folder (what the latent cache is keyed on)

    def to(self, device) -> "Frozen":
        for model in (self.text_encoder, self.text_encoder_2, self.vae):
            if model is not None:
                model.to(device)
        return self


def load_frozen(cfg: Config, autoencoder_dir: Path | None) -> Frozen:
    """The config's own text encoder and autoencoder (the ``needles`` family)."""
    tokenizer, text_encoder = load_text_encoder(cfg.text_encoder, cfg.seed)
    return Frozen(tokenizer, text_encoder, load_autoencoder(cfg.autoencoder, autoencoder_dir))


# --- public bases ---------------------------------------------------------------------------------


def resolve_base(base: str | Path) -> Path:
    """A local pipeline folder, or the staged snapshot of a hub id (never downloaded here)."""
    path = Path(base).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise BaseError(f"base {path} is not a diffusers pipeline folder (no model_index.json)")
        return path
    if "/" not in str(base) or str(base).startswith((".", "/", "~")):
        raise BaseError(f"base {base} does not exist (a pipeline folder, or a hub id such as "
                        f"stabilityai/stable-diffusion-xl-base-1.0 staged by `python -m model weights --base ID`)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(base), cache_dir=hub_cache(), local_files_only=True))
    except LocalEntryNotFoundError as error:
        raise BaseError(f"base {base} is not staged under {hub_cache()}: run `python -m model weights --base {base}` "
                        f"where there is network and copy $NEEDLES_WEIGHTS_DIR over") from error


def stage_base(base: str) -> Path:
    """Download a hub base's pipeline files (fp32 safetensors and configs) into the hub cache."""
    from huggingface_hub import snapshot_download

    from pipeline.weights import offline

    if offline():
        return resolve_base(base)
    return Path(snapshot_download(base, cache_dir=hub_cache(), allow_patterns=[
        "model_index.json", "*/config.json", "*.txt", "*/*.json", "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors", "text_encoder*/model.safetensors"]))


def hub_cache() -> Path:
    from pipeline.weights import weights_dir

    return weights_dir() / "huggingface"


def base_family(path: Path) -> str:
    """needles | sd | sdxl, from model_index.json; anything else is a BaseError naming what is supported."""
    if (path / NEEDLES_MARKER).is_file():
        return "needles"
    name = json.loads((path / "model_index.json").read_text()).get("_class_name")
    if name not in FAMILIES:
        raise BaseError(f"base {path} is a {name}; supported families: {', '.join(sorted(FAMILIES))} "
                        f"(SD 1.x/2.x, SDXL) and needles' own checkpoints")
    return FAMILIES[name]


def load_base_frozen(path: Path, family: str) -> Frozen:
    """The frozen models of an ``sd`` or ``sdxl`` base, in eval mode without gradients."""
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    vae = load_pretrained_autoencoder(str(path), "vae")
    tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    extra = {}
    if family == "sdxl":
        extra = {"tokenizer_2": AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2"),
                 "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2")}
    scheduler = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    frozen = Frozen(tokenizer, text_encoder, vae, family=family, scheduler_config=scheduler,
                    source=str(path.resolve()), **extra)
    for model in (frozen.text_encoder, frozen.text_encoder_2, frozen.vae):
        if model is not None:
            model.requires_grad_(False).eval()
    return frozen


def native_resolution(path: Path) -> int:
    """The image side a base was trained at: its UNet's sample_size x its autoencoder's downsampling."""
    unet = json.loads((path / "unet" / "config.json").read_text())
    vae = json.loads((path / "vae" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def base_diffusion(cfg: Config, frozen: Frozen) -> Config:
    """``cfg`` with the diffusion schedule of the base it fine-tunes: its betas, steps and prediction type
    (what its UNet learned). EDM cannot be fine-tuned into a DDPM-trained base."""
    if frozen.scheduler_config is None:
        return cfg
    s = frozen.scheduler_config
    if cfg.diffusion.schedule == "edm":
        raise BaseError("diffusion.schedule=edm cannot fine-tune an SD/SDXL base (trained on a DDPM schedule); "
                        "use scaled_linear, or zero_snr with a v-prediction base")
    if s.get("beta_schedule", "scaled_linear") != "scaled_linear":
        raise BaseError(f"the base's beta_schedule {s.get('beta_schedule')!r} is not supported (scaled_linear)")
    update = {"prediction_type": s.get("prediction_type", "epsilon"), "beta_start": s.get("beta_start", 0.00085),
              "beta_end": s.get("beta_end", 0.012), "num_train_timesteps": s.get("num_train_timesteps", 1000)}
    if s.get("rescale_betas_zero_snr"):
        update["schedule"] = "zero_snr"
    diffusion = cfg.diffusion.model_copy(update=update)
    if diffusion.schedule == "zero_snr" and diffusion.prediction_type != "v_prediction":
        raise BaseError("diffusion.schedule=zero_snr needs a v-prediction base (SD 2.x-v); this base predicts "
                        f"{diffusion.prediction_type}")
    return cfg.model_copy(update={"diffusion": diffusion})


# --- the UNet --------------------------------------------------------------------------------------


def build_unet(cfg: Config, frozen: Frozen, resolution: int) -> UNet2DConditionModel:
    torch.manual_seed(cfg.seed)
    c = latent_channels(frozen.vae)
    u = cfg.unet
    return UNet2DConditionModel(
        sample_size=resolution // downsample_factor(frozen.vae), in_channels=c, out_channels=c,
        block_out_channels=tuple(u.block_out_channels), layers_per_block=u.layers_per_block,
        down_block_types=tuple(u.down_block_types), up_block_types=tuple(u.up_block_types),
        cross_attention_dim=frozen.text_encoder.config.hidden_size, attention_head_dim=u.attention_head_dim,
        norm_num_groups=u.norm_num_groups)


def load_base_unet(base: Path, frozen: Frozen) -> UNet2DConditionModel:
    """The UNet of a base pipeline; its latent channels must match the autoencoder's."""
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    if unet.config.in_channels != latent_channels(frozen.vae):
        raise ChannelMismatchError(
            f"base checkpoint {base} has a UNet for {unet.config.in_channels}-channel latents but the configured "
            f"autoencoder makes {latent_channels(frozen.vae)}-channel latents; use the autoencoder it was trained "
            f"with, or pretrain a new base")
    return unet


# --- text conditioning -------------------------------------------------------------------------------


@torch.no_grad()
def encode_text(frozen: Frozen, prompts: list[str]) -> dict[str, torch.Tensor]:
    """{"text": (B, L, D)} and, for sdxl, {"pooled": (B, P)}: exactly what the stock pipelines feed the
    UNet at sampling time (StableDiffusionPipeline / StableDiffusionXLPipeline.encode_prompt; a test
    checks both against them)."""
    if frozen.family != "sdxl":
        from model.text import encode_prompts

        return {"text": encode_prompts(frozen.tokenizer, frozen.text_encoder, prompts)}
    hidden, pooled = [], None
    for tokenizer, encoder in ((frozen.tokenizer, frozen.text_encoder), (frozen.tokenizer_2, frozen.text_encoder_2)):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(encoder.device)
        out = encoder(ids, output_hidden_states=True)
        pooled = out[0]  # the last encoder's: CLIPTextModelWithProjection's text_embeds
        hidden.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer
    return {"text": torch.cat(hidden, dim=-1), "pooled": pooled}


def unet_conditioning(cond: dict[str, torch.Tensor]) -> dict:
    """The UNet's keyword arguments for a batch's conditioning (cached text, pooled text, time_ids)."""
    kwargs = {"encoder_hidden_states": cond["text"]}
    if "pooled" in cond:
        kwargs["added_cond_kwargs"] = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}
    return kwargs
