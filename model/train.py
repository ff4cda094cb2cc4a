"""One training loop for pre-training and quality-tuning (nanoGPT-shaped: read it top to bottom).

    train_quality_tuned(data_dir, out_dir, preset)   # what `make train-qt` and the Prefect flow call
      -> ensure_autoencoder   (train the `kl` autoencoder once if the config asks for one)
      -> pretrain             (progressive-resolution stages on the pool; skipped when a base exists)
      -> run_stage(quality_tune)

``run_stage`` is the loop. Everything random in a step is drawn from generators seeded by (seed, draw
index), and the batch of a draw is a pure function of it (data.BalancedBucketSampler), so a resumed run
repeats the uninterrupted one exactly; the optimizer, LR schedule, EMA and early-stopping state are in
the checkpoint.

Output of a stage directory:
    checkpoints/step-0000500/   unet/ (safetensors), ema.pt, training_state.pt, config.yaml
    checkpoints/latest.json     points at the newest complete checkpoint (replaced atomically)
    best/                       diffusers pipeline of the best validation step (StableDiffusionPipeline)
    final/                      diffusers pipeline at the last step
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
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, EDMEulerScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils import make_image_grid

from model import diffusion as D
from model.autoencoder import (ChannelMismatchError, decode_latents, downsample_factor,
                               encode_latents, latent_channels, load_autoencoder, train_autoencoder)
from model.config import Config, StageConfig, load_config
from model.data import (BalancedBucketSampler, DataError, LatentCache, build_cache, crop_to_bucket,
                        read_captioned, split_validation)
from model.text import encode_prompts, load_text_encoder

log = logging.getLogger(__name__)

# (PIL images, prompts) -> a score, higher is better, or {"score": ..., other parts logged beside it}
# (model.evaluation.PipelineSampleScorer, built from the config's sample.score)
SampleScorer = Callable[[list, list[str]], "float | dict[str, float]"]


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (e.g. disk full); ``latest`` still points at the previous one."""


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


@dataclass
class QualityTuneResult:
    checkpoint: Path
    grids: list[Path]
    base: Path
    autoencoder_metrics: dict | None
    stages: list[StageResult]


# --- models --------------------------------------------------------------------------------------


@dataclass
class Frozen:
    """What a stage does not train: tokenizer, text encoder, autoencoder."""

    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module


def load_frozen(cfg: Config, autoencoder_dir: Path | None) -> Frozen:
    tokenizer, text_encoder = load_text_encoder(cfg.text_encoder, cfg.seed)
    return Frozen(tokenizer, text_encoder, load_autoencoder(cfg.autoencoder, autoencoder_dir))


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


def sampling_scheduler(cfg: Config):
    """The diffusers scheduler that samples what the training math trains (same schedule and targets)."""
    d = cfg.diffusion
    if d.schedule == "edm":
        return EDMEulerScheduler(sigma_min=d.sigma_min, sigma_max=d.sigma_max, sigma_data=d.sigma_data,
                                 prediction_type="epsilon", num_train_timesteps=d.num_train_timesteps)
    zero_snr = d.schedule == "zero_snr"
    return DDIMScheduler(num_train_timesteps=d.num_train_timesteps, beta_start=d.beta_start, beta_end=d.beta_end,
                         beta_schedule="scaled_linear", prediction_type=d.prediction_type, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, rescale_betas_zero_snr=zero_snr,
                         # ZSNR §3.3: sample from the last (pure-noise) step, which "leading" spacing skips
                         timestep_spacing="trailing" if zero_snr else "leading")


def training_alphas_cumprod(cfg: Config) -> torch.Tensor:
    d = cfg.diffusion
    betas = D.scaled_linear_betas(d.num_train_timesteps, d.beta_start, d.beta_end)
    if d.schedule == "zero_snr":
        betas = D.rescale_zero_terminal_snr(betas)
    return D.alphas_cumprod(betas).float()


# --- the loss --------------------------------------------------------------------------------------


