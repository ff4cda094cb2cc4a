"""Training-step throughput of quality-tuning the public bases, side by side in one run:

    sd15-full   SD-1.5 UNet (diffusers' standard UNet2DConditionModel config, 859.5M, cross-attention 768),
                full fine-tune at 512 px, conditioned on {"text": (B, 77, 768)}
    sdxl-lora   SDXL base UNet (2567.5M: blocks 320/640/1280, transformer depths 1/2/10, 5/10/20 heads,
                cross-attention 2048, "text_time" micro-conditioning), LoRA (rank 16, diffusers' default
                targets to_q/to_k/to_v/to_out.0) at 1024 px, conditioned on {"text": (B, 77, 2048),
                "pooled": (B, 1280), "time_ids": (B, 6)}

each with the latent loss only (λ = 0) and with the pixel-space loss (λ > 0, PS eq. 3), which decodes
through a frozen AutoencoderKL of the real SD/SDXL VAE shape (83.7M) and backpropagates through it.
EVERY MODEL HAS RANDOM WEIGHTS, built from config at the real shapes (FLOPs and memory are what is measured,
not what the models say). The step is the one the repo trains: model.objective.diffusion_loss under bf16
autocast (fp32 master weights, as model/train.py's Accelerator does), backward, gradient clipping at 1.0 and
AdamW over the trainable parameters only (EMA is left out).

GPU (H100/H200; benchmarks/device/run.sh public-bases runs it on a lent machine):
    python benchmarks/bench_public_bases.py                       # both cases, eager
    python benchmarks/bench_public_bases.py --grad-checkpointing  # UNet (and decoder) recompute
    python benchmarks/bench_public_bases.py --compile             # torch.compile'd UNet
CPU smoke (tiny UNets of both kinds and a tiny VAE, 64 px, fp32; proves the script runs):
    python benchmarks/bench_public_bases.py --tiny
FLOPs per sample of each part at the real shapes, counted on meta tensors (no device, seconds):
    python benchmarks/bench_public_bases.py --flops-only

Prints per case and λ: images/s, step time, peak GPU memory (torch.cuda.max_memory_allocated over the timed
steps), trainable parameters, FLOPs of one fwd+bwd (torch.utils.flop_counter, counted on the eager model,
recomputation included when gradient checkpointing is on) and MFU against --peak-tflops (default 989 =
H100/H200 dense bf16). A case that runs out of GPU memory prints OOM and, unless --no-oom-retry, is rerun
with gradient checkpointing.
"""

from __future__ import annotations

import argparse
import gc
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from model.config import LoraConfig, load_config
from model.objective import diffusion_loss, generator as _generator, training_alphas_cumprod

SDXL_UNET = dict(block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)  # 1280 pooled + 6 time ids x 256
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4)
# the tiny (CPU smoke) versions: same block kinds and conditioning, a few channels
TINY_SD_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32)
TINY_SDXL_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                      attention_head_dim=(2, 4), cross_attention_dim=64, use_linear_projection=True,
                      addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=32 + 6 * 8)
TINY_VAE = dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8)


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    resolution: int
    batch: int  # default per-step batch: the public-full/public-lora presets' micro_batch_size
    lora: bool
    scaling_factor: float  # the real VAE's (SD 0.18215, SDXL 0.13025)
    pooled_dim: int | None  # SDXL: the pooled text embedding's width (text_embeds); None = SD


CASES = {
    "sd15-full": Case("sd15-full", "SD-1.5 UNet, RANDOM weights (diffusers' standard config, cross-attn 768), "
                      "full fine-tune", 512, 8, False, 0.18215, None),
    "sdxl-lora": Case("sdxl-lora", "SDXL base UNet, RANDOM weights (SDXL base config), LoRA", 1024, 8, True,
                      0.13025, 1280),
}


def build(case: Case, tiny: bool, device: torch.device):
    """(UNet, frozen VAE), built directly on ``device`` (random init of 2.6B parameters on the host is slow)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if tiny:
        unet_kw = TINY_SDXL_UNET if case.pooled_dim else TINY_SD_UNET
        vae_kw = TINY_VAE
    else:
        unet_kw = SDXL_UNET if case.pooled_dim else dict(cross_attention_dim=768)  # SD-1.5 = the defaults + 768
        vae_kw = SD_VAE
    n = len(vae_kw["block_out_channels"])
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(sample_size=case.resolution // 8, in_channels=4, out_channels=4, **unet_kw)
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                            sample_size=case.resolution, scaling_factor=case.scaling_factor, **vae_kw)
    return unet.to(memory_format=torch.channels_last).train(), vae.requires_grad_(False).eval()


def conditioning(case: Case, unet, batch: int, res: int, device) -> dict[str, torch.Tensor]:
    """Cached-latent-cache-shaped conditioning, as model.bases.unet_conditioning expects it."""
    cond = {"text": torch.randn(batch, 77, unet.config.cross_attention_dim, device=device)}
    if case.pooled_dim:
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        cond["pooled"] = torch.randn(batch, pooled, device=device)
        # (original h, w, crop top, left, target h, w) of each image (SDXL §2.2)
        ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32, device=device)
        cond["time_ids"] = ids.repeat(batch, 1)
    return cond


def set_checkpointing(unet, vae, on: bool, pixel: bool) -> None:
    """As model/train.py: UNet recompute, and the decoder's when the pixel loss backpropagates through it."""
    unet.enable_gradient_checkpointing() if on else unet.disable_gradient_checkpointing()
    vae.enable_gradient_checkpointing() if on and pixel else vae.disable_gradient_checkpointing()


