"""Quality-tuning public bases (issue 11): SD 1.x/2.x and SDXL pipeline folders, full fine-tuning and LoRA.

The bases are TINY RANDOMLY-INITIALISED pipelines built from config (tests/builders.py:
tiny_random_sd_pipeline; no real SD weights exist offline), saved exactly as diffusers saves real ones.
The tests check the plumbing a real base goes through: its frozen models and schedule are the ones used,
the text conditioning equals the stock pipelines', SDXL's time_ids are each image's bucket and crop, the
result loads in the stock pipelines (or as a LoRA with load_lora_weights) and samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image

from model.bases import BaseError, base_family, encode_text, load_base_frozen, resolve_base
from model.data import LatentCache, crop_with_geometry
from model.lora import LORA_MARKER, LORA_WEIGHTS
from model.pipeline import load_pipeline
from model.train import train_quality_tuned
from tests.builders import tiny_random_sd_pipeline
from tests.model.conftest import FAST

# a few steps at 64 px: the plumbing, not the model, is under test
STEPS = FAST + ["quality_tune.max_steps=4", "quality_tune.resolution=64", "quality_tune.ema_decay=null"]
LORA = 'quality_tune.lora={"rank": 4}'
PIXEL = "quality_tune.pixel_loss_weight=1.0"


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {family: tiny_random_sd_pipeline(root / family, family) for family in ("sd15", "sd2-v", "sdxl")}


def test_text_conditioning_is_what_the_stock_pipelines_feed_the_unet(bases):
    prompts = ["a red fox in the snow", "a bowl of oranges"]
    sd = StableDiffusionPipeline.from_pretrained(bases["sd15"])
    ours = encode_text(load_base_frozen(bases["sd15"], "sd"), prompts)
    theirs = sd.encode_prompt(prompts, "cpu", 1, False)[0]
    assert set(ours) == {"text"} and torch.allclose(ours["text"], theirs, atol=1e-6)

    xl = StableDiffusionXLPipeline.from_pretrained(bases["sdxl"])
    ours = encode_text(load_base_frozen(bases["sdxl"], "sdxl"), prompts)
    embeds, _, pooled, _ = xl.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    assert ours["text"].shape == (2, 77, 64) and torch.allclose(ours["text"], embeds, atol=1e-6)
    assert torch.allclose(ours["pooled"], pooled, atol=1e-6)


def test_sdxl_time_ids_are_each_images_original_size_crop_and_bucket():
    image = Image.new("RGB", (300, 100))  # wide: resized to cover 64 x 64 -> 192 x 64, cropped in the middle
    pixels, time_ids = crop_with_geometry(image, (64, 64))
    assert pixels.shape == (3, 64, 64) and time_ids == (100, 300, 0, 64, 64, 64)
    tall = crop_with_geometry(Image.new("RGB", (60, 90)), (64, 48))[1]  # bucket (h, w) = (64, 48)
    assert tall == (90, 60, 4, 0, 64, 48)  # 60x90 -> 48x72, 8 rows to spare: crop top 4


@pytest.mark.parametrize("family, overrides", [
    ("sd15", [PIXEL]),  # SD 1.x, full fine-tuning through the pixel-space term
    ("sd15", []),  # and without it
    ("sd2-v", [LORA]),  # SD 2.x v-prediction, LoRA
    ("sdxl", [PIXEL, "quality_tune.gradient_checkpointing=true"]),
    ("sdxl", [LORA, PIXEL]),
])
def test_quality_tune_a_public_base_and_load_the_result_in_the_stock_pipeline(bases, curated_dir, tmp_path, family,
                                                                               overrides):
    base = bases[family]
    result = train_quality_tuned(curated_dir, tmp_path / "qt", "tiny", base=base, overrides=STEPS + overrides,
                                 progress=False)
    qt = result.stages[-1]
    assert result.base == base and qt.steps == 4 and len(result.stages) == 1, "no autoencoder, no pre-training"
    cfg = json.loads(json.dumps(__import__("yaml").safe_load((tmp_path / "qt" / "config.yaml").read_text())))
    prediction = "v_prediction" if family == "sd2-v" else "epsilon"
    assert cfg["diffusion"]["prediction_type"] == prediction, "the base's own schedule is trained"
    if "pixel" in " ".join(overrides):
        assert all(h["val_loss"] > 0 for h in json.loads((qt.out_dir / "report.json").read_text())["history"])

    stock = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    generator = torch.Generator().manual_seed(0)
    before = np.asarray(stock.from_pretrained(base)("a fox", num_inference_steps=2, height=64, width=64,
                                                    generator=generator).images[0])
    if LORA in overrides:
        lora = result.checkpoint / LORA_WEIGHTS
        unet_bytes = sum(f.stat().st_size for f in (base / "unet").glob("*.safetensors"))
        assert lora.is_file() and lora.stat().st_size < unet_bytes / 4, "a LoRA file is small"
        assert json.loads((result.checkpoint / LORA_MARKER).read_text())["base"] == str(base.resolve())
        pipe = stock.from_pretrained(base)
        pipe.load_lora_weights(str(result.checkpoint))  # what a user does by hand
    else:
        pipe = stock.from_pretrained(result.checkpoint)
        assert pipe.scheduler.config.prediction_type == prediction
        tuned = UNet2DConditionModel.from_pretrained(result.checkpoint / "unet").state_dict()
        original = UNet2DConditionModel.from_pretrained(base / "unet").state_dict()
        assert any(not torch.equal(tuned[k], original[k]) for k in original), "full fine-tuning moved the UNet"
    image = pipe("a fox", num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64) and not np.array_equal(np.asarray(image), before)
    # the repo's loader gives the same pipeline class with the LoRA applied
    assert isinstance(load_pipeline(result.checkpoint), stock)

    if family == "sdxl":  # every cached image carries its own time_ids: (h, w) original, crop, bucket
        cache = LatentCache(next((tmp_path / "qt" / "cache").iterdir()))
        for b, meta in enumerate(cache.meta["buckets"]):
            keys = json.loads((cache.dir / meta["name"] / "keys.json").read_text())
            expected = [crop_with_geometry(Image.open(curated_dir / key), tuple(meta["size"]))[1] for key in keys]
            assert np.asarray(cache.cond["time_ids"][b]).tolist() == [list(map(float, e)) for e in expected]
            assert all(e[4:] == tuple(meta["size"]) for e in expected)


def test_the_evaluation_compares_a_lora_with_its_base_out_of_the_box(bases, curated_dir, tmp_path):
    from model.evaluation import load_prompts
    from model.evaluation.generate import generate

    result = train_quality_tuned(curated_dir, tmp_path / "qt", "tiny", base=bases["sd15"], overrides=STEPS + [LORA],
                                 progress=False)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na bowl of oranges\n")
    manifest = generate({"base": bases["sd15"], "tuned": result.checkpoint}, load_prompts(prompts), 1, tmp_path / "eval",
                        steps=2, height=64, width=64)
    import pyarrow.parquet as pq

    rows = pq.read_table(manifest).to_pylist()
    assert len(rows) == 4
    base_img, tuned_img = (np.asarray(Image.open(tmp_path / "eval" / r["image_path"])) for r in rows
                           if r["prompt"] == "a red fox")
    assert not np.array_equal(base_img, tuned_img), "the LoRA is applied when the tuned side samples"


def test_unsupported_bases_and_lora_targets_are_clear_errors(bases, curated_dir, tmp_path):
    other = tmp_path / "kandinsky"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
    with pytest.raises(BaseError, match="KandinskyV22Pipeline; supported families: StableDiffusionPipeline, StableDiffusionXLPipeline"):
        base_family(other)
    with pytest.raises(BaseError, match="python -m model weights --base stabilityai/not-staged"):
        resolve_base("stabilityai/not-staged")
    with pytest.raises(BaseError, match="not a diffusers pipeline folder"):
        resolve_base(curated_dir)
    with pytest.raises(ValueError, match=r"\['to_qkv'\] match no module of this UNet \(e.g. \[.*'to_q'"):
        train_quality_tuned(curated_dir, tmp_path / "qt", "tiny", base=bases["sd15"], progress=False,
                            overrides=STEPS + ['quality_tune.lora={"rank": 4, "target_modules": ["to_qkv"]}'])
    with pytest.raises(BaseError, match="edm cannot fine-tune"):
        train_quality_tuned(curated_dir, tmp_path / "qt2", "tiny", base=bases["sd15"], progress=False,
                            overrides=STEPS + ["diffusion.schedule=edm"])
    assert base_family(bases["sdxl"]) == "sdxl" and base_family(bases["sd2-v"]) == "sd"


def test_cli_quality_tunes_sdxl_with_the_public_lora_preset_at_its_native_size(bases, curated_dir, tmp_path, capsys):
    from model.__main__ import main

    small = ["sample.score=null", "mixed_precision=no", "quality_tune.max_steps=2", "quality_tune.batch_size=4",
             "quality_tune.micro_batch_size=null", "quality_tune.min_images=4", "quality_tune.eval_every=2",
             "quality_tune.val_fraction=0.2", "sample.num_inference_steps=2", "quality_tune.pixel_loss_weight=0.0"]
    args = ["train-qt", "--preset", "public-lora", "--data", str(curated_dir), "--out", str(tmp_path / "qt")]
    assert main([*args, "--base", str(bases["sdxl"]), *[a for s in small for a in ("--set", s)]]) == 0
    printed = capsys.readouterr().out
    best = tmp_path / "qt" / "quality_tune" / "best"
    assert f"quality-tuned checkpoint (best, step 2): {best}" in printed and (best / LORA_WEIGHTS).is_file()
    # resolution null = the base's native 64 px (tiny UNet sample_size 32 x autoencoder /2)
    assert [d.name for d in (tmp_path / "qt" / "cache").iterdir()][0].endswith("-64")
    assert __import__("yaml").safe_load((tmp_path / "qt" / "config.yaml").read_text())["quality_tune"]["resolution"] == 64

    other = tmp_path / "kandinsky"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
    assert main([*args, "--base", str(other)]) == 2
    assert "KandinskyV22Pipeline; supported families" in capsys.readouterr().err