def diffusion_loss(unet: torch.nn.Module, z: torch.Tensor, text: torch.Tensor, cfg: Config, stage: StageConfig,
                   generator: torch.Generator, alphas_bar: torch.Tensor,
                   decode: Callable[[torch.Tensor], torch.Tensor] | None) -> tuple[torch.Tensor, dict[str, float]]:
    """L = L_latent + λ L_pixel (PS eq. 3) for scaled latents z. ``decode`` maps scaled latents to pixels
    (needed only when λ > 0)."""
    d = cfg.diffusion
    b = z.shape[0]
    eps = D.offset_noise(tuple(z.shape), stage.noise_offset, generator).to(z.device, z.dtype)
    if d.schedule == "edm":
        sigma = D.edm_training_sigmas(b, d.p_mean, d.p_std, generator).to(z.device, torch.float32)
        a, s = torch.ones_like(sigma), sigma
        z_t = D.add_noise(z, eps, a, s)
        _, _, c_in, c_noise = D.edm_preconditioning(sigma, d.sigma_data)
        out = unet(D._bc(c_in, z_t) * z_t, c_noise, encoder_hidden_states=text).sample
        target = D.edm_target(z, z_t, sigma, d.sigma_data)
        weights = torch.ones(b, device=z.device)
        eps_hat = D.edm_predicted_noise(out, z_t, sigma, d.sigma_data) if stage.pixel_loss_weight else None
    else:
        t = torch.randint(0, d.num_train_timesteps, (b,), generator=generator).to(z.device)
        ab = alphas_bar.to(z.device)[t]
        a, s = D.ddpm_scales(ab)
        z_t = D.add_noise(z, eps, a, s)
        out = unet(z_t, t, encoder_hidden_states=text).sample
        target = D.ddpm_target(d.prediction_type, z, eps, a, s)
        weights = (D.min_snr_weights(D.snr_from_alphas_cumprod(ab), d.min_snr_gamma, d.prediction_type)
                   if d.min_snr_gamma else torch.ones(b, device=z.device))
        eps_hat = D.ddpm_predicted_noise(d.prediction_type, out, z_t, a, s) if stage.pixel_loss_weight else None
    latent = (weights * F.mse_loss(out.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))).mean()
    parts = {"latent": latent.item()}
    loss = latent
    if stage.pixel_loss_weight:
        pixel = D.pixel_space_loss(decode, z, eps, eps_hat, a, s)
        loss = loss + stage.pixel_loss_weight * pixel
        parts["pixel"] = pixel.item()
    return loss, parts


def _generator(seed: int, *stream: int) -> torch.Generator:
    """An independent generator per (seed, purpose, draw): any draw can be replayed on its own."""
    return torch.Generator().manual_seed(hash((seed, *stream)) & 0x7FFF_FFFF_FFFF_FFFF)


# --- checkpoints --------------------------------------------------------------------------------------


def save_checkpoint(ckpt_root: Path, step: int, unet, optimizer, lr_scheduler, ema, state: dict, cfg: Config) -> Path:
    """Write everything to a temporary folder, rename it into place, then repoint ``latest.json`` with an
    atomic replace. A failure at any point (disk full) leaves ``latest`` on the previous checkpoint."""
    final = ckpt_root / f"step-{step:07d}"
    tmp = ckpt_root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
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


