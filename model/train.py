"""One training loop for pre-training and quality-tuning (nanoGPT-shaped: read it top to bottom).

    train_quality_tuned(data_dir, out_dir, preset, base=...)   # what `make train-qt` and the flow call
      -> a public base (SD 1.x/2.x, SDXL; model/bases.py): its frozen models and schedule, or
         ensure_autoencoder + pretrain (progressive-resolution stages) for needles' own model
      -> run_stage(quality_tune)   full fine-tuning, or a LoRA adapter (model/lora.py)

``run_stage`` is the loop; ``StageRun`` holds what it works on (data, models, optimizer, counters) and
does one step, one evaluation, one export. The objective is model/objective.py; checkpoints are
model/checkpoints.py; what leaves a stage is model/export.py. Everything random in a step is drawn from
generators seeded by (seed, draw index), and the batch of a draw is a pure function of it
(data.BalancedBucketSampler), so a resumed run repeats the uninterrupted one exactly; the optimizer, LR
schedule, EMA and early-stopping state are in the checkpoint.

Output of a stage directory:
    checkpoints/step-0000500/   unet/ (or lora.safetensors), ema.pt, training_state.pt, config.yaml
    checkpoints/latest.json     points at the newest complete checkpoint (replaced atomically)
    best/                       the best validation step: a diffusers pipeline (StableDiffusionPipeline,
                                StableDiffusionXLPipeline), or LoRA weights + needles_lora.json
    final/                      the same at the last step
    samples/step-0000500.png    grid of the fixed prompts
    tb/                         TensorBoard logs
    report.json                 data report, losses, why it stopped
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils import make_image_grid

from model.autoencoder import decode_latents, encode_latents, train_autoencoder
from model.bases import (Frozen, base_diffusion, base_family, build_unet, encode_text, load_base_frozen,
                         load_base_unet, load_frozen, native_resolution, resolve_base)
from model.checkpoints import latest_checkpoint, prune_checkpoints, restore_checkpoint, save_checkpoint
from model.config import Config, ConfigError, StageConfig, load_config
from model.data import (BalancedBucketSampler, DataError, LatentCache, build_cache, crop_to_bucket,
                        read_captioned, split_validation)
from model.export import export_pipeline, sample_grid, score_selection
from model.objective import balance_pixel_loss, diffusion_loss, generator, training_alphas_cumprod

log = logging.getLogger(__name__)

# (PIL images, prompts) -> a score, higher is better, or {"score": ..., other parts logged beside it}
# (model.evaluation.PipelineSampleScorer, built from the config's sample.score)
SampleScorer = Callable[[list, list[str]], "float | dict[str, float]"]


@dataclass
class StageResult:
    stage: str
    out_dir: Path
    checkpoint: Path  # best pipeline (diffusers, from_pretrained-able)
    final: Path
    grids: list[Path]
    steps: int
    stopped: str  # "max_steps" | "early_stopping" | "nan at step N"
    best_step: int | None
    best_val_loss: float | None  # held-out loss at best_step
    best_sample_score: float | None = None  # sample score at best_step (when sample.score chose it)
    data_report: dict = field(default_factory=dict)
    processes: int = 1  # data-parallel processes (GPUs) that trained it
    accumulation_steps: int = 1  # micro-batches per optimizer step in each process
    pixel_loss_weight: float = 0.0  # the λ it trained with (the calibrated one for "auto")
    # "auto" only: the measured mean terms, their ratio and the λ chosen from them (objective.balance_pixel_loss)
    pixel_calibration: dict | None = None


@dataclass
class QualityTuneResult:
    checkpoint: Path
    grids: list[Path]
    base: Path
    autoencoder_metrics: dict | None
    stages: list[StageResult]


# --- one stage ---------------------------------------------------------------------------------------


def process_state():
    """accelerate's view of the processes (``accelerate launch`` / torchrun start one per device). Without
    CUDA they talk over gloo on the CPU, as ``accelerate launch --cpu`` would set up. A launch that
    asked for several processes but did not get a process group is refused: each copy would train
    alone and they would overwrite each other's files."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and state.num_processes != world:
        raise RuntimeError(f"launched as {world} processes (WORLD_SIZE) but accelerate formed a group of "
                           f"{state.num_processes} ({state.distributed_type}); check the launcher's settings")
    return state