def measure(step: Callable[[torch.nn.Module, int], None], unet, compiled, steps: int, warmup: int, device) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for k in range(warmup):  # warm-up (and compilation)
        step(compiled, k)
    sync()
    warm_s = time.perf_counter() - t0
    with FlopCounterMode(display=False) as counter:  # on the eager module: the same math, no tracing
        step(unet, 0)
    flops = counter.get_total_flops()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for k in range(steps):
        step(compiled, warmup + k)
    sync()
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else float("nan")
    return {"dt": dt, "flops": flops, "peak": peak, "warm_s": warm_s}


def run_case(case, unet, compiled, vae, cfg, lam, batch, res, steps, warmup, checkpointing, device, dtype) -> dict:
    stage = cfg.quality_tune.model_copy(update={
        "name": case.name, "resolution": res, "batch_size": batch, "micro_batch_size": None, "noise_offset": 0.1,
        "pixel_loss_weight": lam, "gradient_checkpointing": checkpointing,
        "learning_rate": 1e-4 if case.lora else 1e-5, "lora": LoraConfig() if case.lora else None})
    set_checkpointing(unet, vae, checkpointing, bool(lam))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=stage.learning_rate, weight_decay=1e-2, fused=device.type == "cuda")
    z = torch.randn(batch, 4, res // 8, res // 8, device=device)
    cond = conditioning(case, unet, batch, res, device)
    decode = lambda x: vae.decode(x / case.scaling_factor).sample  # noqa: E731  (model.autoencoder.decode_latents)
    ab = training_alphas_cumprod(cfg)

    def step(model, k):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss, _ = diffusion_loss(model, z, cond, cfg, stage, _generator(cfg.seed, 1, k), ab, decode)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, stage.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        return measure(step, unet, compiled, steps, warmup, device)
    finally:
        opt.state.clear()  # the next case's memory does not carry this one's Adam moments
        unet.zero_grad(set_to_none=True)


def count_flops(case: Case, tiny: bool, lora_rank: int) -> dict[str, float]:
    """FLOPs per sample of the step's parts at the real shapes, on meta tensors (no memory, no device):
    UNet forward and backward, decoder forward and backward (input gradients only: the VAE is frozen)."""
    unet, vae = build(case, tiny, torch.device("meta"))
    if case.lora:
        from model.lora import attach_lora

        attach_lora(unet, LoraConfig(rank=lora_rank))
    res = 64 if tiny else case.resolution
    z = torch.randn(1, 4, res // 8, res // 8, device="meta")
    cond = conditioning(case, unet, 1, res, "meta")
    from model.bases import unet_conditioning

    out = {}
    with FlopCounterMode(display=False) as c:
        pred = unet(z, torch.zeros(1, dtype=torch.long, device="meta"), **unet_conditioning(cond)).sample
    out["unet_fwd"] = c.get_total_flops()
    with FlopCounterMode(display=False) as c:
        pred.sum().backward()
    out["unet_bwd"] = c.get_total_flops()
    z = z.requires_grad_()
    with FlopCounterMode(display=False) as c:
        image = vae.decode(z).sample
    out["dec_fwd"] = c.get_total_flops()
    with FlopCounterMode(display=False) as c:
        image.sum().backward()
    out["dec_bwd"] = c.get_total_flops()
    return out


def print_flops(cases: list[str], tiny: bool, lora_rank: int) -> None:
    print(f"FLOPs per sample {'of the TINY stand-ins' if tiny else 'at the real shapes'} (meta tensors; TFLOP):")
    print("case       res   unet_fwd unet_bwd dec_fwd  dec_bwd  step(λ=0) "
          "step(λ>0: + target and prediction decode + bwd)")
    for name in cases:
        case = CASES[name]
        f = {k: v / 1e12 for k, v in count_flops(case, tiny, lora_rank).items()}
        lat = f["unet_fwd"] + f["unet_bwd"]
        pix = lat + 2 * f["dec_fwd"] + f["dec_bwd"]
        print(f"{name:<10} {64 if tiny else case.resolution:<5} {f['unet_fwd']:<8.4g} {f['unet_bwd']:<8.4g} "
              f"{f['dec_fwd']:<8.4g} {f['dec_bwd']:<8.4g} {lat:<9.4g} {pix:.4g} ({pix / lat:.2f}x)")


def fmt_row(case, res, batch, lam, checkpointing, m, trainable, peak_tflops, cuda) -> str:
    if m is None:
        return f"{case.name:<10} {res:<5} {batch:<5} {lam:<6} {'on' if checkpointing else 'off':<4} OOM"
    mfu = f"{m['flops'] / m['dt'] / (peak_tflops * 1e12):.1%}" if cuda else "n/a"
    peak = f"{m['peak'] / 2**30:.1f}" if cuda else "n/a"
    return (f"{case.name:<10} {res:<5} {batch:<5} {lam:<6} {'on' if checkpointing else 'off':<4} "
            f"{batch / m['dt']:<8.2f} {m['dt'] * 1e3:<9.1f} {peak:<9} {trainable / 1e6:<10.2f} "
            f"{m['flops'] / 1e12:<11.4g} {mfu:<7} {m['warm_s']:.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    p.add_argument("--batch", type=int, default=None, help="per-step batch of every case (default 8, the "
                   "micro-batch of the public-full/public-lora presets; --tiny 2)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row (after 3 warm-up steps)")
    p.add_argument("--pixel-weight", type=float, default=4.0, help="λ of the pixel-loss rows (the sd15 preset's)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--no-oom-retry", action="store_true", help="do not rerun an OOM row with gradient checkpointing")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (warm-up includes compilation)")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--tiny", action="store_true", help="CPU smoke: tiny UNets and VAE, 64 px, fp32")
    p.add_argument("--flops-only", action="store_true", help="only count each case's FLOPs per sample at the "
                   "real shapes on meta tensors (no device needed, seconds)")
    a = p.parse_args()
    if a.flops_only:
        return print_flops(a.cases, a.tiny, a.lora_rank)
    device = torch.device("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    # the schedule of SD-1.5 and SDXL base (scaled_linear 0.00085..0.012, ε-prediction), min-SNR γ = 5
    cfg = load_config("tiny", ["diffusion.schedule=scaled_linear", "diffusion.prediction_type=epsilon",
                               "diffusion.min_snr_gamma=5.0"])
    steps, warmup = (4, 2) if a.tiny else (a.steps, 3)
    print(f"device={device} ({torch.cuda.get_device_name() if cuda else 'cpu'}) dtype={dtype} "
          f"torch={torch.__version__} "
          f"compile={a.compile} grad_checkpointing={a.grad_checkpointing} steps={steps} warmup={warmup}"
          f"{' TINY MODELS (CPU smoke)' if a.tiny else ''}")
    print("ALL WEIGHTS ARE RANDOM (built from config at the real shapes): throughput and memory only")
    for name in a.cases:
        case = CASES[name]
        res = 64 if a.tiny else case.resolution
        batch = a.batch or (2 if a.tiny else case.batch)
        unet, vae = build(case, a.tiny, device)
        total = sum(q.numel() for q in unet.parameters())
        if case.lora:
            from model.lora import attach_lora

            attach_lora(unet, LoraConfig(rank=a.lora_rank))
        trainable = sum(q.numel() for q in unet.parameters() if q.requires_grad)
        compiled = torch.compile(unet) if a.compile else unet
        stand_in = "TINY stand-in (same block kinds and conditioning) for: " if a.tiny else ""
        print(f"\n[{case.name}] {stand_in}{case.title}"
              f"{f' rank {a.lora_rank}' if case.lora else ''}: UNet {total / 1e6:.1f}M params, trainable "
              f"{trainable / 1e6:.2f}M; VAE (RANDOM, frozen, decoder in the pixel loss) "
              f"{sum(q.numel() for q in vae.parameters()) / 1e6:.1f}M; {res} px, latents {res // 8}x{res // 8}")
        print("case       res   batch λ      ckpt img/s    step_ms   peak_GiB  train_M    TFLOP/step  MFU     "
              "warmup_s")
        times = {}
        for lam in (0.0, a.pixel_weight):
            checkpointing = a.grad_checkpointing
            while True:
                try:
                    m = run_case(case, unet, compiled, vae, cfg, lam, batch, res, steps, warmup, checkpointing,
                                 device, dtype)
                except torch.OutOfMemoryError:
                    m = None
                if m is None:
                    gc.collect()
                    torch.cuda.empty_cache()
                print(fmt_row(case, res, batch, lam, checkpointing, m, trainable, a.peak_tflops, cuda), flush=True)
                if m is None and not checkpointing and not a.no_oom_retry:
                    checkpointing = True
                    continue
                break
            if m is not None:
                times[lam] = (m["dt"], checkpointing)
        if len(times) == 2 and times[0.0][1] == times[a.pixel_weight][1]:
            print(f"[{case.name}] pixel-loss step time ratio (λ={a.pixel_weight} / λ=0): "
                  f"{times[a.pixel_weight][0] / times[0.0][0]:.2f}x")
        del unet, vae, compiled
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
