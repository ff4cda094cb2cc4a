"""What leaves a stage: the stock diffusers pipeline around the trained UNet, exported as a folder, and
the images it samples during training (grids of the fixed prompts, the sample score's selection)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from model.bases import NEEDLES_MARKER, Frozen
from model.config import Config
from model.pipeline import guidance_rescale
from model.objective import sampling_scheduler


def stock_pipeline(unet, frozen: Frozen, cfg: Config, scaling_factor: float):
    """The stock diffusers pipeline around ``unet`` and the frozen models (what is saved and sampled):
    StableDiffusionXLPipeline for an SDXL base, StableDiffusionPipeline otherwise."""
    frozen.vae.register_to_config(scaling_factor=scaling_factor)
    if frozen.family == "sdxl":
        # the SDXL base samples its unconditional branch from zero embeddings; training's caption dropout
        # uses the same zeros (model/train.py: prepare_cache)
        return StableDiffusionXLPipeline(vae=frozen.vae, text_encoder=frozen.text_encoder, text_encoder_2=frozen.text_encoder_2,
                                         tokenizer=frozen.tokenizer, tokenizer_2=frozen.tokenizer_2, unet=unet,
                                         scheduler=sampling_scheduler(cfg), force_zeros_for_empty_prompt=True)
    return StableDiffusionPipeline(vae=frozen.vae, text_encoder=frozen.text_encoder, tokenizer=frozen.tokenizer,
                                   unet=unet, scheduler=sampling_scheduler(cfg), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def export_pipeline(out: Path, unet, frozen: Frozen, cfg: Config, scaling_factor: float) -> Path:
    """A pipeline folder (StableDiffusionPipeline, or StableDiffusionXLPipeline for SDXL) that the stock
    ``from_pretrained`` loads (``model.pipeline.load_pipeline(out)`` for this repo's own autoencoders)."""
    pipe = stock_pipeline(unet, frozen, cfg, scaling_factor)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    # model_index.json names the stock diffusers parent class (AutoencoderKL / AutoencoderTiny) so that
    # from_pretrained accepts the subclass load_pipeline passes in; vae/config.json keeps the real class
    index = json.loads((tmp / "model_index.json").read_text())
    index["vae"] = ["diffusers", next(c.__name__ for c in type(frozen.vae).__mro__ if c.__module__.startswith("diffusers"))]
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    # needles' own models are marked as such (model.bases.base_family); a fine-tuned public base stays of
    # its family and keeps the config it was tuned with beside it
    cfg.save(tmp / (NEEDLES_MARKER if frozen.family == "needles" else "needles_finetune.yaml"))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def config_hash(config_file: Path) -> str:
    """16 hex of the sha256 of the training config as canonical JSON (key order and YAML layout aside)."""
    import yaml

    data = yaml.safe_load(Path(config_file).read_text())
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_lineage(folder: Path, data_dir: Path, config_file: Path) -> Path:
    """Record in a checkpoint folder the curated set it was tuned on (path and id) and the config (path
    and hash); ``python -m annotation lineage FOLDER`` follows it back to the votes and the sources."""
    from annotation.lineage import LINEAGE_FILE, curated_set_id

    data_dir = Path(data_dir).resolve()
    record = {"curated_set": str(data_dir), "curated_set_id": curated_set_id(data_dir),
              "config": str(Path(config_file).resolve()), "config_hash": config_hash(config_file)}
    path = Path(folder) / LINEAGE_FILE
    path.write_text(json.dumps(record, indent=1))
    return path


@torch.no_grad()
def sample_grid(unet, frozen: Frozen, cfg: Config, scaling_factor: float, height: int, width: int,
                prompts: list[str] | None = None, steps: int | None = None, seed: int | None = None):
    """Images of the fixed prompts (or ``prompts``), seeded with sample.seed (or ``seed``), as PIL images."""
    pipe = stock_pipeline(unet, frozen, cfg, scaling_factor)
    pipe.set_progress_bar_config(disable=True)
    prompts = prompts or cfg.sample.prompts
    gen = torch.Generator().manual_seed(cfg.sample.seed if seed is None else seed)
    return pipe(prompts, height=height, width=width, num_inference_steps=steps or cfg.sample.num_inference_steps,
                guidance_scale=cfg.sample.guidance_scale, generator=gen, guidance_rescale=guidance_rescale(pipe)).images


def score_selection(unet, frozen: Frozen, cfg: Config, scaling_factor: float, height: int, width: int,
                    scorer) -> dict[str, float]:
    """``scorer`` (a PipelineSampleScorer) on images of its selection prompts x its seeds. Each batch of
    prompts has its own seed, fixed by (seed, batch start): every evaluation starts from the same noise,
    so scores differ between steps only by what the weights do."""
    images, prompts = [], []
    size = scorer.cfg.batch_size
    for seed in scorer.seeds:
        for start in range(0, len(scorer.prompts), size):
            batch = scorer.prompts[start:start + size]
            images += sample_grid(unet, frozen, cfg, scaling_factor, height, width, prompts=batch,
                                  seed=seed * 1_000_003 + start)
            prompts += batch
    return scorer(images, prompts)