def prepare_cache(cfg: Config, stage: StageConfig, data_dir: Path, frozen: Frozen, cache_root: Path) -> LatentCache:
    items, report = read_captioned(data_dir, cfg.data.missing_captions)
    if len(items) < stage.min_images:
        bad_paths = f", {len(report.bad_path)} with a file_name outside the folder" if report.bad_path else ""
        raise DataError(f"{data_dir}: {len(items)} usable captioned images ({len(report.missing_caption)} without a "
                        f"caption{bad_paths} skipped); stage {stage.name} needs at least {stage.min_images}")
    # what fixes the cached tensors: needles' own models by their config, a public base by its folder
    models = cfg.model_hash() if frozen.source is None else f"{frozen.family}-{_short_hash(frozen.source)}"
    cache = build_cache(
        items, cache_root / f"{models}-{stage.resolution}", stage.resolution, cfg.data.bucket_aspect_ratios,
        encode_images=lambda x: encode_latents(frozen.vae, x.to(frozen.vae.device)).cpu(),
        encode_text=lambda p: {k: v.cpu() for k, v in encode_text(frozen, p).items()},
        fingerprint=models, min_per_bucket=stage.micro_batch, report=report,
        zero_empty=frozen.family == "sdxl")  # SDXL's unconditional input is zeros (model/export.py)
    if len(cache) < stage.min_images:
        raise DataError(f"{data_dir}: only {len(cache)} images could be decoded (unreadable: "
                        f"{list(cache.meta['report']['unreadable'].items())[:3]}); stage {stage.name} needs at least "
                        f"{stage.min_images}")
    return cache


def _short_hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:12]


