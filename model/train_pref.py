"""Preference tuning (issue 15): Diffusion-DPO or SimPO, with the pixel-space term, on (winner, loser) pairs
(pixel-space post-training §3.2, eqs. 4-7; the losses are model/preference.py).

    train_preference(checkpoint, pairs, out)   what `make train-pref`, `python -m model train-pref` and
                                               flows/preference.py call

It starts from a checkpoint: needles' own (its needles_config.yaml gives the model and schedule; the
``preference`` section comes from it and ``--set preference.*``) or a public SD 1.x/2.x / SDXL base (the
preset's ``preference`` section, the base's schedule: model/bases.py). The reference of DPO is a frozen copy
of the starting UNet, or for a LoRA run the same UNet with its adapter switched off. The pairs
(annotation/preference.py) are cropped to the resolution, encoded once with the frozen autoencoder into
memory-mapped arrays (streamed from the Parquet file: a million pairs need disk, not memory); a seeded share of the prompts is held out, and every ``eval_every`` steps the held-out loss,
preference accuracy (share of pairs whose implicit reward margin -β δ is positive) and mean margin are
logged with fixed noise. The step with the lowest held-out loss is exported as ``best``.

Data-parallel under ``accelerate launch`` / torchrun (one process per GPU): each process takes every n-th
pair of a step's batch and its share of the same noise draw, the gradients are averaged, so n processes
take the step one process takes on the whole batch; rank 0 alone encodes the pairs and writes checkpoints,
pipelines and the report.

Every ``checkpoint_every`` steps the trained weights (or the adapter), the optimizer, LR schedule, β and
the held-out history are checkpointed (model/checkpoints.py: whole or not at all); a rerun on the same OUT
resumes from the newest one and, every step's batch and noise being seeded by the step, ends where the
uninterrupted run would have. It refuses to resume on other pairs or another ``preference`` section
(``max_steps`` aside, so a finished run can be extended).

Output:
    OUT/best/, OUT/final/   diffusers pipelines (model.pipeline.load_pipeline), or LoRA folders
    OUT/report.json         β, pairs used per source, history of held-out metrics, why it stopped
    OUT/checkpoints/        step-N/ (resume state), latest.json
    OUT/latents/            the pairs' latents, memory-mapped (z_w.npy, z_l.npy; SDXL time_ids t_w.npy, t_l.npy)
    OUT/tb/                 TensorBoard logs
"""

from __future__ import annotations

import copy
import io
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from diffusers.optimization import get_scheduler
from PIL import Image

from model import preference as P
from model.autoencoder import decode_latents, downsample_factor, encode_latents
from model.checkpoints import LOOP_STATE, CheckpointError, latest_checkpoint, prune_checkpoints, restore_checkpoint, save_checkpoint
from model.bases import Frozen, base_diffusion, base_family, encode_text, load_base_frozen, load_base_unet, resolve_base
from model.config import Config, ConfigError, PreferenceConfig, load_config
from model.data import DataError, crop_with_geometry
from model.export import export_pipeline
from model.objective import NoiseDraw, draw_noise, generator, training_alphas_cumprod

log = logging.getLogger(__name__)


@dataclass
class PreferenceResult:
    out_dir: Path
    checkpoint: Path  # best held-out loss (final when nothing was held out)
    final: Path
    steps: int
    stopped: str  # "max_steps" | "nan at step N"
    beta: float
    pixel_beta: float | None
    pairs: dict = field(default_factory=dict)  # train / held out / per feedback source
    history: list = field(default_factory=list)


# --- what it starts from -----------------------------------------------------------------------------


@dataclass
class Start:
    cfg: Config
    frozen: Frozen
    unet: torch.nn.Module
    scaling_factor: float
    source: Path


