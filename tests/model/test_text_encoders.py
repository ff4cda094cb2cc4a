"""The optional T5 text encoder (``text_encoder.kind: t5``): a TINY RANDOMLY-INITIALISED T5 encoder built
from config (no weights offline) trains, exports and samples through the same stock pipeline as CLIP."""

from __future__ import annotations

import torch
from transformers import T5EncoderModel

from model.autoencoder import build_kl_autoencoder
from model.pipeline import load_pipeline
from model.text import encode_prompts, load_text_encoder
from model.bases import Frozen
from model.train import run_stage
from tests.model.conftest import tiny


def test_t5_encoder_conditions_the_unet_and_the_checkpoint_samples(curated_dir, tmp_path):
    cfg = tiny("text_encoder.kind=t5", "text_encoder.max_length=32", "text_encoder.tiny_hidden_size=48",
               "quality_tune.max_steps=2")
    tokenizer, encoder = load_text_encoder(cfg.text_encoder, cfg.seed)
    assert isinstance(encoder, T5EncoderModel) and not any(p.requires_grad for p in encoder.parameters())
    hidden = encode_prompts(tokenizer, encoder, ["a fox", "a much longer prompt about a lighthouse at dusk"])
    assert hidden.shape == (2, 32, 48)  # padded to max_length, the encoder's width

    torch.manual_seed(0)
    frozen = Frozen(tokenizer, encoder, build_kl_autoencoder(cfg.autoencoder).eval().requires_grad_(False))
    result = run_stage(cfg, cfg.quality_tune, curated_dir, tmp_path / "qt", frozen, progress=False)
    assert result.steps == 2 and result.stopped == "max_steps"

    pipe = load_pipeline(result.checkpoint)
    assert isinstance(pipe.text_encoder, T5EncoderModel)
    assert pipe.unet.config.cross_attention_dim == 48
    image = pipe("a red fox", num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
