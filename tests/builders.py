"""Small tables built in code for tests: ingest shards with real JPEG thumbnails, no pipeline needed."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline import schema
from pipeline.layout import RunLayout, shard_name


def jpeg(array: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def random_photo(rng: np.random.Generator, width: int = 96, height: int = 64) -> bytes:
    """A smooth random image (low-frequency noise upsampled): hashes and sharpness differ per seed."""
    small = rng.integers(0, 255, size=(max(height // 8, 2), max(width // 8, 2), 3), dtype=np.uint8)
    return jpeg(np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC)))


def ingest_rows(n: int, seed: int = 0, source: str = "test") -> pa.Table:
    rng = np.random.default_rng(seed)
    images = [random_photo(rng, int(rng.integers(64, 160)), int(rng.integers(48, 120))) for _ in range(n)]
    sizes = [Image.open(io.BytesIO(b)).size for b in images]
    return pa.Table.from_pylist(
        [
            {
                schema.ID: hashlib.sha256(b).hexdigest(),
                schema.IMAGE: b,
                schema.IMAGE_PATH: None,
                schema.CAPTION: f"test image {i}",
                schema.WIDTH: w,
                schema.HEIGHT: h,
                schema.FORMAT: "JPEG",
                schema.THUMBNAIL: b,
                schema.SOURCE: source,
                schema.SOURCE_KEY: str(i),
                schema.ENGAGEMENT: None,
                schema.META: None,
            }
            for i, (b, (w, h)) in enumerate(zip(images, sizes))
        ],
        schema=schema.INGEST_SCHEMA,
    )


def write_ingest_run(run_dir: Path, n: int, shard_rows: int, seed: int = 0, row_group_rows: int | None = None) -> RunLayout:
    layout = RunLayout(run_dir)
    layout.ingest.mkdir(parents=True, exist_ok=True)
    table = ingest_rows(n, seed)
    for index, start in enumerate(range(0, n, shard_rows)):
        pq.write_table(table.slice(start, shard_rows), layout.ingest / shard_name(index), row_group_size=row_group_rows)
    return layout


def tiny_random_clip(folder: Path, embed_dim: int = 32) -> dict:
    """The clip scorer's options for "tiny-random-clip-<embed_dim>": a 2-layer open_clip ViT built from a config
    written here, with RANDOM weights (seed 0) saved as a checkpoint file and loaded through the same
    ``checkpoint:`` path a user's fine-tuned CLIP takes. No CLIP weights exist offline; its scores are
    meaningless, the tests check plumbing. ``embed_dim=768`` gives embeddings the real LAION aesthetic head
    (made for ViT-L/14) can read."""
    import json

    import open_clip
    import torch

    name = f"tiny-random-clip-{embed_dim}"
    if name not in open_clip.list_models():
        config = folder / f"{name}.json"
        config.write_text(json.dumps({
            "embed_dim": embed_dim,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
        }))
        open_clip.add_model_config(config)
    torch.manual_seed(0)
    checkpoint = folder / f"{name}.pt"
    torch.save(open_clip.create_model(name, pretrained=None).state_dict(), checkpoint)
    return {"model": name, "pretrained": None, "checkpoint": str(checkpoint), "device": "cpu"}


def tiny_random_sd_pipeline(folder: Path, family: str = "sd15", seed: int = 0) -> Path:
    """A TINY RANDOMLY-INITIALISED public-base pipeline folder built from config, saved as diffusers saves
    the real ones: ``sd15`` / ``sd2-v`` (StableDiffusionPipeline; sd2-v predicts v) or ``sdxl``
    (StableDiffusionXLPipeline: two CLIP text encoders, the second with a projection, text_time added
    embeddings). Shapes follow diffusers' own test fixtures; the weights mean nothing."""
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from model.text import tiny_random_clip_tokenizer

    torch.manual_seed(seed)
    sdxl = family == "sdxl"
    tokenizer = tiny_random_clip_tokenizer(77)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                projection_dim=32)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=32, sample_size=64, scaling_factor=0.13025 if sdxl else 0.18215)
    unet_kwargs = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=32)
    if sdxl:
        unet = UNet2DConditionModel(**unet_kwargs, cross_attention_dim=64, attention_head_dim=(2, 4),
                                    use_linear_projection=True, addition_embed_type="text_time",
                                    addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                                    projection_class_embeddings_input_dim=6 * 8 + 32)
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           steps_offset=1, timestep_spacing="leading")
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**text)),
                                         text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text)),
                                         tokenizer=tokenizer, tokenizer_2=tiny_random_clip_tokenizer(77), unet=unet,
                                         scheduler=scheduler)
    else:
        unet = UNet2DConditionModel(**unet_kwargs, cross_attention_dim=32, attention_head_dim=8)
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                  set_alpha_to_one=False, steps_offset=1,
                                  prediction_type="v_prediction" if family == "sd2-v" else "epsilon")
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**text)), tokenizer=tokenizer,
                                       unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return Path(folder)
