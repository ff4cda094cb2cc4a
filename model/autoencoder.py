"""Autoencoders: load a user's diffusers VAE, load the TAESD family from its original files, or train
an AutoencoderKL here (Emu §3.1) and report its reconstruction PSNR/SSIM.

Every autoencoder is a diffusers ``ModelMixin`` so it saves with ``save_pretrained`` and loads in a
stock pipeline. Two classes here extend diffusers ones by one feature each (``model.pipeline.load_pipeline``
passes them to ``StableDiffusionPipeline.from_pretrained``):

- ``AutoencoderTinyMidBlockGN``: AutoencoderTiny plus the small GroupNorm bottleneck branch
  ("midblock GN") that TAEF2 has in its three lowest-resolution blocks;
- ``FourierAutoencoderKL``: AutoencoderKL whose encoder sees RGB lifted by a fixed Fourier feature
  transform (Emu: "a non-learnable pre-processing step ... to lift the input channel dimension").
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import AutoencoderKL, AutoencoderTiny
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d_blocks import AutoencoderTinyBlock
from PIL import Image

from model.config import AutoencoderConfig
from pipeline.errors import UserError

log = logging.getLogger(__name__)


class AutoencoderError(UserError, ValueError):
    """The configured autoencoder cannot be loaded: not trained yet, an unsupported class, weights that do
    not fit."""


class ChannelMismatchError(AutoencoderError):
    """A checkpoint's latent channels differ from the autoencoder's."""


# --- TAESD family ----------------------------------------------------------------------------


class _MidBlockGNBlock(AutoencoderTinyBlock):
    """TAESD block with TAEF2's extra branch: x + conv1x1(ReLU(GroupNorm(4, 4c)(conv1x1(x)))) before the
    residual convs. Submodule names (``pool.0/1/3``) match the original files."""

    def __init__(self, channels: int, act_fn: str):
        super().__init__(channels, channels, act_fn)
        wide = channels * 4
        self.pool = nn.Sequential(nn.Conv2d(channels, wide, 1, bias=False), nn.GroupNorm(4, wide),
                                  nn.ReLU(inplace=True), nn.Conv2d(wide, channels, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pool(x)
        return super().forward(x)


class AutoencoderTinyMidBlockGN(AutoencoderTiny):
    """diffusers' AutoencoderTiny with TAEF2's midblock GroupNorm branch in the encoder's last (lowest
    resolution) stage and the decoder's first stage, when ``use_midblock_gn``."""

    @register_to_config
    def __init__(self, in_channels: int = 3, out_channels: int = 3,
                 encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64),
                 decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64), act_fn: str = "relu",
                 upsample_fn: str = "nearest", latent_channels: int = 4, upsampling_scaling_factor: int = 2,
                 num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3), num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1),
                 latent_magnitude: int = 3, latent_shift: float = 0.5, force_upcast: bool = False,
                 scaling_factor: float = 1.0, shift_factor: float = 0.0, use_midblock_gn: bool = False,
                 block_out_channels: tuple[int, ...] | None = None):
        # block_out_channels: recorded by AutoencoderTiny as the decoder's; accepted back and ignored
        super().__init__(in_channels=in_channels, out_channels=out_channels,
                         encoder_block_out_channels=encoder_block_out_channels,
                         decoder_block_out_channels=decoder_block_out_channels, act_fn=act_fn,
                         upsample_fn=upsample_fn, latent_channels=latent_channels,
                         upsampling_scaling_factor=upsampling_scaling_factor, num_encoder_blocks=num_encoder_blocks,
                         num_decoder_blocks=num_decoder_blocks, latent_magnitude=latent_magnitude,
                         latent_shift=latent_shift, force_upcast=force_upcast, scaling_factor=scaling_factor,
                         shift_factor=shift_factor)
        if use_midblock_gn:
            enc, dec = self.encoder.layers, self.decoder.layers
            n_enc = len(enc)
            for i in range(n_enc - 1 - num_encoder_blocks[-1], n_enc - 1):
                enc[i] = _MidBlockGNBlock(encoder_block_out_channels[-1], act_fn)
            for i in range(2, 2 + num_decoder_blocks[0]):
                dec[i] = _MidBlockGNBlock(decoder_block_out_channels[0], act_fn)


