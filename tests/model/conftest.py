"""Small captioned sets built from skimage.data's real photos (resized, cropped and flipped variants),
written as an imagefolder or as Parquet with pipeline/schema.py's columns."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.autoencoder import build_kl_autoencoder
from model.config import load_config
from model.text import load_text_encoder
from model.bases import Frozen

PHOTOS = {"astronaut": "an astronaut in a white suit", "coffee": "a cup of coffee on a saucer",
          "chelsea": "a tabby cat looking to the side", "rocket": "a rocket on the launch pad",
          "immunohistochemistry": "stained tissue under a microscope", "hubble_deep_field": "galaxies in deep space"}


def photo_variants(n: int, seed: int = 0) -> list[tuple[Image.Image, str]]:
    """n images of varied aspect ratio (crops of real photos) with captions."""
    from skimage import data

    rng = np.random.default_rng(seed)
    names = list(PHOTOS)
    out = []
    for i in range(n):
        name = names[i % len(names)]
        im = Image.fromarray(getattr(data, name)()).convert("RGB")
        w, h = im.size
        aspect = [1.0, 0.5, 2.0][(i // len(names)) % 3]
        cw = int(min(w, h * aspect) * rng.uniform(0.7, 1.0))
        ch = int(cw / aspect)
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        im = im.crop((x0, y0, x0 + cw, y0 + ch)).resize((max(32, cw // 3), max(32, ch // 3)))
        if i % 2:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        out.append((im, f"{PHOTOS[name]}, variant {i}"))
    return out


def write_imagefolder(root: Path, n: int, missing_captions: int = 0) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (im, caption) in enumerate(photo_variants(n)):
        name = f"images/{i:04d}.jpg"
        im.save(root / name, quality=90)
        lines.append({"file_name": name, "text": "" if i < missing_captions else caption})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return root


def write_parquet(path: Path, n: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import schema

    images, captions = [], []
    for im, caption in photo_variants(n, seed=1):
        buf = io.BytesIO()
        im.save(buf, format="JPEG")
        images.append(buf.getvalue())
        captions.append(caption)
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({schema.IMAGE: pa.array(images, pa.binary()), schema.CAPTION: captions}),
                   path / "shard-00000.parquet")
    return path


# the training tests' tiny config and its frozen models
FAST = ["quality_tune.pixel_loss_weight=0.0", "quality_tune.eval_every=2", "quality_tune.sample_every=100", "quality_tune.checkpoint_every=2",
        "quality_tune.batch_size=4", "quality_tune.val_fraction=0.2", "sample.num_inference_steps=2",
        "sample.prompts=['a fox', 'a cat']"]


def tiny(*overrides: str):
    return load_config("tiny", FAST + list(overrides))


@pytest.fixture(scope="module")
def frozen() -> Frozen:
    cfg = tiny()
    tokenizer, text_encoder = load_text_encoder(cfg.text_encoder, cfg.seed)
    torch.manual_seed(0)
    vae = build_kl_autoencoder(cfg.autoencoder).eval().requires_grad_(False)  # tiny random autoencoder
    return Frozen(tokenizer, text_encoder, vae)


MOBILENET = "weights/imagenet/mobilenet_v2-b0353104.pth"


@pytest.fixture()
def staged_mobilenet(shared_dir, tmp_path, monkeypatch):
    """torchvision's ImageNet MobileNetV2 where its loader looks ($TORCH_HOME/hub/checkpoints), as `make
    weights` stages it."""
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "mobilenet_v2-b0353104.pth").symlink_to(shared_dir / MOBILENET)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


@pytest.fixture(scope="module")
def curated_dir(tmp_path_factory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("curated"), 12)


def export_tiny_pipeline(out: Path, frozen: Frozen, seed: int = 0, resolution: int = 64) -> Path:
    """A pipeline folder around the tiny frozen models with a RANDOM tiny UNet (``seed``): no training, for
    tests of what reads checkpoints (its images are noise-like; ``resolution`` sets the latent size)."""
    from model.bases import build_unet
    from model.export import export_pipeline

    cfg = tiny(f"seed={seed}")
    return export_pipeline(out, build_unet(cfg, frozen, resolution), frozen, cfg, scaling_factor=0.5)