class StageRun:
    """What one stage works on: the cached data and its sampler, the UNet (whole, or frozen with a LoRA
    adapter), optimizer, LR schedule, EMA of the trained weights, and the loop's state (resumed from the
    latest checkpoint when there is one). Rank 0 alone samples and writes files."""

    def __init__(self, cfg: Config, stage: StageConfig, data_dir: Path, out_dir: Path, frozen: Frozen,
                 init_from: Path | None, sample_scorer: SampleScorer | None) -> None:
        from accelerate import Accelerator

        self.cfg, self.stage, self.frozen, self.init_from, self.scorer = cfg, stage, frozen, init_from, sample_scorer
        self.out_dir = Path(out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        ranks = process_state()
        frozen.to(ranks.device)  # the frozen models work where the UNet trains: cache and samples are made there
        with ranks.main_process_first():  # rank 0 encodes the cache; the others then reuse it
            self.cache = prepare_cache(cfg, stage, Path(data_dir), frozen, self.out_dir.parent / "cache")
        self.train_idx, self.val_idx = split_validation(self.cache.sizes, stage.val_fraction, cfg.seed)
        self.accelerator = acc = Accelerator(mixed_precision=cfg.mixed_precision, log_with="tensorboard",
                                             project_dir=self.out_dir / "tb", cpu=ranks.device.type == "cpu")
        self.world = acc.num_processes
        if stage.batch_size % (stage.micro_batch * self.world):
            raise ConfigError(f"stage {stage.name}: batch_size {stage.batch_size} is not a multiple of micro_batch {stage.micro_batch} x "
                             f"{self.world} processes")
        self.accumulation = stage.batch_size // (stage.micro_batch * self.world)
        self.sampler = BalancedBucketSampler(self.train_idx, stage.micro_batch, cfg.seed, cfg.data.bucket_weight_alpha,
                                             cfg.data.max_repeat_ratio)
        unet, scaling_factor = self._unet()
        self.params = [p for p in unet.parameters() if p.requires_grad]  # all, or the LoRA adapter's
        optimizer = _optimizer(stage, self.params)
        self.lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=stage.warmup_steps)
        self.ema = (EMAModel(self.params, decay=stage.ema_decay, use_ema_warmup=True, power=3 / 4)
                    if stage.ema_decay else None)
        # best_val: the best early-stopping metric so far (held-out loss, or minus the sample score)
        self.state = {"step": 0, "best_val": None, "best_step": None, "bad_evals": 0, "images_seen": 0,
                      "scaling_factor": scaling_factor, "history": []}
        resume = latest_checkpoint(self.ckpt_root)
        if resume is not None:
            self.state = restore_checkpoint(resume, unet, optimizer, self.lr_scheduler, self.ema)
            log.info("resuming %s from step %d (%s)", stage.name, self.state["step"], resume)
        self.unet, self.optimizer = acc.prepare(unet, optimizer)
        if self.ema is not None:
            self.ema.to(acc.device)
        self.alphas_bar = training_alphas_cumprod(cfg)
        scale = self.state["scaling_factor"]
        self.decode = lambda z: decode_latents(frozen.vae, z / scale)
        self.grids: list[Path] = sorted((self.out_dir / "samples").glob("step-*.png"))
        self.sample_size = _bucket_hw(self.cache)
        # a scorer with its own prompt selection (PipelineSampleScorer) scores those x its seeds
        self.selection = getattr(sample_scorer, "selection_record", lambda: None)()
        if stage.pixel_loss_weight == "auto":
            self._resolve_pixel_loss_weight(resumed=resume is not None)
        acc.init_trackers(stage.name)
        if stage.pixel_loss_weight == "auto":
            calibration = self.state["pixel_calibration"]
            acc.log({"pixel_loss_weight": calibration["pixel_loss_weight"],
                     "pixel_to_latent_ratio": calibration["pixel_to_latent"]}, step=self.state["step"])

    def _resolve_pixel_loss_weight(self, resumed: bool) -> None:
        """``pixel_loss_weight: auto``: λ measured once, before the first step, and kept in the loop's
        state, so a resumed run trains on with the λ it started with (recalibrating on trained weights
        would change the objective mid-run)."""
        from accelerate.utils import broadcast_object_list

        calibration = self.state.get("pixel_calibration")
        if calibration is None:
            if resumed:
                log.warning("%s: the checkpoint records no calibrated pixel-loss weight; measuring it on the resumed "
                            "weights", self.stage.name)
            # rank 0's measurement for every rank, so all optimise the same objective
            calibration = broadcast_object_list([self.calibrate_pixel_loss()], from_process=0)[0]
            self.state["pixel_calibration"] = calibration
            log.info("%s: pixel-space loss calibrated on %d batches: mean latent %.4g, mean pixel %.4g (pixel/latent "
                     "%.4g); λ = %.4g for λ·pixel/latent = %g", self.stage.name, calibration["batches"],
                     calibration["latent"], calibration["pixel"], calibration["pixel_to_latent"],
                     calibration["pixel_loss_weight"], calibration["balance"])
        else:
            log.info("%s: reusing the calibrated pixel-loss weight λ = %.4g from the checkpoint", self.stage.name,
                     calibration["pixel_loss_weight"])
        self.stage = self.stage.model_copy(update={"pixel_loss_weight": calibration["pixel_loss_weight"]})

    def calibrate_pixel_loss(self) -> dict:
        """PS §4 (implementation details) sets λ "to balance the pixel loss magnitude and latent loss magnitude": the unweighted
        latent and pixel terms of the first ``pixel_loss_calibration_batches`` draws of the sampler (the
        batches training starts with) with the current weights, no optimizer step, noise from its own
        seeded stream (so it replays exactly), -> objective.balance_pixel_loss."""
        stage = self.stage
        probe = stage.model_copy(update={"pixel_loss_weight": 1.0, "latent_loss_weight": 1.0})
        model, terms = self.accelerator.unwrap_model(self.unet), []
        with torch.no_grad():
            for draw in range(stage.pixel_loss_calibration_batches):
                z, cond = self.cache.gather(*self.sampler.batch(draw))
                with self.accelerator.autocast():
                    terms.append(self.loss(model, z, cond, generator(self.cfg.seed, 3, draw), probe)[1])
        return balance_pixel_loss(terms, stage.pixel_loss_balance)

    def _unet(self):
        """(UNet, latent scaling factor). The scale is inherited from the base (its UNet learned that
        scale), else the config's, else chosen so latents have the std the schedule expects (1 for DDPM,
        sigma_data for EDM)."""
        cfg, stage = self.cfg, self.stage
        if self.init_from is not None:
            unet = load_base_unet(self.init_from, self.frozen)
            scaling_factor = json.loads((self.init_from / "vae" / "config.json").read_text())["scaling_factor"]
        else:
            unet = build_unet(cfg, self.frozen, stage.resolution)
            target_std = cfg.diffusion.sigma_data if cfg.diffusion.schedule == "edm" else 1.0
            scaling_factor = cfg.autoencoder.scaling_factor or target_std / self.cache.meta["latent_rms"]
        if stage.lora is not None:
            from model.lora import attach_lora

            attach_lora(unet, stage.lora)
        if stage.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            if stage.uses_pixel_loss and getattr(self.frozen.vae, "_supports_gradient_checkpointing", False):
                self.frozen.vae.enable_gradient_checkpointing()  # the pixel loss backpropagates through it
        unet.train()
        return unet, scaling_factor

    @contextlib.contextmanager
    def evaluated_weights(self):
        """The unwrapped UNet in eval mode carrying the EMA weights (when EMA is on), restored after."""
        model = self.accelerator.unwrap_model(self.unet)
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)
        model.eval()
        try:
            yield model
        finally:
            model.train()
            if self.ema is not None:
                self.ema.restore(self.params)

    def loss(self, model, z: torch.Tensor, cond: dict, gen: torch.Generator, stage: StageConfig | None = None):
        device = self.accelerator.device
        cond = {k: v.to(device) for k, v in cond.items()}
        return diffusion_loss(model, z.to(device) * self.state["scaling_factor"], cond, self.cfg, stage or self.stage,
                              gen, self.alphas_bar, self.decode)

    def train_step(self, step: int) -> tuple[float, dict] | None:
        """One optimizer step = ``accumulation`` micro-batches, each from one bucket; None on a non-finite
        loss (nothing is applied)."""
        acc, stage, parts, step_loss = self.accelerator, self.stage, {}, 0.0
        for micro in range(self.accumulation):
            draw = (step * self.accumulation + micro) * self.world + acc.process_index
            bucket, indices = self.sampler.batch(draw)
            z, cond = self.cache.gather(bucket, indices)
            gen = generator(self.cfg.seed, 1, draw)
            drop = torch.rand(len(indices), generator=gen) < stage.caption_dropout  # classifier-free guidance
            for key, empty in self.cache.empty.items():
                cond[key][drop] = empty
            with acc.autocast():
                loss, parts = self.loss(self.unet, z, cond, gen)
            if not bool(acc.gather(torch.isfinite(loss.detach()).reshape(1)).all()):
                return None
            # DDP all-reduces the gradients on the last micro-batch of the step only
            with acc.no_sync(self.unet) if micro < self.accumulation - 1 else contextlib.nullcontext():
                acc.backward(loss / self.accumulation)
            step_loss += loss.item() / self.accumulation
        if stage.grad_clip:
            acc.clip_grad_norm_(self.params, stage.grad_clip)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.params)
        self.state["step"] = step + 1
        self.state["images_seen"] += stage.batch_size
        return step_loss, parts

    def validation_loss(self) -> float:
        """Held-out loss with fixed noise and timesteps (EMA weights when EMA is on)."""
        losses = []
        with self.evaluated_weights() as model, torch.no_grad():
            for b, members in enumerate(self.val_idx):
                for start in range(0, len(members), self.stage.micro_batch):
                    z, cond = self.cache.gather(b, members[start:start + self.stage.micro_batch])
                    losses.append(self.loss(model, z, cond, generator(self.cfg.seed, 2, b, start))[0].item())
        return sum(losses) / len(losses)

    def sample(self, step: int) -> tuple[Path, dict[str, float]]:
        """The grid of the fixed prompts, and the scorer's verdict (on its selection, or on the grid)."""
        args = (self.frozen, self.cfg, self.state["scaling_factor"], *self.sample_size)
        with self.evaluated_weights() as model:
            images = sample_grid(model, *args)
            if self.scorer is None:
                scores = {}
            elif self.selection is not None:
                scores = score_selection(model, *args, self.scorer)
            else:
                scores = self.scorer(images, self.cfg.sample.prompts)
        path = self.out_dir / "samples" / f"step-{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cols = math.ceil(math.sqrt(len(images)))
        make_image_grid(images, rows=math.ceil(len(images) / cols), cols=cols).save(path)
        return path, scores if isinstance(scores, dict) else {"score": float(scores)}

    def evaluate(self) -> bool:
        """Validation loss (and sample score), the best checkpoint exported when it improved; True when
        early stopping says stop."""
        from accelerate.utils import broadcast_object_list

        acc, state = self.accelerator, self.state
        val, scores = self.validation_loss(), {}
        if self.scorer is not None and acc.is_main_process:
            path, scores = self.sample(state["step"])
            self.grids.append(path)
        # rank 0's figures decide for every rank, so all stop (and save) at the same step
        val, scores = broadcast_object_list([val, scores], from_process=0)
        score = scores.get("score")
        metric = -score if score is not None else val  # with a scorer, "better" is the sample score
        logged = {"val_loss": val, **{("sample_score" if k == "score" else f"sample_{k}"): v for k, v in scores.items()}}
        state["history"].append({"step": state["step"], "sample_score": None} | logged)
        acc.log(logged, step=state["step"])
        if state["best_val"] is None or metric < state["best_val"] - 1e-6:
            state["best_val"], state["best_step"], state["bad_evals"] = metric, state["step"], 0
            if acc.is_main_process:
                self.export("best")
            return False
        state["bad_evals"] += 1
        patience = self.stage.early_stopping_patience
        return bool(patience and state["bad_evals"] >= patience)

    def export(self, name: str) -> Path:
        """A full pipeline folder, or for LoRA the adapter's weights naming their base."""
        with self.evaluated_weights() as model:
            if self.stage.lora is not None:
                from model.lora import export_lora

                folder = export_lora(self.out_dir / name, model, self.frozen.family, self.init_from)
            else:
                folder = export_pipeline(self.out_dir / name, model, self.frozen, self.cfg, self.state["scaling_factor"])
        if self.selection is not None:  # the evaluation stage leaves these prompts out of what it reports
            from model.evaluation.prompts import SELECTION_FILE

            (folder / SELECTION_FILE).write_text(json.dumps(self.selection, indent=1))
        return folder

    def checkpoint(self) -> None:
        save_checkpoint(self.ckpt_root, self.state["step"], self.accelerator.unwrap_model(self.unet), self.optimizer,
                        self.lr_scheduler, self.ema, self.state, self.cfg)
        prune_checkpoints(self.ckpt_root, self.stage.keep_checkpoints)