def taesd_state_dict(encoder_sd: dict[str, torch.Tensor], decoder_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the original ``nn.Sequential`` state dicts onto AutoencoderTiny's keys.

    The encoder's Sequential is diffusers' ``encoder.layers`` index for index. The original decoder
    starts with a parameter-free Clamp module that diffusers applies in ``forward`` instead, so its
    index N is diffusers' ``decoder.layers.{N-1}``.
    """
    mapped = {f"encoder.layers.{k}": v for k, v in encoder_sd.items()}
    for key, value in decoder_sd.items():
        index, _, rest = key.partition(".")
        mapped[f"decoder.layers.{int(index) - 1}.{rest}"] = value
    return mapped


def load_taesd(encoder_path: str | Path, decoder_path: str | Path) -> AutoencoderTinyMidBlockGN:
    """A TAESD-family autoencoder (TAESD, TAESDXL, TAEF1, TAEF2, ...) from its two original files; latent
    channels and the midblock-GN variant are read from the weights."""
    encoder_sd = torch.load(encoder_path, map_location="cpu", weights_only=True)
    decoder_sd = torch.load(decoder_path, map_location="cpu", weights_only=True)
    latent_channels = decoder_sd["1.weight"].shape[1]
    if encoder_sd[_last_key(encoder_sd)].shape[0] != latent_channels:
        raise ChannelMismatchError(f"{encoder_path} and {decoder_path} disagree on latent channels")
    vae = AutoencoderTinyMidBlockGN(latent_channels=latent_channels,
                                    use_midblock_gn=any(".pool." in k for k in decoder_sd))
    missing, unexpected = vae.load_state_dict(taesd_state_dict(encoder_sd, decoder_sd), strict=False)
    if missing or unexpected:
        raise AutoencoderError(f"TAESD weights do not fit AutoencoderTiny: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return vae


def _last_key(sd: dict[str, torch.Tensor]) -> str:
    return max((k for k in sd if k.endswith(".weight")), key=lambda k: int(k.split(".")[0]))


# --- AutoencoderKL trained here -----------------------------------------------------------------


def fourier_features(x: torch.Tensor, frequencies: int) -> torch.Tensor:
    """[x, sin(2^k π x), cos(2^k π x)] for k < frequencies: 3 -> 3 + 6·frequencies channels, fixed (not
    learned), so fine structure is visible to the first conv at several scales."""
    if frequencies == 0:
        return x
    scales = (2.0 ** torch.arange(frequencies, device=x.device, dtype=x.dtype)) * math.pi
    angles = x.unsqueeze(2) * scales.view(1, 1, -1, 1, 1)  # B, 3, K, H, W
    b, c, k, h, w = angles.shape
    return torch.cat([x, angles.sin().reshape(b, c * k, h, w), angles.cos().reshape(b, c * k, h, w)], dim=1)


class FourierAutoencoderKL(AutoencoderKL):
    """AutoencoderKL whose encoder input is ``fourier_features(rgb, fourier_frequencies)``; it still takes
    and returns plain RGB in [-1, 1], so pipelines use it as any AutoencoderKL."""

    @register_to_config
    def __init__(self, out_channels: int = 3, down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",),
                 up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",), block_out_channels: tuple[int, ...] = (64,),
                 layers_per_block: int = 1, act_fn: str = "silu", latent_channels: int = 4,
                 norm_num_groups: int = 32, sample_size: int = 32, scaling_factor: float = 1.0,
                 fourier_frequencies: int = 0, force_upcast: bool = False, in_channels: int | None = None,
                 shift_factor: float | None = None, latents_mean=None, latents_std=None,
                 use_quant_conv: bool = True, use_post_quant_conv: bool = True, mid_block_add_attention: bool = True):
        # in_channels is derived from fourier_frequencies (AutoencoderKL records it in the config too)
        super().__init__(in_channels=3 + 6 * fourier_frequencies, shift_factor=shift_factor, latents_mean=latents_mean,
                         latents_std=latents_std, use_quant_conv=use_quant_conv, use_post_quant_conv=use_post_quant_conv,
                         mid_block_add_attention=mid_block_add_attention, out_channels=out_channels,
                         down_block_types=down_block_types, up_block_types=up_block_types,
                         block_out_channels=block_out_channels, layers_per_block=layers_per_block, act_fn=act_fn,
                         latent_channels=latent_channels, norm_num_groups=norm_num_groups, sample_size=sample_size,
                         scaling_factor=scaling_factor, force_upcast=force_upcast)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return super()._encode(fourier_features(x, self.config.fourier_frequencies))


def build_kl_autoencoder(cfg: AutoencoderConfig) -> FourierAutoencoderKL:
    n = len(cfg.block_out_channels)
    return FourierAutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                                block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
                                latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
                                sample_size=cfg.train_resolution, fourier_frequencies=cfg.fourier_frequencies)


class PatchDiscriminator(nn.Module):
    """A small PatchGAN (pix2pix) for the autoencoder's adversarial loss: real/fake logits per patch."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        for i in range(1, layers):
            c_in, c_out = channels * 2 ** (i - 1), channels * 2**i
            blocks += [nn.Conv2d(c_in, c_out, 4, 2, 1), nn.GroupNorm(8, c_out), nn.LeakyReLU(0.2)]
        blocks.append(nn.Conv2d(channels * 2 ** (layers - 1), 1, 3, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def reconstruction_metrics(vae: nn.Module, images: torch.Tensor, batch_size: int = 8,
                           features: Callable[[list[Image.Image]], np.ndarray] | None = None) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM of encode -> decode on images in [-1, 1] (Emu table 1's metrics), and with
    ``features`` (the evaluation stage's ImageNetFeatures) the KID of the reconstructions against the
    originals: Emu's table reports FID, whose small-sample bias would swamp the differences at the few
    dozen held-out images of a CPU run, so the distribution term is KID, the evaluation stage's primary
    metric (model/evaluation/distribution.py)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    psnrs, ssims, originals, recons = [], [], [], []
    with torch.no_grad():
        for chunk in images.split(batch_size):
            recon = decode_latents(vae, encode_latents(vae, chunk)).clamp(-1, 1)
            for ref, out in zip(_to_uint8(chunk), _to_uint8(recon)):
                psnrs.append(peak_signal_noise_ratio(ref, out, data_range=255))
                ssims.append(structural_similarity(ref, out, channel_axis=-1, data_range=255))
                if features is not None:
                    originals.append(Image.fromarray(ref))
                    recons.append(Image.fromarray(out))
    metrics = {"psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims))}
    if features is not None:
        from model.evaluation.distribution import kid

        metrics["kid"] = kid(features(recons), features(originals)).mean
    return metrics


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def adaptive_adversarial_weight(reconstruction_loss: torch.Tensor, generator_loss: torch.Tensor,
                                last_layer: torch.Tensor) -> torch.Tensor:
    """λ = ‖∇_L rec‖ / (‖∇_L gan‖ + 1e-4) at the decoder's last layer L (Esser et al. 2021, "Taming
    Transformers", eq. 7; SD's and Emu-style KL autoencoders train with it): the adversarial gradient is
    scaled to the reconstruction gradient's size, so ``adversarial_weight`` is its share there. A fixed
    weight lets the unbounded hinge generator term swamp the L1 term (measured: PSNR 17.4 -> 13.6 dB on
    COCO-mini at 64 px, benchmarks/RESULTS.md)."""
    rec = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    gan = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)[0]
    return (rec.norm() / (gan.norm() + 1e-4)).clamp(0, 1e4).detach()


def train_autoencoder(cfg: AutoencoderConfig, train_images: torch.Tensor, val_images: torch.Tensor,
                      out_dir: Path, seed: int = 0, progress: bool = True,
                      features: Callable[[list[Image.Image]], np.ndarray] | None = None) -> dict[str, float]:
    """Train the ``kl`` autoencoder on images in [-1, 1] (N, 3, R, R): L1 + KL (+ hinge adversarial loss
    once half the steps are done, so the discriminator does not fight an untrained decoder, weighted by
    ``adaptive_adversarial_weight``). Saves to
    ``out_dir`` and returns held-out PSNR/SSIM (and KID with ``features``: reconstruction_metrics)."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    vae = build_kl_autoencoder(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.learning_rate)
    disc = PatchDiscriminator() if cfg.adversarial_weight > 0 else None
    opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.learning_rate) if disc else None
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(range(cfg.train_steps), desc="autoencoder", disable=not progress)
    for step in bar:
        idx = torch.randint(len(train_images), (cfg.train_batch_size,), generator=gen)
        x = train_images[idx]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.l1_loss(recon, x) + cfg.kl_weight * posterior.kl().mean()
        adversarial = disc is not None and step >= cfg.train_steps // 2
        if adversarial:
            generator_loss = -disc(recon).mean()
            weight = adaptive_adversarial_weight(loss, generator_loss, vae.decoder.conv_out.weight)
            loss = loss + cfg.adversarial_weight * weight * generator_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if adversarial:
            d_loss = F.relu(1 - disc(x)).mean() + F.relu(1 + disc(recon.detach())).mean()
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    metrics = reconstruction_metrics(vae, val_images, features=features)
    out_dir.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(out_dir)
    log.info("autoencoder saved to %s: PSNR %.2f dB, SSIM %.3f", out_dir, metrics["psnr"], metrics["ssim"])
    return metrics


# --- one interface for all kinds --------------------------------------------------------------------


def load_autoencoder(cfg: AutoencoderConfig, default_dir: Path | None = None) -> nn.Module:
    """The frozen autoencoder the config names (a ``kl`` one must already be trained into its path)."""
    if cfg.kind == "taesd":
        vae = load_taesd(cfg.encoder_path, cfg.decoder_path)
    elif cfg.kind == "pretrained":
        vae = load_pretrained_autoencoder(cfg.path, cfg.subfolder)
    else:
        path = Path(cfg.path) if cfg.path else default_dir
        if path is None or not (path / "config.json").is_file():
            raise AutoencoderError(f"no trained kl autoencoder in {path}; train it first (python -m model "
                                    f"train-autoencoder) or let train-qt do it")
        vae = FourierAutoencoderKL.from_pretrained(path)
    vae.requires_grad_(False)
    return vae.eval()


def load_pretrained_autoencoder(path: str, subfolder: str | None = None) -> nn.Module:
    """A diffusers autoencoder by local path or hub name; the class is read from its config."""
    kwargs = {"subfolder": subfolder} if subfolder else {}
    class_name = AutoencoderKL.load_config(path, **kwargs).get("_class_name", "AutoencoderKL")
    classes = {c.__name__: c for c in (AutoencoderKL, AutoencoderTiny, AutoencoderTinyMidBlockGN, FourierAutoencoderKL)}
    if class_name not in classes:
        raise AutoencoderError(f"{path}: autoencoder class {class_name} is not supported ({sorted(classes)})")
    return classes[class_name].from_pretrained(path, **kwargs)


def latent_channels(vae: nn.Module) -> int:
    return int(vae.config.latent_channels)


def downsample_factor(vae: nn.Module) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def encode_latents(vae: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Unscaled latents of images in [-1, 1]. AutoencoderKL gives the posterior mean: cached latents are
    computed once, so they should be the deterministic code, not one random draw."""
    out = vae.encode(images)
    return out.latents if hasattr(out, "latents") else out.latent_dist.mode()


def decode_latents(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Images in about [-1, 1] from unscaled latents."""
    return vae.decode(latents).sample