def stock_pipeline(unet, frozen: Frozen, cfg: Config, scaling_factor: float) -> StableDiffusionPipeline:
    """The stock diffusers pipeline around ``unet`` and the frozen models (what is saved and sampled)."""
    frozen.vae.register_to_config(scaling_factor=scaling_factor)
    return StableDiffusionPipeline(vae=frozen.vae, text_encoder=frozen.text_encoder, tokenizer=frozen.tokenizer,
                                   unet=unet, scheduler=sampling_scheduler(cfg), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def export_pipeline(out: Path, unet, frozen: Frozen, cfg: Config, scaling_factor: float) -> Path:
    """A StableDiffusionPipeline folder; ``model.pipeline.load_pipeline(out)`` loads it (see there)."""
    pipe = stock_pipeline(unet, frozen, cfg, scaling_factor)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    # model_index.json names the stock diffusers parent class (AutoencoderKL / AutoencoderTiny) so that
    # from_pretrained accepts the subclass load_pipeline passes in; vae/config.json keeps the real class
    index = json.loads((tmp / "model_index.json").read_text())
    index["vae"] = ["diffusers", next(c.__name__ for c in type(frozen.vae).__mro__ if c.__module__.startswith("diffusers"))]
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    cfg.save(tmp / "needles_config.yaml")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


@torch.no_grad()
def sample_grid(unet, frozen: Frozen, cfg: Config, scaling_factor: float, height: int, width: int,
                prompts: list[str] | None = None, steps: int | None = None, seed: int | None = None):
    """Images of the fixed prompts (or ``prompts``), seeded with sample.seed (or ``seed``), as PIL images."""
    pipe = stock_pipeline(unet, frozen, cfg, scaling_factor)
    pipe.set_progress_bar_config(disable=True)
    prompts = prompts or cfg.sample.prompts
    gen = torch.Generator().manual_seed(cfg.sample.seed if seed is None else seed)
    return pipe(prompts, height=height, width=width, num_inference_steps=steps or cfg.sample.num_inference_steps,
                guidance_scale=cfg.sample.guidance_scale, generator=gen,
                # zero-SNR models over-expose under CFG without it (ZSNR §3.4)
                guidance_rescale=0.7 if cfg.diffusion.schedule == "zero_snr" else 0.0).images


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
        raise DataError(f"{data_dir}: {len(items)} usable captioned images ({len(report.missing_caption)} without a "
                        f"caption skipped); stage {stage.name} needs at least {stage.min_images}")
    cache = build_cache(
        items, cache_root / f"{cfg.model_hash()}-{stage.resolution}", stage.resolution, cfg.data.bucket_aspect_ratios,
        encode_images=lambda x: encode_latents(frozen.vae, x.to(frozen.vae.device)).cpu(),
        encode_text=lambda p: encode_prompts(frozen.tokenizer, frozen.text_encoder, p).cpu(),
        fingerprint=cfg.model_hash(), min_per_bucket=stage.micro_batch, report=report)
    if len(cache) < stage.min_images:
        raise DataError(f"{data_dir}: only {len(cache)} images could be decoded (unreadable: "
                        f"{list(cache.meta['report']['unreadable'].items())[:3]}); stage {stage.name} needs at least "
                        f"{stage.min_images}")
    return cache


def run_stage(cfg: Config, stage: StageConfig, data_dir: Path, out_dir: Path, frozen: Frozen,
              init_from: Path | None = None, sample_scorer: SampleScorer | None = None,
              progress: bool = True) -> StageResult:
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list
    from tqdm import tqdm

    out_dir = Path(out_dir)
    ckpt_root = out_dir / "checkpoints"
    ranks = process_state()
    # the frozen models work where the UNet trains: the cache is encoded there, samples are drawn there
    frozen.vae.to(ranks.device)
    frozen.text_encoder.to(ranks.device)
    with ranks.main_process_first():  # rank 0 encodes the cache; the others then reuse it
        cache = prepare_cache(cfg, stage, Path(data_dir), frozen, out_dir.parent / "cache")
    train_idx, val_idx = split_validation(cache.sizes, stage.val_fraction, cfg.seed)

    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, log_with="tensorboard", project_dir=out_dir / "tb",
                              cpu=ranks.device.type == "cpu")
    world = accelerator.num_processes
    if stage.batch_size % (stage.micro_batch * world):
        raise ValueError(f"batch_size {stage.batch_size} is not a multiple of micro_batch {stage.micro_batch} x "
                         f"{world} processes")
    accumulation = stage.batch_size // (stage.micro_batch * world)
    sampler = BalancedBucketSampler(train_idx, stage.micro_batch, cfg.seed)

    # the latent scale: inherited from the base (its UNet learned that scale), else the config's, else
    # chosen so latents have the std the schedule expects (1 for DDPM, sigma_data for EDM)
    target_std = cfg.diffusion.sigma_data if cfg.diffusion.schedule == "edm" else 1.0
    if init_from is not None:
        unet = load_base_unet(init_from, frozen)
        scaling_factor = json.loads((init_from / "vae" / "config.json").read_text())["scaling_factor"]
    else:
        unet = build_unet(cfg, frozen, stage.resolution)
        scaling_factor = cfg.autoencoder.scaling_factor or target_std / cache.meta["latent_rms"]
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=stage.learning_rate, weight_decay=1e-2)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=stage.warmup_steps)
    ema = (EMAModel(unet.parameters(), decay=stage.ema_decay, use_ema_warmup=True, power=3 / 4,
                    model_cls=UNet2DConditionModel, model_config=unet.config) if stage.ema_decay else None)
    # best_val: the best early-stopping metric so far (held-out loss, or minus the sample score)
    state = {"step": 0, "best_val": None, "best_step": None, "bad_evals": 0, "images_seen": 0,
             "scaling_factor": scaling_factor, "history": []}

    resume = latest_checkpoint(ckpt_root)
    if resume is not None:
        unet.load_state_dict(UNet2DConditionModel.from_pretrained(resume / "unet").state_dict())
        saved = torch.load(resume / "training_state.pt", weights_only=False)
        optimizer.load_state_dict(saved["optimizer"])
        lr_scheduler.load_state_dict(saved["lr_scheduler"])
        state = saved["state"]
        scaling_factor = state["scaling_factor"]
        if ema is not None:
            ema.load_state_dict(torch.load(resume / "ema.pt", weights_only=False))
        log.info("resuming %s from step %d (%s)", stage.name, state["step"], resume)

    unet, optimizer = accelerator.prepare(unet, optimizer)
    device = accelerator.device
    if ema is not None:
        ema.to(device)
    alphas_bar = training_alphas_cumprod(cfg)
    decode = lambda z: decode_latents(frozen.vae, z / scaling_factor)  # noqa: E731
    accelerator.init_trackers(stage.name)
    grids: list[Path] = sorted((out_dir / "samples").glob("step-*.png"))
    stopped = "max_steps"
    last_sample_size = _bucket_hw(cache)

    @contextlib.contextmanager
    def evaluated_weights():
        """The unwrapped UNet in eval mode carrying the EMA weights (when EMA is on), restored after."""
        model = accelerator.unwrap_model(unet)
        if ema is not None:
            ema.store(model.parameters())
            ema.copy_to(model.parameters())
        model.eval()
        try:
            yield model
        finally:
            model.train()
            if ema is not None:
                ema.restore(model.parameters())

    def evaluate(step: int) -> float:
        """Held-out loss with fixed noise and timesteps (EMA weights when EMA is on)."""
        losses = []
        with evaluated_weights() as model, torch.no_grad():
            for b, members in enumerate(val_idx):
                for start in range(0, len(members), stage.micro_batch):
                    z, text = cache.gather(b, members[start:start + stage.micro_batch])
                    loss, _ = diffusion_loss(model, z.to(device) * scaling_factor, text.to(device), cfg, stage,
                                             _generator(cfg.seed, 2, b, start), alphas_bar, decode)
                    losses.append(loss.item())
        return sum(losses) / len(losses)

    # a scorer with its own prompt selection (PipelineSampleScorer) scores those x its seeds; a plain
    # callable scores the fixed prompts' grid
    selection = getattr(sample_scorer, "selection_record", lambda: None)()

    def sample(step: int) -> tuple[Path, dict[str, float]]:
        with evaluated_weights() as model:
            images = sample_grid(model, frozen, cfg, scaling_factor, *last_sample_size)
            if sample_scorer is None:
                scores = {}
            elif selection is not None:
                scores = score_selection(model, frozen, cfg, scaling_factor, *last_sample_size, sample_scorer)
            else:
                scores = sample_scorer(images, cfg.sample.prompts)
        path = out_dir / "samples" / f"step-{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cols = math.ceil(math.sqrt(len(images)))
        make_image_grid(images, rows=math.ceil(len(images) / cols), cols=cols).save(path)
        return path, scores if isinstance(scores, dict) else {"score": float(scores)}

    def export(name: str) -> Path:
        with evaluated_weights() as model:
            folder = export_pipeline(out_dir / name, model, frozen, cfg, scaling_factor)
        if selection is not None:  # the evaluation stage leaves these prompts out of what it reports
            from model.evaluation.prompts import SELECTION_FILE

            (folder / SELECTION_FILE).write_text(json.dumps(selection, indent=1))
        return folder

    bar = tqdm(range(state["step"], stage.max_steps), initial=state["step"], total=stage.max_steps,
               desc=stage.name, disable=not (progress and accelerator.is_main_process))
    t0, seen0 = time.perf_counter(), state["images_seen"]
    for step in bar:
        # --- one optimizer step = `accumulation` micro-batches, each from one bucket ---
        parts: dict[str, float] = {}
        step_loss = 0.0
        for micro in range(accumulation):
            draw = (step * accumulation + micro) * world + accelerator.process_index
            bucket, indices = sampler.batch(draw)
            z, text = cache.gather(bucket, indices)
            gen = _generator(cfg.seed, 1, draw)
            drop = torch.rand(len(indices), generator=gen) < stage.caption_dropout  # classifier-free guidance
            text[drop] = cache.empty_text
            with accelerator.autocast():
                loss, parts = diffusion_loss(unet, z.to(device) * scaling_factor, text.to(device), cfg, stage, gen,
                                             alphas_bar, decode)
            if not bool(accelerator.gather(torch.isfinite(loss.detach()).reshape(1)).all()):
                stopped = f"nan at step {step}"
                break
            # DDP all-reduces the gradients on the last micro-batch of the step only
            with accelerator.no_sync(unet) if micro < accumulation - 1 else contextlib.nullcontext():
                accelerator.backward(loss / accumulation)
            step_loss += loss.item() / accumulation
        if stopped != "max_steps":
            last = latest_checkpoint(ckpt_root)
            log.error("non-finite loss at step %d: stopping; the last good checkpoint is %s", step,
                      last.name if last else "none (no checkpoint was saved before this step)")
            break
        if stage.grad_clip:
            accelerator.clip_grad_norm_(unet.parameters(), stage.grad_clip)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(accelerator.unwrap_model(unet).parameters())
        state["step"] = step + 1
        state["images_seen"] += stage.batch_size

        rate = (state["images_seen"] - seen0) / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix(loss=f"{step_loss:.4f}", img_s=f"{rate:.1f}")
        accelerator.log({"loss": step_loss, **{f"loss_{k}": v for k, v in parts.items()},
                         "lr": lr_scheduler.get_last_lr()[0], "images_per_s": rate}, step=state["step"])

        done = state["step"] == stage.max_steps
        if state["step"] % stage.eval_every == 0 or done:
            val = evaluate(state["step"])
            scores: dict[str, float] = {}
            if sample_scorer is not None and accelerator.is_main_process:
                path, scores = sample(state["step"])
                grids.append(path)
            # rank 0's figures decide for every rank, so all stop (and save) at the same step
            val, scores = broadcast_object_list([val, scores], from_process=0)
            score = scores.get("score")
            # with a scorer, "better" is the sample score; otherwise the held-out loss
            metric = -score if score is not None else val
            logged = {"val_loss": val, **{("sample_score" if k == "score" else f"sample_{k}"): v
                                          for k, v in scores.items()}}
            state["history"].append({"step": state["step"], "sample_score": None} | logged)
            accelerator.log(logged, step=state["step"])
            if state["best_val"] is None or metric < state["best_val"] - 1e-6:
                state["best_val"], state["best_step"], state["bad_evals"] = metric, state["step"], 0
                if accelerator.is_main_process:
                    export("best")
            else:
                state["bad_evals"] += 1
                if stage.early_stopping_patience and state["bad_evals"] >= stage.early_stopping_patience:
                    stopped = "early_stopping"
        if (state["step"] % stage.sample_every == 0 or done) and accelerator.is_main_process:
            if not grids or grids[-1].name != f"step-{state['step']:07d}.png":
                grids.append(sample(state["step"])[0])
        if (state["step"] % stage.checkpoint_every == 0 or done or stopped != "max_steps") \
                and accelerator.is_main_process:
            save_checkpoint(ckpt_root, state["step"], accelerator.unwrap_model(unet), optimizer, lr_scheduler, ema,
                            state, cfg)
            prune_checkpoints(ckpt_root, stage.keep_checkpoints)
        if stopped != "max_steps":
            break
    for tracker in accelerator.trackers:  # not end_training(): that also ends the process group the next stage needs
        tracker.finish()

    final = export("final") if accelerator.is_main_process and state["step"] > 0 else out_dir / "final"
    best = out_dir / "best" if (out_dir / "best").is_dir() else final
    best_eval = next((h for h in state["history"] if h["step"] == state["best_step"]), {})
    result = StageResult(stage=stage.name, out_dir=out_dir, checkpoint=best, final=final, grids=grids,
                         steps=state["step"], stopped=stopped, best_step=state["best_step"],
                         best_val_loss=best_eval.get("val_loss"), best_sample_score=best_eval.get("sample_score"),
                         data_report=cache.meta["report"], processes=world,
                         accumulation_steps=accumulation)
    if accelerator.is_main_process:
        extra = {"history": state["history"]} | ({"selection_prompts": selection} if selection else {})
        (out_dir / "report.json").write_text(json.dumps(asdict(result) | extra, default=str, indent=1))
    accelerator.wait_for_everyone()  # every rank returns once final/ and report.json exist
    return result


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
        raise ValueError("the config has no pretrain stages; give a base checkpoint instead")
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
    sample grids are. Without ``base``, pre-trains first on ``pool_dir`` (or, for a smoke run, on the
    curated set itself), reusing a finished pre-training under ``out_dir``."""
    cfg = load_config(preset, overrides)
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ranks = process_state()  # under `accelerate launch` / torchrun: one process per device
    if ranks.is_main_process:
        cfg.save(out_dir / "config.yaml")
        if sample_scorer is None and cfg.sample.score is not None:
            from model.evaluation import PipelineSampleScorer

            # loads CLIP and the aesthetic head (or, for kid, the curated images' features) now: missing
            # weights fail before any training
            sample_scorer = PipelineSampleScorer(cfg.sample.score, reference=data_dir, seed=cfg.seed)
    with ranks.main_process_first():  # rank 0 trains the autoencoder; the others then load it
        ae_metrics = ensure_autoencoder(cfg, Path(pool_dir or data_dir), out_dir, progress)
    frozen = load_frozen(cfg, out_dir / "autoencoder")
    stages: list[StageResult] = []
    base_path = Path(base) if base else pretrained_base(cfg, out_dir)
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