def run_stage(cfg: Config, stage: StageConfig, data_dir: Path, out_dir: Path, frozen: Frozen,
              init_from: Path | None = None, sample_scorer: SampleScorer | None = None,
              progress: bool = True) -> StageResult:
    from tqdm import tqdm

    run = StageRun(cfg, stage, data_dir, out_dir, frozen, init_from, sample_scorer)
    acc, state, main = run.accelerator, run.state, run.accelerator.is_main_process
    bar = tqdm(range(state["step"], stage.max_steps), initial=state["step"], total=stage.max_steps,
               desc=stage.name, disable=not (progress and main))
    t0, seen0, stopped = time.perf_counter(), state["images_seen"], "max_steps"
    for step in bar:
        result = run.train_step(step)
        if result is None:
            stopped, last = f"nan at step {step}", latest_checkpoint(run.ckpt_root)
            log.error("non-finite loss at step %d: stopping; the last good checkpoint is %s", step,
                      last.name if last else "none (no checkpoint was saved before this step)")
            break
        step_loss, parts = result
        rate = (state["images_seen"] - seen0) / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix(loss=f"{step_loss:.4f}", img_s=f"{rate:.1f}")
        acc.log({"loss": step_loss, **{f"loss_{k}": v for k, v in parts.items()},
                 "lr": run.lr_scheduler.get_last_lr()[0], "images_per_s": rate}, step=state["step"])
        done = state["step"] == stage.max_steps
        if (state["step"] % stage.eval_every == 0 or done) and run.evaluate():
            stopped = "early_stopping"
        if (state["step"] % stage.sample_every == 0 or done) and main:
            if not run.grids or run.grids[-1].name != f"step-{state['step']:07d}.png":
                run.grids.append(run.sample(state["step"])[0])
        if (state["step"] % stage.checkpoint_every == 0 or done or stopped != "max_steps") and main:
            run.checkpoint()
        if stopped != "max_steps":
            break
    for tracker in acc.trackers:  # not end_training(): that also ends the process group the next stage needs
        tracker.finish()

    out_dir = run.out_dir
    final = run.export("final") if main and state["step"] > 0 else out_dir / "final"
    best = out_dir / "best" if (out_dir / "best").is_dir() else final
    best_eval = next((h for h in state["history"] if h["step"] == state["best_step"]), {})
    result = StageResult(stage=stage.name, out_dir=out_dir, checkpoint=best, final=final, grids=run.grids,
                         steps=state["step"], stopped=stopped, best_step=state["best_step"],
                         best_val_loss=best_eval.get("val_loss"), best_sample_score=best_eval.get("sample_score"),
                         data_report=run.cache.meta["report"], processes=run.world,
                         accumulation_steps=run.accumulation, pixel_loss_weight=float(run.stage.pixel_loss_weight),
                         pixel_calibration=state.get("pixel_calibration"))
    if main:
        extra = {"history": state["history"]} | ({"selection_prompts": run.selection} if run.selection else {})
        (out_dir / "report.json").write_text(json.dumps(asdict(result) | extra, default=str, indent=1))
    acc.wait_for_everyone()  # every rank returns once final/ and report.json exist
    return result


