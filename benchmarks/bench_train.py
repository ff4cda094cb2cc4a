"""Training throughput of the UNet step this repo trains (model.objective.diffusion_loss), side by side:
latent loss only (λ = 0) vs latent + pixel-space loss (λ > 0, PS eq. 3), in one run.

GPU (what the numbers are for; SD-1.5-size UNet, 860M, bf16, random weights from config, cached-latent
shapes, CLIP-L-width text states):
    python benchmarks/bench_train.py --resolution 256 512 --batch 64 --compile
CPU smoke (tiny UNet, 64 px, fp32; proves the script runs):
    python benchmarks/bench_train.py --tiny

Prints images/s, step time and model FLOPs utilisation (FLOPs of one fwd+bwd counted with
torch.utils.flop_counter; peak = --peak-tflops, default 989 = H100/H200 dense bf16).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from model.autoencoder import build_kl_autoencoder
from model.config import AutoencoderConfig, load_config
from model.objective import diffusion_loss, generator as _generator, training_alphas_cumprod


def build(cfg, tiny: bool, device, dtype):
    from diffusers import UNet2DConditionModel

    u = cfg.unet
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, block_out_channels=tuple(u.block_out_channels),
                                layers_per_block=u.layers_per_block, down_block_types=tuple(u.down_block_types),
                                up_block_types=tuple(u.up_block_types), attention_head_dim=u.attention_head_dim,
                                norm_num_groups=u.norm_num_groups, cross_attention_dim=32 if tiny else 768)
    # the pixel loss needs a decoder: SD's VAE architecture (random weights: FLOPs are what matter here)
    ae_cfg = (AutoencoderConfig(block_out_channels=[32, 32, 32, 32], norm_num_groups=8) if tiny else
              AutoencoderConfig(block_out_channels=[128, 256, 512, 512], layers_per_block=2))
    vae = build_kl_autoencoder(ae_cfg).requires_grad_(False).eval()
    return unet.to(device, memory_format=torch.channels_last), vae.to(device, dtype)


def bench(unet, vae, cfg, stage, batch, res, steps, device, dtype, compile_):
    z = torch.randn(batch, 4, res // 8, res // 8, device=device)
    text = {"text": torch.randn(batch, 77, unet.config.cross_attention_dim, device=device)}
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=device.type == "cuda")
    decode = lambda x: vae.decode(x.to(dtype)).sample  # noqa: E731
    model = torch.compile(unet) if compile_ else unet
    ab = training_alphas_cumprod(cfg)

    def step(k):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss, _ = diffusion_loss(model, z, text, cfg, stage, _generator(0, k), ab, decode)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for k in range(3):  # warm-up (and compilation)
        step(k)
    with FlopCounterMode(display=False) as counter:
        step(0)
    flops = counter.get_total_flops()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for k in range(steps):
        step(k)
    sync()
    dt = (time.perf_counter() - t0) / steps
    return batch / dt, dt, flops


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--resolution", type=int, nargs="+", default=[256, 512])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--pixel-weight", type=float, default=4.0)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = load_config("tiny" if a.tiny else "sd15", ["diffusion.min_snr_gamma=5.0"])
    resolutions, batch = ([64], 4) if a.tiny else (a.resolution, a.batch)
    unet, vae = build(cfg, a.tiny, device, dtype)
    print(f"device={device} dtype={dtype} unet={sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M params "
          f"batch={batch} compile={a.compile}")
    print("res  lambda  img/s    step_ms  TFLOP/step  MFU")
    for res in resolutions:
        rows = []
        for lam in (0.0, a.pixel_weight):
            stage = cfg.quality_tune.model_copy(update={"pixel_loss_weight": lam, "noise_offset": 0.1})
            ips, dt, flops = bench(unet, vae, cfg, stage, batch, res, 2 if a.tiny else a.steps, device, dtype, a.compile)
            mfu = flops / dt / (a.peak_tflops * 1e12) if device.type == "cuda" else float("nan")
            rows.append(dt)
            print(f"{res:<4} {lam:<6} {ips:<8.1f} {dt * 1e3:<8.1f} {flops / 1e12:<11.3f} {mfu:.1%}")
        print(f"{res:<4} pixel-loss step time ratio (λ={a.pixel_weight} / λ=0): {rows[1] / rows[0]:.2f}x")


if __name__ == "__main__":
    main()
