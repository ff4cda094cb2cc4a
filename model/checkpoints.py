"""Training checkpoints: written whole or not at all, ``latest.json`` repointed atomically, old ones
pruned, and read back on resume. A checkpoint holds the trained weights (the UNet, or only the LoRA
adapter), the optimizer, LR schedule, EMA and the loop's state."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from model.config import Config


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (e.g. disk full); ``latest`` still points at the previous one."""


def save_checkpoint(ckpt_root: Path, step: int, unet, optimizer, lr_scheduler, ema, state: dict, cfg: Config) -> Path:
    """Write everything to a temporary folder, rename it into place, then repoint ``latest.json`` with an
    atomic replace. A failure at any point (disk full) leaves ``latest`` on the previous checkpoint."""
    final = ckpt_root / f"step-{step:07d}"
    tmp = ckpt_root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        if getattr(unet, "peft_config", None):  # LoRA: only the adapter trains, only the adapter is saved
            from safetensors.torch import save_file

            from model.lora import adapter_state

            save_file(adapter_state(unet), tmp / "lora.safetensors")
        else:
            unet.save_pretrained(tmp / "unet")
        torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                    "state": state}, tmp / "training_state.pt")
        if ema is not None:
            torch.save(ema.state_dict(), tmp / "ema.pt")
        cfg.save(tmp / "config.yaml")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = ckpt_root / ".latest.json.tmp"
        pointer.write_text(json.dumps({"step": step, "path": final.name}))
        os.replace(pointer, ckpt_root / "latest.json")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(ckpt_root)
        raise CheckpointError(f"could not save the checkpoint of step {step} ({e}); latest still points at "
                              f"{previous.name if previous else 'nothing'}") from e
    return final


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    pointer = ckpt_root / "latest.json"
    if not pointer.is_file():
        return None
    return ckpt_root / json.loads(pointer.read_text())["path"]


def prune_checkpoints(ckpt_root: Path, keep: int) -> None:
    latest = latest_checkpoint(ckpt_root)
    old = sorted(p for p in ckpt_root.glob("step-*") if p != latest)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)




def restore_checkpoint(folder: Path, unet, optimizer, lr_scheduler, ema) -> dict:
    """Load a checkpoint into the models of a starting stage; returns the loop's state."""
    if (folder / "lora.safetensors").is_file():
        from safetensors.torch import load_file

        from model.lora import load_adapter_state

        load_adapter_state(unet, load_file(folder / "lora.safetensors"))
    else:
        from diffusers import UNet2DConditionModel

        unet.load_state_dict(UNet2DConditionModel.from_pretrained(folder / "unet").state_dict())
    saved = torch.load(folder / "training_state.pt", weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    lr_scheduler.load_state_dict(saved["lr_scheduler"])
    if ema is not None:
        ema.load_state_dict(torch.load(folder / "ema.pt", weights_only=False))
    return saved["state"]