def _optimizer(stage: StageConfig, params: list) -> torch.optim.Optimizer:
    if stage.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ConfigError(f"stage {stage.name}: optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes, "
                             f"CUDA only); or use adamw") from error
        return bnb.optim.AdamW8bit(params, lr=stage.learning_rate, weight_decay=1e-2)
    return torch.optim.AdamW(params, lr=stage.learning_rate, weight_decay=1e-2)


def _bucket_hw(cache: LatentCache) -> tuple[int, int]:
    """Sample size: the most populated bucket."""
    biggest = max(cache.meta["buckets"], key=lambda b: b["count"])
    return tuple(biggest["size"])


# --- the stages ------------------------------------------------------------------------------------


def ensure_autoencoder(cfg: Config, data_dir: Path, out_dir: Path, progress: bool = True) -> dict | None:
    """Train the ``kl`` autoencoder once (on the given images) when its folder holds none; returns its
    PSNR/SSIM when trained now."""
    if cfg.autoencoder.kind != "kl":
        return None
    path = Path(cfg.autoencoder.path) if cfg.autoencoder.path else out_dir / "autoencoder"
    if (path / "config.json").is_file():
        return None
    items, _ = read_captioned(data_dir, "skip")
    ae = cfg.autoencoder
    # the run sees train_steps x train_batch_size images, plus a tenth held out: load no more than that
    # (a 200K pool held as float tensors would not fit in memory)
    cap = ae.train_steps * ae.train_batch_size * 10 // 9 + 1
    if len(items) > cap:
        items = random.Random(cfg.seed).sample(items, cap)
        log.info("autoencoder: training on a seeded sample of %d of the images", cap)
    res = ae.train_resolution
    images = []
    for item in items:
        try:
            images.append(crop_to_bucket(item.load(), (res, res)))
        except Exception as e:  # unreadable images are reported by the cache step with the reason
            log.warning("autoencoder: skipping %s (%s)", item.key, e)
    if len(images) < 2:
        raise DataError(f"{data_dir}: {len(images)} readable images; training the autoencoder needs at least 2")
    x = torch.stack(images)
    n_val = max(1, len(x) // 10)
    metrics = train_autoencoder(cfg.autoencoder, x[n_val:], x[:n_val], path, cfg.seed, progress)
    (path / "metrics.json").write_text(json.dumps(metrics))
    return metrics


def pretrain(cfg: Config, pool_dir: Path, out_dir: Path, frozen: Frozen, progress: bool = True) -> list[StageResult]:
    """Progressive-resolution pre-training (Emu §3.2): each stage starts from the previous one's final
    weights; a finished stage (its ``final/`` exists) is skipped on rerun."""
    if not cfg.pretrain:
        raise ConfigError("the config has no pretrain stages; give a base checkpoint instead")
    results, base = [], None
    for i, stage in enumerate(cfg.pretrain):
        stage_dir = out_dir / "pretrain" / f"{i:02d}-{stage.name}"
        if (stage_dir / "final" / "model_index.json").is_file() and (stage_dir / "report.json").is_file():
            base = stage_dir / "final"
            continue
        results.append(run_stage(cfg, stage, pool_dir, stage_dir, frozen, init_from=base, progress=progress))
        if results[-1].stopped.startswith("nan"):
            raise RuntimeError(f"pretraining stage {stage.name} stopped: {results[-1].stopped}")
        base = results[-1].final
    return results


def pretrained_base(cfg: Config, out_dir: Path) -> Path | None:
    """The final pipeline of the last pre-training stage, when it exists."""
    if not cfg.pretrain:
        return None
    final = out_dir / "pretrain" / f"{len(cfg.pretrain) - 1:02d}-{cfg.pretrain[-1].name}" / "final"
    return final if (final / "model_index.json").is_file() else None


def train_quality_tuned(data_dir: str | Path, out_dir: str | Path, preset: str | Path = "tiny", *,
                        base: str | Path | None = None, pool_dir: str | Path | None = None,
                        overrides: list[str] | None = None, sample_scorer: SampleScorer | None = None,
                        progress: bool = True) -> QualityTuneResult:
    """Quality-tune on the curated set in ``data_dir`` (Emu §3.3) and return where the checkpoint and the
    sample grids are. ``base``: a pipeline folder or staged hub id, needles' own or a public SD 1.x/2.x
    or SDXL base (model/bases.py). Without it, pre-trains first on ``pool_dir`` (or, for a smoke run, on
    the curated set itself), reusing a finished pre-training under ``out_dir``."""
    cfg = load_config(preset, overrides)
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_path = resolve_base(base) if base else None  # cheap checks first: a wrong base fails at once
    family = base_family(base_path) if base_path else "needles"
    ranks = process_state()  # under `accelerate launch` / torchrun: one process per device
    if ranks.is_main_process:
        cfg.save(out_dir / "config.yaml")
        if sample_scorer is None and cfg.sample.score is not None:
            from model.evaluation import PipelineSampleScorer

            # loads CLIP and the aesthetic head (or, for kid, the curated images' features) now: missing
            # weights fail before any training
            sample_scorer = PipelineSampleScorer(cfg.sample.score, reference=data_dir, seed=cfg.seed)
    stages: list[StageResult] = []
    ae_metrics = None
    if family != "needles":  # a public base brings its own frozen models and schedule
        frozen = load_base_frozen(base_path, family)
        cfg = base_diffusion(cfg, frozen)
        if cfg.quality_tune.resolution is None:  # the base's own
            cfg.quality_tune.resolution = native_resolution(base_path)
        if ranks.is_main_process:
            cfg.save(out_dir / "config.yaml")
        log.info("quality-tuning a %s base (%s; %s, %s)", family, base_path, cfg.diffusion.prediction_type,
                 f"LoRA rank {cfg.quality_tune.lora.rank}" if cfg.quality_tune.lora else "full fine-tuning")
    else:
        if any(s.resolution is None for s in [*cfg.pretrain, cfg.quality_tune]):
            raise ConfigError("a stage's resolution is null (the base's native size), but there is no public base: "
                             "set quality_tune.resolution, or give --base")
        with ranks.main_process_first():  # rank 0 trains the autoencoder; the others then load it
            ae_metrics = ensure_autoencoder(cfg, Path(pool_dir or data_dir), out_dir, progress)
        frozen = load_frozen(cfg, out_dir / "autoencoder")
        base_path = base_path or pretrained_base(cfg, out_dir)
        if base_path is None:
            if pool_dir is None:
                log.warning("no base checkpoint and no pool: pre-training on the curated set itself (smoke run only)")
            stages += pretrain(cfg, Path(pool_dir or data_dir), out_dir, frozen, progress)
            base_path = pretrained_base(cfg, out_dir)
    qt = run_stage(cfg, cfg.quality_tune, data_dir, out_dir / "quality_tune", frozen, init_from=base_path,
                   sample_scorer=sample_scorer, progress=progress)
    stages.append(qt)
    if qt.stopped.startswith("nan"):
        raise RuntimeError(f"quality-tuning stopped: {qt.stopped}; last good checkpoint in {qt.out_dir / 'checkpoints'}")
    return QualityTuneResult(checkpoint=qt.checkpoint, grids=qt.grids, base=base_path, autoencoder_metrics=ae_metrics,
                             stages=stages)
