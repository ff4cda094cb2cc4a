"""Emu Table 1 in small form: AutoencoderKL reconstruction with 4/8/16 latent channels, and the 16-channel
one with the Fourier feature input, the adversarial loss, and both (Emu §3.1), trained here on real photos.

    python benchmarks/bench_autoencoder.py                      # COCO-mini (../shared), 64 px, 300 steps
    python benchmarks/bench_autoencoder.py --steps 20 --images data/sample   # smoke

Every variant is the ``ae16`` preset's autoencoder (model/presets/ae16.yaml) with only the channel
count, the Fourier features or the adversarial weight changed, trained by model.autoencoder's own
train_autoencoder on the same seeded split and seed. Held-out images are scored with
model.autoencoder.reconstruction_metrics: PSNR, SSIM and KID of the reconstructions against the
originals on the evaluation stage's ImageNet MobileNetV2 features (staged under $TORCH_HOME, or taken
from ../shared/weights/imagenet when it exists; never downloaded).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from model.autoencoder import train_autoencoder
from model.config import load_config
from model.data import crop_to_bucket

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
# (row label, latent channels, Fourier features on, adversarial loss on): Table 1's rows, then the two
# ingredients of its Fourier-AE row on their own
VARIANTS = [("AE", 4, False, False), ("AE", 8, False, False), ("AE", 16, False, False),
            ("AE + Fourier", 16, True, False), ("AE + adversarial", 16, False, True),
            ("Fourier-AE + adversarial", 16, True, True)]


def load_images(folder: Path, resolution: int) -> list[torch.Tensor]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not files:
        raise SystemExit(f"{folder}: no images")
    return [crop_to_bucket(Image.open(f), (resolution, resolution)) for f in files]


def mobilenet_features():
    """The evaluation stage's KID features; the shared MobileNetV2 file is staged where torchvision looks."""
    from model.evaluation.distribution import ImageNetFeatures

    shared = SHARED / "weights" / "imagenet" / "mobilenet_v2-b0353104.pth"
    if "TORCH_HOME" not in os.environ and shared.is_file():
        home = Path(tempfile.mkdtemp(prefix="torch-home-"))
        (home / "hub" / "checkpoints").mkdir(parents=True)
        (home / "hub" / "checkpoints" / shared.name).symlink_to(shared)
        os.environ["TORCH_HOME"] = str(home)
    return ImageNetFeatures(device="cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=SHARED / "data" / "coco-mini" / "images")
    parser.add_argument("--preset", default="ae16")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--val", type=int, default=40, help="held-out images")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core VM)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", type=int, nargs="+", default=list(range(len(VARIANTS))),
                        help="rows of the table to train (0-based; default all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    images = load_images(args.images, args.resolution)
    random.Random(args.seed).shuffle(images)
    val, train = torch.stack(images[:args.val]), torch.stack(images[args.val:])
    base = load_config(args.preset).autoencoder
    features = mobilenet_features()
    print(f"{len(train)} train / {len(val)} held-out images from {args.images} at {args.resolution} px; "
          f"{args.steps} steps x batch {base.train_batch_size}; preset {args.preset} "
          f"(blocks {base.block_out_channels}, Fourier frequencies {base.fourier_frequencies}, adversarial weight "
          f"{base.adversarial_weight}); {platform.machine()}, {os.cpu_count()} cores, {args.threads} torch thread(s)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.variants:
            label, channels, fourier, adversarial = VARIANTS[k]
            cfg = base.model_copy(update={"latent_channels": channels, "train_steps": args.steps,
                                          "fourier_frequencies": base.fourier_frequencies if fourier else 0,
                                          "adversarial_weight": base.adversarial_weight if adversarial else 0.0})
            t0 = time.perf_counter()
            metrics = train_autoencoder(cfg, train, val, Path(tmp) / str(k), args.seed, progress=False,
                                        features=features)
            rows.append((label, channels, metrics, time.perf_counter() - t0))
            print(f"  {label} {channels}: {metrics} ({rows[-1][3]:.0f} s)", flush=True)
    print("\n| model | channel | SSIM | PSNR (dB) | KID | train s |\n|---|---|---|---|---|---|")
    for label, channels, m, seconds in rows:
        print(f"| {label} | {channels} | {m['ssim']:.3f} | {m['psnr']:.2f} | {m['kid']:.4f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