def load_start(checkpoint: str | Path, preset: str | Path | None, overrides: list[str] | None) -> Start:
    """The config, frozen models and UNet of a needles checkpoint or a public SD/SDXL base."""
    from model.lora import lora_base

    path = resolve_base(checkpoint)
    if lora_base(path) is not None:
        raise ConfigError(f"{path} is a LoRA folder: give its base and set preference.lora to train an adapter")
    family = base_family(path)
    scaling = json.loads((path / "vae" / "config.json").read_text())["scaling_factor"]
    if family == "needles":
        from model.bases import NEEDLES_MARKER
        from model.pipeline import load_pipeline

        cfg = load_config(path / NEEDLES_MARKER, overrides)
        pipe = load_pipeline(path)
        frozen = Frozen(pipe.tokenizer, pipe.text_encoder, pipe.vae)
        for model in (frozen.text_encoder, frozen.vae):
            model.requires_grad_(False).eval()
        return Start(cfg, frozen, pipe.unet, scaling, path)
    frozen = load_base_frozen(path, family)
    cfg = base_diffusion(load_config(preset or "public-full", overrides), frozen)
    return Start(cfg, frozen, load_base_unet(path, frozen), scaling, path)


# --- the pairs ----------------------------------------------------------------------------------------


#: latents are cached as memory-mapped .npy files: (name, image column)
LATENT_ARRAYS = (("z_w", "winner_image"), ("z_l", "loser_image"))


@dataclass
class PairLatents:
    """Scaled latents of every pair's winner and loser (N, C, h, w), its prompt, and SDXL's time_ids of
    each image (its original size and crop). The arrays are memory-mapped from OUT/latents/: a step reads
    only its batch's rows, so the pairs need disk (N x 2 latents), not memory."""

    z_w: np.ndarray
    z_l: np.ndarray
    prompts: list[str]
    time_ids_w: np.ndarray
    time_ids_l: np.ndarray

    def rows(self, name: str, indices: list[int]) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(getattr(self, name)[indices]))


@torch.no_grad()
def encode_pairs(pairs: Path, prompts: list[str], frozen: Frozen, resolution: int, scaling: float, device,
                 cache: Path, key: str, batch_size: int = 8) -> PairLatents:
    """Winner and loser images cropped to resolution² (as training crops: crop_with_geometry) and encoded,
    streamed from the Parquet file ``pairs`` a batch at a time into memory-mapped arrays under ``cache``.
    ``key`` names what they were encoded from (pairs, autoencoder, resolution): the same key resumes an
    interrupted encoding at its last finished batch, another one starts over."""
    from numpy.lib.format import open_memmap

    cache.mkdir(parents=True, exist_ok=True)
    meta_file = cache / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if meta.get("key") != key:
        for old in cache.glob("*.npy"):
            old.unlink()
        meta = {"key": key, "done": 0}
    n, start, arrays = len(prompts), 0, {}
    source = pq.ParquetFile(pairs)
    for batch in source.iter_batches(batch_size=batch_size, columns=[column for _, column in LATENT_ARRAYS]):
        rows = batch.num_rows
        if start + rows > meta["done"]:
            for name, column in LATENT_ARRAYS:
                crops = [crop_with_geometry(Image.open(io.BytesIO(b)), (resolution, resolution))
                         for b in batch.column(column).to_pylist()]
                z = encode_latents(frozen.vae, torch.stack([c[0] for c in crops]).to(device)).float().cpu() * scaling
                for array, value in ((name, z.numpy()), (f"t{name[1:]}", np.array([c[1] for c in crops], np.float32))):
                    if array not in arrays:
                        path = cache / f"{array}.npy"
                        arrays[array] = (open_memmap(path, mode="r+") if path.is_file() else
                                         open_memmap(path, mode="w+", dtype=np.float32, shape=(n, *value.shape[1:])))
                    arrays[array][start:start + rows] = value
            for array in arrays.values():
                array.flush()
            meta["done"] = start + rows
            tmp = meta_file.with_name(".meta.json.tmp")
            tmp.write_text(json.dumps(meta))
            tmp.replace(meta_file)  # written after the rows: a crash re-encodes at most one batch
        start += rows
    if start != n or meta["done"] != n:
        raise DataError(f"{pairs}: {start} pairs of images for {n} pairs")
    z_w, z_l, t_w, t_l = (np.load(cache / f"{a}.npy", mmap_mode="r") for a in ("z_w", "z_l", "t_w", "t_l"))
    return PairLatents(z_w, z_l, list(prompts), t_w, t_l)


