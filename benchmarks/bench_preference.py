"""Throughput and memory of one preference-tuning step (model.preference.preference_loss), side by side with the
supervised step on the same images, in one run: SFT (2B images), Diffusion-DPO (policy fwd+bwd on the B
winners and B losers as one batch of 2B, plus the frozen reference's forward), SimPO (no reference), and
each preference objective with the pixel-space term (μ > 0: the decoder runs on 4B latents, PS eq. 6).

GPU (what the numbers are for; SD-1.5-size UNet, RANDOM weights from config, bf16, SD's VAE architecture):
    python benchmarks/bench_preference.py --resolution 512 --pairs 8
CPU smoke (tiny UNet, 64 px, fp32; proves the script runs):
    python benchmarks/bench_preference.py --tiny

Prints pairs/s, images/s (two per pair), step time and, on CUDA, peak memory allocated per row.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from bench_train import build  # the same UNet + decoder as the SFT step's benchmark (this folder)

from model import preference as P
from model.config import load_config
from model.objective import diffusion_loss, draw_noise, generator, training_alphas_cumprod


def bench(kind: str, mu: float, unet, reference, vae, cfg, pairs: int, res: int, steps: int, device, dtype,
          checkpointing: bool):
    """(seconds per step, peak bytes) of ``kind`` (sft | dpo | simpo) on ``pairs`` pairs at ``res`` px."""
    z_w, z_l = (torch.randn(pairs, 4, res // 8, res // 8, device=device) for _ in range(2))
    text = {"text": torch.randn(pairs, 77, unet.config.cross_attention_dim, device=device)}
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-6, fused=device.type == "cuda")
    decode = lambda x: vae.decode(x.to(dtype)).sample  # noqa: E731
    alphas = training_alphas_cumprod(cfg)
    stage = cfg.quality_tune.model_copy(update={"pixel_loss_weight": mu, "noise_offset": 0.0})
    if checkpointing:
        unet.enable_gradient_checkpointing()

    def step(k: int) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            if kind == "sft":
                both = {"text": torch.cat([text["text"]] * 2)}
                loss, _ = diffusion_loss(unet, torch.cat([z_w, z_l]), both, cfg, stage, generator(0, k), alphas, decode)
            else:
                noise = draw_noise(tuple(z_w.shape), cfg, 0.0, generator(0, k), alphas)
                loss = P.preference_loss(unet, reference if kind == "dpo" else None, z_w, z_l, text, cfg, kind, 2000.0,
                                         200.0, mu, 0.0, noise, decode).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for k in range(2):  # warm-up
        step(k)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for k in range(steps):
        step(k)
    sync()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    if checkpointing:
        unet.disable_gradient_checkpointing()
    return (time.perf_counter() - t0) / steps, peak


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--mu", type=float, default=2.0, help="pixel-term weight of the rows with it (PS: 2-8)")
    p.add_argument("--grad-checkpointing", action="store_true")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = load_config("tiny" if a.tiny else "sd15", ["diffusion.min_snr_gamma=null"])
    res, pairs, steps = (64, 2, 2) if a.tiny else (a.resolution, a.pairs, a.steps)
    unet, vae = build(cfg, a.tiny, device, dtype)
    reference = copy.deepcopy(unet).requires_grad_(False).eval()  # DPO's frozen copy of the start
    print(f"device={device} dtype={dtype} unet={sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M params "
          f"pairs={pairs} res={res} grad_checkpointing={a.grad_checkpointing}")
    print("objective  mu    pairs/s  img/s    step_ms  peak_GiB")
    base = None
    for kind, mu in (("sft", 0.0), ("dpo", 0.0), ("simpo", 0.0), ("dpo", a.mu), ("simpo", a.mu)):
        try:
            dt, peak = bench(kind, mu, unet, reference, vae, cfg, pairs, res, steps, device, dtype, a.grad_checkpointing)
        except torch.OutOfMemoryError:
            print(f"{kind:<10} {mu:<5} out of memory")
            torch.cuda.empty_cache()
            continue
        base = base or dt
        print(f"{kind:<10} {mu:<5} {pairs / dt:<8.2f} {2 * pairs / dt:<8.2f} {dt * 1e3:<8.1f} {peak / 2**30:<8.2f} "
              f"({dt / base:.2f}x the SFT step on the same {2 * pairs} images)")


if __name__ == "__main__":
    main()
