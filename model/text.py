"""The frozen text encoder: CLIP text or a T5 encoder (transformers) from the user's path/name, or a
TINY RANDOMLY-INITIALISED one of either kind built from config for CPU tests and smoke runs (no weights
are needed or downloaded; its embeddings mean nothing, which is fine for testing the training machinery).
Both give the UNet the encoder's last hidden states, padded to ``max_length`` as the stock pipelines do."""

from __future__ import annotations

import torch
from transformers import (AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, PreTrainedModel,
                          PreTrainedTokenizerBase, T5Config, T5EncoderModel)

from model.config import TextEncoderConfig


def tiny_random_clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A real CLIPTokenizer with a tiny vocabulary written in code: the 256 byte-level characters, each
    also as a word end (``</w>``), plus the two special tokens, and no merges, so text splits into
    characters. It saves and loads with ``save_pretrained``/``from_pretrained`` like any tokenizer."""
    from tokenizers import pre_tokenizers

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_random_clip_text_model(cfg: TextEncoderConfig, vocab_size: int, seed: int = 0) -> CLIPTextModel:
    """CLIPTextModel built from a small CLIPTextConfig with random weights (seeded, so every process that
    builds it gets the same encoder and cached embeddings stay valid)."""
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=cfg.tiny_hidden_size,
                            intermediate_size=cfg.tiny_hidden_size * 2, num_hidden_layers=cfg.tiny_layers,
                            num_attention_heads=cfg.tiny_heads, max_position_embeddings=cfg.max_length,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPTextModel(config)


def tiny_random_t5_encoder(cfg: TextEncoderConfig, vocab_size: int, seed: int = 0) -> T5EncoderModel:
    """T5EncoderModel built from a small T5Config with random weights (seeded like the CLIP one). It is paired
    with the tiny character tokenizer above: a real T5 sentencepiece vocabulary is not needed to exercise
    the encoder's plumbing (width, padding, export and loading)."""
    config = T5Config(vocab_size=vocab_size, d_model=cfg.tiny_hidden_size, d_kv=cfg.tiny_hidden_size // cfg.tiny_heads,
                      d_ff=cfg.tiny_hidden_size * 2, num_layers=cfg.tiny_layers, num_heads=cfg.tiny_heads,
                      pad_token_id=1, eos_token_id=1, decoder_start_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return T5EncoderModel(config)


def load_text_encoder(cfg: TextEncoderConfig, seed: int = 0) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """(tokenizer, frozen text encoder in eval mode)."""
    if cfg.path and cfg.kind == "t5":
        tokenizer = AutoTokenizer.from_pretrained(cfg.path, subfolder=_sub(cfg.path, "tokenizer"),
                                                  model_max_length=cfg.max_length)
        model = T5EncoderModel.from_pretrained(cfg.path, subfolder=_sub(cfg.path, "text_encoder"))
    elif cfg.path:
        tokenizer = CLIPTokenizer.from_pretrained(cfg.path, subfolder=_sub(cfg.path, "tokenizer"))
        model = CLIPTextModel.from_pretrained(cfg.path, subfolder=_sub(cfg.path, "text_encoder"))
    else:
        tokenizer = tiny_random_clip_tokenizer(cfg.max_length)
        build = tiny_random_t5_encoder if cfg.kind == "t5" else tiny_random_clip_text_model
        model = build(cfg, len(tokenizer), seed)
    model.requires_grad_(False)
    return tokenizer, model.eval()


def _sub(path: str, name: str) -> str | None:
    """A diffusers pipeline directory keeps tokenizer/ and text_encoder/ in subfolders; a plain CLIP
    checkpoint (``openai/clip-vit-large-patch14``) does not."""
    from pathlib import Path

    return name if (Path(path) / name).is_dir() else None


@torch.no_grad()
def encode_prompts(tokenizer: PreTrainedTokenizerBase, text_encoder: PreTrainedModel, prompts: list[str]) -> torch.Tensor:
    """Last hidden states (B, max_length, width): what UNet2DConditionModel cross-attends to, padded to
    the full length exactly as the stock pipelines do at sampling time."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]
