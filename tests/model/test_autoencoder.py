"""Autoencoders: the real TAEF2 weights through the key-mapping loader, and the kl autoencoder trained here."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from model.autoencoder import (FourierAutoencoderKL, build_kl_autoencoder, fourier_features, load_taesd,
                               reconstruction_metrics, train_autoencoder)
from model.config import AutoencoderConfig
from model.data import crop_to_bucket
from tests.model.conftest import photo_variants


def test_taef2_loads_into_autoencoder_tiny_and_reconstructs_real_photos(shared_dir):
    weights = shared_dir / "weights" / "taesd"
    vae = load_taesd(weights / "taef2_encoder.pth", weights / "taef2_decoder.pth")
    assert vae.config.latent_channels == 32 and vae.config.use_midblock_gn
    files = sorted((shared_dir / "data" / "coco-mini" / "images").glob("*.jpg"))[:4]
    x = torch.stack([crop_to_bucket(Image.open(f), (128, 128)) for f in files])
    metrics = reconstruction_metrics(vae, x)
    assert metrics["psnr"] > 24 and metrics["ssim"] > 0.75, metrics  # README: 25-31 dB at 256 px


def test_fourier_features_lift_rgb_and_the_autoencoder_round_trips_through_save(tmp_path):
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    lifted = fourier_features(x, 3)
    assert lifted.shape == (2, 3 + 18, 8, 8)
    assert torch.allclose(lifted[:, [3, 6, 9]], torch.sin(torch.pi * x), atol=1e-6)  # k = 0 of each channel
    cfg = AutoencoderConfig(latent_channels=16, block_out_channels=[16, 16], norm_num_groups=8, fourier_frequencies=3)
    vae = build_kl_autoencoder(cfg).eval()
    vae.save_pretrained(tmp_path / "ae")
    again = FourierAutoencoderKL.from_pretrained(tmp_path / "ae").eval()
    with torch.no_grad():
        z = vae.encode(torch.rand(1, 3, 16, 16)).latent_dist.mode()
        assert z.shape == (1, 16, 8, 8)
        assert torch.allclose(again.decode(z).sample, vae.decode(z).sample, atol=1e-5)


def test_training_the_kl_autoencoder_with_adversarial_loss_improves_reconstruction(tmp_path):
    images = torch.stack([crop_to_bucket(im, (32, 32)) for im, _ in photo_variants(12)])
    cfg = AutoencoderConfig(latent_channels=8, block_out_channels=[16, 16], norm_num_groups=8, fourier_frequencies=2,
                            adversarial_weight=0.05, train_steps=60, train_batch_size=6, learning_rate=2e-3)
    torch.manual_seed(0)
    before = reconstruction_metrics(build_kl_autoencoder(cfg).eval(), images[:3])
    after = train_autoencoder(cfg, images[3:], images[:3], tmp_path / "ae", progress=False)
    assert np.isfinite(after["psnr"]) and after["psnr"] > before["psnr"] + 2, (before, after)
    assert (tmp_path / "ae" / "config.json").is_file()
