"""Training checkpoints: written whole or not at all, ``latest.json`` repointed atomically, old ones
pruned, and read back on resume. A checkpoint holds the trained weights (the UNet, or only the LoRA
adapter), the optimizer, LR schedule, EMA and the loop's state.

Resuming reads only data, never code: the weights are safetensors (diffusers' ``save_pretrained``, the
LoRA adapter), the optimizer/LR-schedule state and the EMA are read with ``torch.load(weights_only=True)``
(tensors and plain containers; a file holding any other pickled object is refused), and the loop's state
is JSON. ``latest.json`` may only name a folder inside the checkpoints folder."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import torch

from model.config import Config
from pipeline.errors import UserError

#: the loop's state (step, best validation, history, ...): plain JSON
LOOP_STATE = "loop_state.json"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint could not be written (e.g. disk full; ``latest`` still points at the previous one), or
    one cannot be resumed from (``latest.json`` points outside the checkpoints folder, a file holds
    objects other than tensors and plain containers)."""


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
        torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict()},
                   tmp / "training_state.pt")
        # a diverged (NaN) validation loss is kept as it was (JSON's NaN extension)
        (tmp / LOOP_STATE).write_text(json.dumps(state, indent=1, default=_plain))
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


def _plain(value):
    """A numpy or torch scalar (e.g. a custom sample scorer's) as the Python number JSON can hold."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return value.item()
    raise TypeError(f"the loop's state holds a {type(value).__name__}, which JSON cannot store")


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The folder ``latest.json`` names, which must be inside ``ckpt_root`` (a relative name without
    ``..``, not a link out of it); None when there is no ``latest.json``."""
    pointer = ckpt_root / "latest.json"
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text())["path"]
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{pointer} is not a checkpoint pointer ({{\"step\": N, \"path\": \"step-...\"}}): "
                              f"{type(error).__name__}: {error}") from None
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{pointer}: \"path\" must be the name of a checkpoint folder, got {name!r}")
    relative = Path(name)
    root = ckpt_root.resolve()
    folder = (ckpt_root / relative).resolve()
    if relative.is_absolute() or ".." in relative.parts or folder == root or not folder.is_relative_to(root):
        raise CheckpointError(f"{pointer} points at {name!r}, outside the checkpoints folder {ckpt_root}: refusing to "
                              f"resume from it (it should name a step-NNNNNNN folder inside it)")
    return ckpt_root / relative


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
    saved = load_tensors(folder / "training_state.pt")
    optimizer.load_state_dict(saved["optimizer"])
    lr_scheduler.load_state_dict(saved["lr_scheduler"])
    if ema is not None:
        ema.load_state_dict(load_tensors(folder / "ema.pt"))
    if (folder / LOOP_STATE).is_file():
        return json.loads((folder / LOOP_STATE).read_text())
    if "state" not in saved:
        raise CheckpointError(f"checkpoint {folder} has no {LOOP_STATE}: it is incomplete; delete it to resume from an "
                              f"earlier one")
    return saved["state"]  # a checkpoint written before the loop's state moved to JSON


def load_tensors(file: Path):
    """``torch.load`` of tensors and plain containers only (``weights_only=True``): a file that holds any
    other pickled object (which could run code as it loads) is refused with a CheckpointError."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message is a paragraph; the line naming the refused object is the useful one
        why = next((line.strip() for line in str(error).splitlines() if "GLOBAL" in line), "").split(". Please")[0]
        raise CheckpointError(f"{file} holds objects other than tensors and plain containers; refusing to load it "
                              f"(a checkpoint written by needles never does; delete this checkpoint folder to "
                              f"resume from an earlier one){': ' + why if why else ''}") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"{file} cannot be read as a checkpoint file: {type(error).__name__}: {error}") from error
