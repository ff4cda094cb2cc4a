"""LoRA on the UNet through peft, as diffusers' own LoRA training scripts do it (``unet.add_adapter`` with a
``peft.LoraConfig``; saved with the pipeline's ``save_lora_weights`` so that ``pipe.load_lora_weights``
loads it). Only the adapter trains; the base's weights stay frozen and are not copied."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model.config import ConfigError, LoraConfig

#: written beside the LoRA weights: which base they adapt (model.pipeline.load_pipeline reads it)
LORA_MARKER = "needles_lora.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def attach_lora(unet: torch.nn.Module, cfg: LoraConfig) -> None:
    """Freeze ``unet`` and add a trainable LoRA adapter on ``cfg.target_modules``. A target that names no
    module of this UNet is an error listing the attention projections it does have."""
    from peft import LoraConfig as PeftLoraConfig

    names = [name for name, _ in unet.named_modules()]
    missing = [t for t in cfg.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] if not n.endswith("out.0") else "to_out.0" for n in names
                         if n.endswith(("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2"))})
        raise ConfigError(f"quality_tune.lora.target_modules: {missing} match no module of this UNet "
                         f"(e.g. {leaves})")
    unet.requires_grad_(False)
    unet.add_adapter(PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha or cfg.rank, lora_dropout=cfg.dropout,
                                    init_lora_weights="gaussian", target_modules=list(cfg.target_modules)))


def adapter_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights in peft's naming (for the training checkpoint)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def load_adapter_state(unet: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    from peft.utils import set_peft_model_state_dict

    from model.checkpoints import CheckpointError

    result = set_peft_model_state_dict(unet, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise CheckpointError(f"the checkpoint's LoRA weights do not fit this adapter (was quality_tune.lora changed "
                              f"since it was saved?): {unexpected[:3]}")


def export_lora(out: Path, unet: torch.nn.Module, family: str, base: Path) -> Path:
    """``out``/pytorch_lora_weights.safetensors (diffusers' naming, ``pipe.load_lora_weights(out)``) and
    LORA_MARKER naming the base, written to a temporary folder and renamed into place."""
    import os
    import shutil

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    pipeline = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    pipeline.save_lora_weights(tmp, unet_lora_layers=layers, safe_serialization=True)
    (tmp / LORA_MARKER).write_text(json.dumps({"base": str(Path(base).resolve()), "family": family}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def lora_base(folder: Path) -> Path | None:
    """The base pipeline a LoRA folder adapts, or None when ``folder`` is a full pipeline."""
    marker = Path(folder) / LORA_MARKER
    return Path(json.loads(marker.read_text())["base"]) if marker.is_file() else None