def split_pairs(prompt_ids: list[str], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) indices, held out by prompt (a seeded hash), so no held-out prompt is trained on;
    at least one prompt is held out when val_fraction > 0 and there are two prompts or more."""
    import hashlib

    def unit(prompt_id: str) -> float:
        return int(hashlib.sha256(f"{seed}\x1f{prompt_id}".encode()).hexdigest()[:8], 16) / 2**32

    held = {p for p in set(prompt_ids) if unit(p) < val_fraction}
    if val_fraction and not held and len(set(prompt_ids)) > 1:
        held = {min(set(prompt_ids), key=unit)}
    val = [i for i, p in enumerate(prompt_ids) if p in held]
    return [i for i, p in enumerate(prompt_ids) if p not in held], val


# --- the run ---------------------------------------------------------------------------------------------


class AdapterOff:
    """DPO's reference in a LoRA run: the same UNet with its adapter switched off, i.e. the base's weights."""

    def __init__(self, unet) -> None:
        self.unet = unet

    def __call__(self, *args, **kwargs):
        self.unet.disable_adapters()
        try:
            return self.unet(*args, **kwargs)
        finally:
            self.unet.enable_adapters()


def _optimizer(pref: PreferenceConfig, params: list) -> torch.optim.Optimizer:
    if pref.optimizer == "sgd":
        return torch.optim.SGD(params, lr=pref.learning_rate, weight_decay=pref.weight_decay)
    if pref.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ConfigError("preference.optimizer adamw8bit needs bitsandbytes (CUDA only); or use adamw") from error
        return bnb.optim.AdamW8bit(params, lr=pref.learning_rate, betas=pref.adam_betas, weight_decay=pref.weight_decay)
    return torch.optim.AdamW(params, lr=pref.learning_rate, betas=pref.adam_betas, weight_decay=pref.weight_decay)


class PreferenceRun:
    """The trained UNet (whole or a LoRA adapter), its frozen reference, optimizer, the encoded pairs, and
    one step / one held-out evaluation / one export."""

    def __init__(self, start: Start, rows: list[dict], pairs: Path, pairs_sha: str, out_dir: Path) -> None:
        from accelerate import Accelerator

        self.start, self.cfg, self.pref = start, start.cfg, start.cfg.preference
        self.out_dir = Path(out_dir)
        from model.train import process_state

        ranks = process_state()  # under `accelerate launch` / torchrun: one process per device
        self.acc = Accelerator(mixed_precision=self.cfg.mixed_precision, log_with="tensorboard",
                               project_dir=self.out_dir / "tb", cpu=ranks.device.type == "cpu")
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        if self.pref.batch_size % self.world:
            raise ConfigError(f"preference.batch_size {self.pref.batch_size} is not a multiple of the {self.world} "
                              f"processes")
        device = self.acc.device
        start.frozen.to(device)
        unet = start.unet
        self.resolution = self.pref.resolution or unet.config.sample_size * downsample_factor(start.frozen.vae)
        if self.resolution % downsample_factor(start.frozen.vae):
            raise ConfigError(f"preference.resolution {self.resolution} is not a multiple of the autoencoder's "
                              f"downsampling {downsample_factor(start.frozen.vae)}")
        from annotation.preference import PROMPT, PROMPT_ID

        key = json.dumps({"pairs": pairs_sha, "source": str(Path(start.source).resolve()),
                          "resolution": self.resolution, "scaling": start.scaling_factor})
        with self.acc.main_process_first():  # rank 0 encodes the pairs; the others then map its arrays
            self.data = encode_pairs(pairs, [r[PROMPT] for r in rows], start.frozen, self.resolution,
                                     start.scaling_factor, device, self.out_dir / "latents", key)

        self.train_idx, self.val_idx = split_pairs([r[PROMPT_ID] for r in rows], self.pref.val_fraction, self.cfg.seed)
        if not self.train_idx:
            raise DataError(f"no pair left to train on: {len(rows)} pairs, all held out (preference.val_fraction)")
        if self.pref.lora is not None:
            from model.lora import attach_lora

            attach_lora(unet, self.pref.lora)
            self.reference = AdapterOff(unet) if self.pref.objective == "dpo" else None
        else:
            self.reference = (copy.deepcopy(unet).requires_grad_(False).eval().to(device)
                              if self.pref.objective == "dpo" else None)
        if self.pref.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        self.params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = _optimizer(self.pref, self.params)
        self.lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=self.pref.warmup_steps)
        self.unet, self.optimizer = self.acc.prepare(unet, optimizer)
        self.alphas_bar = training_alphas_cumprod(self.cfg)
        vae, scale = start.frozen.vae, start.scaling_factor
        self.decode = lambda z: decode_latents(vae, z / scale)
        self.beta, self.pixel_beta = self.pref.beta, self.pref.pixel_beta
        self.acc.init_trackers("preference")

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        device = self.acc.device
        cond = encode_text(self.start.frozen, [self.data.prompts[i] for i in indices])
        if self.start.frozen.family == "sdxl":  # each image its own size and crop: winners' rows, then losers'
            cond["time_ids"] = torch.cat([self.data.rows("time_ids_w", indices), self.data.rows("time_ids_l", indices)])
        return (self.data.rows("z_w", indices).to(device), self.data.rows("z_l", indices).to(device),
                {k: v.to(device) for k, v in cond.items()})

    def calibrate(self, indices: list[int]) -> None:
        """β (and the pixel term's β) so that |β δ| ≈ 1 on this batch, where not set in the config."""
        z_w, z_l, cond = self.batch(indices)
        noise = draw_noise(tuple(z_w.shape), self.cfg, self.pref.noise_offset, generator(self.cfg.seed, 12, -1),
                               self.alphas_bar)
        decode = self.decode if self.pref.pixel_loss_weight and self.pixel_beta is None else None
        with torch.no_grad(), self.acc.autocast():
            errors = P.pair_errors(self.acc.unwrap_model(self.unet), z_w, z_l, noise, cond, self.cfg, decode)
        if self.beta is None:
            self.beta = P.calibrated_beta(errors["w"], errors["l"])
        if decode is not None:
            self.pixel_beta = P.calibrated_beta(errors["pixel_w"], errors["pixel_l"])
        self.pixel_beta = self.pixel_beta or self.beta
        log.info("preference β = %.4g (pixel term β = %.4g)", self.beta, self.pixel_beta)

    def loss(self, model, indices: list[int], gen: torch.Generator, share: slice = slice(None)) -> P.PreferenceStep:
        """The loss on ``indices[share]``, with the noise the whole of ``indices`` draws from ``gen``: each process
        of a data-parallel step takes its share of the pairs and of the same draw."""
        noise = draw_noise((len(indices), *self.data.z_w.shape[1:]), self.cfg, self.pref.noise_offset, gen,
                           self.alphas_bar)
        noise = NoiseDraw(*(v[share] for v in (noise.eps, noise.a, noise.s, noise.time)))
        z_w, z_l, cond = self.batch(indices[share])
        with self.acc.autocast():
            return P.preference_loss(model, self.reference, z_w, z_l, cond, self.cfg, self.pref.objective, self.beta,
                                     self.pixel_beta, self.pref.pixel_loss_weight, self.pref.simpo_gamma, noise,
                                     self.decode)

    def train_step(self, step: int) -> P.PreferenceStep | None:
        """One optimizer step on a seeded batch of training pairs; None on a non-finite loss. With n processes
        each takes every n-th pair of the batch (and its noise) and the gradients are averaged: the same
        step as one process on the whole batch. The returned margins are every process's."""
        gen = generator(self.cfg.seed, 11, step)
        order = torch.randperm(len(self.train_idx), generator=gen)[:self.pref.batch_size].tolist()
        result = self.loss(self.unet, [self.train_idx[i] for i in order], gen, slice(self.rank, None, self.world))
        if self.world > 1:
            result.margin = self.acc.gather(result.margin)
        if not torch.isfinite(self.acc.gather(result.loss.detach().reshape(1))).all():
            return None
        self.acc.backward(result.loss)
        if self.pref.grad_clip:
            self.acc.clip_grad_norm_(self.params, self.pref.grad_clip)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return result

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss, preference accuracy (margin > 0) and mean reward margin, with fixed noise."""
        model = self.acc.unwrap_model(self.unet)
        model.eval()
        losses, margins, pixel_margins = [], [], []
        for start in range(0, len(self.val_idx), self.pref.batch_size):
            indices = self.val_idx[start:start + self.pref.batch_size]
            result = self.loss(model, indices, generator(self.cfg.seed, 13, start))
            losses.append(result.loss.item() * len(indices))
            margins.append(result.margin.float().cpu())
            if result.pixel_margin is not None:
                pixel_margins.append(result.pixel_margin.float().cpu())
        model.train()
        margin = torch.cat(margins)
        metrics = {"val_loss": sum(losses) / len(self.val_idx), "val_preference_accuracy": (margin > 0).float().mean().item(),
                   "val_reward_margin": margin.mean().item()}
        if pixel_margins:
            pixel = torch.cat(pixel_margins)
            metrics |= {"val_pixel_preference_accuracy": (pixel > 0).float().mean().item(),
                        "val_pixel_reward_margin": pixel.mean().item()}
        return metrics

    def checkpoint(self, ckpt_root: Path, state: dict) -> None:
        """Written by the main process; the others wait for it."""
        if self.acc.is_main_process:
            save_checkpoint(ckpt_root, state["step"], self.acc.unwrap_model(self.unet), self.optimizer.optimizer,
                            self.lr_scheduler, None, state, self.cfg)
            prune_checkpoints(ckpt_root, self.pref.keep_checkpoints)
        self.acc.wait_for_everyone()

    def restore(self, folder: Path, key: dict) -> dict:
        """The loop's state of checkpoint ``folder``, its weights and optimizer loaded; refused (CheckpointError)
        when it was written for other pairs or another ``preference`` section (``key``)."""
        state = json.loads((folder / LOOP_STATE).read_text()) if (folder / LOOP_STATE).is_file() else {}
        differs = sorted(k for k in key if state.get("key", {}).get(k) != key[k])
        if differs:
            raise CheckpointError(f"{folder} was written by a preference run with other {' and '.join(differs)}: "
                                  f"refusing to resume it; use another output folder, or delete "
                                  f"{folder.parent} to start over")
        state = restore_checkpoint(folder, self.acc.unwrap_model(self.unet), self.optimizer.optimizer,
                                   self.lr_scheduler, None)
        self.beta, self.pixel_beta = state["beta"], state["pixel_beta"]
        log.info("resuming preference tuning from step %d (%s)", state["step"], folder)
        return state

    def export(self, name: str) -> Path:
        """OUT/name, written by the main process; the others wait for it."""
        model = self.acc.unwrap_model(self.unet)
        frozen = self.start.frozen
        folder = self.out_dir / name
        if self.acc.is_main_process:
            if self.pref.lora is not None:
                from model.lora import export_lora

                folder = export_lora(folder, model, frozen.family, self.start.source)
            else:
                folder = export_pipeline(folder, model, frozen, self.cfg, self.start.scaling_factor)
        self.acc.wait_for_everyone()
        return folder


def _file_sha256(path: Path) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def train_preference(checkpoint: str | Path, pairs: str | Path, out_dir: str | Path, preset: str | Path | None = None,
                     overrides: list[str] | None = None, progress: bool = True) -> PreferenceResult:
    """Preference-tune ``checkpoint`` on the pairs table ``pairs`` into ``out_dir`` (see the module)."""
    from collections import Counter

    from tqdm import tqdm

    from annotation.preference import FEEDBACK_COL, read_pairs

    start = load_start(checkpoint, preset, overrides)
    pref = start.cfg.preference
    table = read_pairs(Path(pairs), pref.feedback, images=False)  # the images are streamed (encode_pairs)
    rows = table.to_pylist()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs_sha = _file_sha256(Path(pairs))  # read once: the key of the encoded latents and of the checkpoints
    run = PreferenceRun(start, rows, Path(pairs), pairs_sha, out_dir)
    main = run.acc.is_main_process  # the one writer of config, checkpoints, pipelines and report
    if main:
        start.cfg.save(out_dir / "config.yaml")
    ckpt_root = out_dir / "checkpoints"
    # what a checkpoint must have been written with to be resumed: these pairs, this preference section
    key = {"pairs": pairs_sha, "preference": pref.model_dump(mode="json", exclude={"max_steps"})}
    resume = latest_checkpoint(ckpt_root)
    if resume is not None:
        state = run.restore(resume, key)
    else:
        run.calibrate(run.train_idx[:pref.batch_size])
        state = {"step": 0, "best_loss": None, "history": [], "key": key}
        if run.val_idx:
            state["history"].append({"step": 0, **run.evaluate()})
            run.acc.log(state["history"][-1], step=0)
    history, stopped, first = state["history"], "max_steps", state["step"]
    step = first - 1
    t0 = time.perf_counter()
    for step in tqdm(range(first, pref.max_steps), initial=first, total=pref.max_steps, desc="preference",
                     disable=not progress):
        result = run.train_step(step)
        if result is None:
            stopped = f"nan at step {step}"
            log.error("non-finite preference loss at step %d: stopping", step)
            break
        done = step + 1
        # images (winner + loser) per second, every process together
        rate = 2 * pref.batch_size * (done - first) / max(time.perf_counter() - t0, 1e-9)
        # loss: the mean over every process's pairs; its parts: the main process's pairs
        run.acc.log({"loss": run.acc.reduce(result.loss.detach(), "mean").item(),
                     **{f"loss_{k}": v for k, v in result.parts.items()},
                     "train_preference_accuracy": (result.margin > 0).float().mean().item(),
                     "train_reward_margin": result.margin.mean().item(), "images_per_s": rate,
                     "lr": run.lr_scheduler.get_last_lr()[0]}, step=done)
        if run.val_idx and (done % pref.eval_every == 0 or done == pref.max_steps):
            history.append({"step": done, **run.evaluate()})
            run.acc.log(history[-1], step=done)
            if state["best_loss"] is None or history[-1]["val_loss"] < state["best_loss"]:
                state["best_loss"] = history[-1]["val_loss"]
                run.export("best")
        if done % pref.checkpoint_every == 0 or done == pref.max_steps:
            state["step"] = done
            run.checkpoint(ckpt_root, state | {"beta": run.beta, "pixel_beta": run.pixel_beta})
    for tracker in run.acc.trackers:
        tracker.finish()
    steps = step + 1 if stopped == "max_steps" else step
    final = run.export("final")
    best = out_dir / "best" if (out_dir / "best").is_dir() else final
    counts = {"train": len(run.train_idx), "held_out": len(run.val_idx),
              "feedback": dict(Counter(table.column(FEEDBACK_COL).to_pylist()))}
    result = PreferenceResult(out_dir, best, final, steps, stopped, run.beta, run.pixel_beta, counts, history)
    if not main:
        return result
    (out_dir / "report.json").write_text(json.dumps(asdict(result) | {
        "objective": pref.objective, "pixel_loss_weight": pref.pixel_loss_weight, "processes": run.world,
        "pairs_per_process_per_step": pref.batch_size // run.world}, default=str, indent=1))
    return result
