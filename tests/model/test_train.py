"""The training loop on CPU with tiny models: a TINY RANDOMLY-INITIALISED CLIP text encoder and a
tiny randomly-initialised AutoencoderKL (built from config; no weights are downloaded)."""

from __future__ import annotations

import copy
import errno
import json
from pathlib import Path

import pytest
import torch

from model.autoencoder import ChannelMismatchError, build_kl_autoencoder
from model.data import DataError
from model.pipeline import load_pipeline
from model.bases import Frozen, build_unet, load_base_unet
from model.checkpoints import CheckpointError
from model.objective import diffusion_loss, generator as _generator, training_alphas_cumprod
from model.train import run_stage
from tests.model.conftest import tiny, write_imagefolder


def weights(path: Path) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(path).state_dict()


def test_few_steps_finite_loss_and_the_checkpoint_samples_in_a_stock_pipeline(frozen, curated_dir, tmp_path):
    cfg = tiny("quality_tune.max_steps=3", "quality_tune.pixel_loss_weight=2.0")
    result = run_stage(cfg, cfg.quality_tune, curated_dir, tmp_path / "qt", frozen, progress=False)
    assert result.steps == 3 and result.stopped == "max_steps"
    report = json.loads((tmp_path / "qt" / "report.json").read_text())
    assert [h["step"] for h in report["history"]] == [2, 3]  # eval_every=2 and the last step
    assert all(torch.isfinite(torch.tensor(h["val_loss"])) for h in report["history"])
    assert result.grids and result.grids[-1].is_file()
    pipe = load_pipeline(result.checkpoint)  # StableDiffusionPipeline.from_pretrained(path, vae=...)
    image = pipe("a red fox", num_inference_steps=2, height=64, width=128,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (128, 64)


def test_overfits_8_images_with_clearly_falling_loss(frozen, tmp_path):
    data = write_imagefolder(tmp_path / "eight", 8)
    cfg = tiny("quality_tune.max_steps=60", "quality_tune.learning_rate=2e-3", "quality_tune.ema_decay=null",
               "quality_tune.caption_dropout=0.0", "quality_tune.noise_offset=0.0", "quality_tune.eval_every=1000",
               "quality_tune.checkpoint_every=1000", "quality_tune.val_fraction=0.01", "diffusion.min_snr_gamma=null",
               "data.bucket_aspect_ratios=[1.0]", "quality_tune.pixel_loss_weight=0.0")
    result = run_stage(cfg, cfg.quality_tune, data, tmp_path / "qt", frozen, progress=False)
    from model.data import LatentCache

    cache = LatentCache(next((tmp_path / "cache").iterdir()))
    z, cond = cache.gather(0, list(range(cache.sizes[0])))
    scale = json.loads((result.final / "vae" / "config.json").read_text())["scaling_factor"]

    def train_set_loss(unet) -> float:  # same noise and timesteps for both models
        with torch.no_grad():
            return sum(diffusion_loss(unet, z * scale, cond, cfg, cfg.quality_tune, _generator(0, 9, k),
                                      training_alphas_cumprod(cfg), None)[0].item() for k in range(8)) / 8

    initial = build_unet(cfg, frozen, 64).eval()  # the same seeded initialisation the run started from
    from diffusers import UNet2DConditionModel

    trained = UNet2DConditionModel.from_pretrained(result.final / "unet").eval()
    before, after = train_set_loss(initial), train_set_loss(trained)
    assert after < 0.5 * before, (before, after)


def test_resume_continues_exactly_like_an_uninterrupted_run(frozen, curated_dir, tmp_path):
    whole = tiny("quality_tune.max_steps=4")
    run_stage(whole, whole.quality_tune, curated_dir, tmp_path / "a", frozen, progress=False)
    first = tiny("quality_tune.max_steps=2")
    run_stage(first, first.quality_tune, curated_dir, tmp_path / "b", frozen, progress=False)
    resumed = run_stage(whole, whole.quality_tune, curated_dir, tmp_path / "b", frozen, progress=False)
    assert resumed.steps == 4
    a = weights(tmp_path / "a" / "checkpoints" / "step-0000004" / "unet")
    b = weights(tmp_path / "b" / "checkpoints" / "step-0000004" / "unet")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # everything resume reads is data: tensors and plain containers (weights_only=True), and JSON
    ema_a = torch.load(tmp_path / "a" / "checkpoints" / "step-0000004" / "ema.pt", weights_only=True)
    ema_b = torch.load(tmp_path / "b" / "checkpoints" / "step-0000004" / "ema.pt", weights_only=True)
    assert ema_a["optimization_step"] == ema_b["optimization_step"] == 4
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(ema_a["shadow_params"], ema_b["shadow_params"]))
    saved = torch.load(tmp_path / "b" / "checkpoints" / "step-0000004" / "training_state.pt", weights_only=True)
    assert set(saved) == {"optimizer", "lr_scheduler"} and saved["lr_scheduler"]["last_epoch"] == 4
    loops = [json.loads((tmp_path / run / "checkpoints" / "step-0000004" / "loop_state.json").read_text())
             for run in ("a", "b")]
    assert loops[0] == loops[1] and loops[1]["step"] == 4 and [h["step"] for h in loops[1]["history"]] == [2, 4]


def _ran_on_load(marker: str) -> str:
    Path(marker).write_text("code ran while the checkpoint loaded")
    return "payload"


class RunsCodeOnLoad:
    """Unpickling this calls _ran_on_load: what a hostile training_state.pt could do with any function."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return _ran_on_load, (self.marker,)


@pytest.mark.parametrize("file", ["training_state.pt", "ema.pt"])
def test_a_checkpoint_file_that_would_run_code_on_load_is_refused(frozen, curated_dir, tmp_path, file):
    cfg = tiny("quality_tune.max_steps=2")
    run_stage(cfg, cfg.quality_tune, curated_dir, tmp_path / "qt", frozen, progress=False)
    target = tmp_path / "qt" / "checkpoints" / "step-0000002" / file
    marker = tmp_path / "ran.txt"
    saved = torch.load(target, weights_only=True)
    torch.save(saved | {"extra": RunsCodeOnLoad(marker)}, target)
    torch.load(target, weights_only=False)  # the file is hostile: loading it unrestricted runs the code
    assert marker.read_text() == "code ran while the checkpoint loaded"
    marker.unlink()

    more = tiny("quality_tune.max_steps=4")
    with pytest.raises(CheckpointError, match=rf"{file} holds objects other than tensors and plain containers; "
                                              r"refusing to load it .*GLOBAL tests.model.test_train._ran_on_load was not an allowed global"):
        run_stage(more, more.quality_tune, curated_dir, tmp_path / "qt", frozen, progress=False)
    assert not marker.exists(), "resuming must not run the checkpoint's code"


@pytest.mark.parametrize("path, why", [
    ("../../elsewhere", "outside the checkpoints folder"),
    ("/tmp/step-0000002", "outside the checkpoints folder"),
    ("step-0000002/../..", "outside the checkpoints folder"),
    ("link-out", "outside the checkpoints folder"),
    (".", "outside the checkpoints folder"),
    (7, "must be the name of a checkpoint folder"),
])
def test_latest_json_must_name_a_folder_inside_the_checkpoints_folder(tmp_path, path, why):
    from model.checkpoints import latest_checkpoint

    root = tmp_path / "run" / "checkpoints"
    (root / "step-0000002").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (root / "link-out").symlink_to(tmp_path / "elsewhere")
    (root / "latest.json").write_text(json.dumps({"step": 2, "path": "step-0000002"}))
    assert latest_checkpoint(root) == root / "step-0000002"
    (root / "latest.json").write_text(json.dumps({"step": 2, "path": path}))
    with pytest.raises(CheckpointError, match=why):
        latest_checkpoint(root)
    (root / "latest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="is not a checkpoint pointer"):
        latest_checkpoint(root)


def test_pixel_loss_gradient_reaches_the_unet_only(frozen, tmp_path):
    from model.autoencoder import load_autoencoder

    cfg = tiny("quality_tune.pixel_loss_weight=4.0", "quality_tune.noise_offset=0.1")
    unet = build_unet(cfg, frozen, 64)
    z = torch.randn(2, 4, 8, 8)
    text = {"text": torch.randn(2, 77, 32)}
    # the decoder as training loads it (load_autoencoder), from a copy whose weights still train
    trainable = copy.deepcopy(frozen.vae).requires_grad_(True)
    trainable.save_pretrained(tmp_path / "vae")
    vae = load_autoencoder(cfg.autoencoder.model_copy(update={"path": str(tmp_path / "vae")}))
    decode = lambda x: vae.decode(x).sample  # noqa: E731
    loss, parts = diffusion_loss(unet, z, text, cfg, cfg.quality_tune, _generator(0, 5), training_alphas_cumprod(cfg),
                                 decode)
    loss.backward()
    assert parts["pixel"] > 0
    assert all(p.grad is None for p in vae.parameters()), "the decoder the pixel loss runs through stays frozen"
    with_pixel = torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None])
    assert with_pixel.abs().sum() > 0
    unet.zero_grad(set_to_none=True)
    latent_only = tiny("quality_tune.noise_offset=0.1")
    diffusion_loss(unet, z, text, latent_only, latent_only.quality_tune, _generator(0, 5),
                   training_alphas_cumprod(cfg), decode)[0].backward()
    without = torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None])
    assert not torch.allclose(with_pixel, without)  # the pixel term changes the UNet's gradient


@pytest.mark.parametrize("schedule", ["zero_snr", "edm"])
def test_other_schedules_train_with_finite_loss(frozen, curated_dir, tmp_path, schedule):
    pred = "v_prediction" if schedule == "zero_snr" else "epsilon"
    cfg = tiny("quality_tune.max_steps=2", f"diffusion.schedule={schedule}", f"diffusion.prediction_type={pred}",
               "quality_tune.pixel_loss_weight=1.0")
    result = run_stage(cfg, cfg.quality_tune, curated_dir, tmp_path / schedule, frozen, progress=False)
    assert result.stopped == "max_steps"
    assert json.loads((result.final / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == (
        "EDMEulerScheduler" if schedule == "edm" else "DDIMScheduler")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(frozen, curated_dir, tmp_path):
    cfg = tiny("quality_tune.max_steps=2")
    run_stage(cfg, cfg.quality_tune, curated_dir, tmp_path / "qt", frozen, progress=False)
    for latents in (tmp_path / "cache").rglob("latents.npy"):  # poison the cached latents
        import numpy as np

        arr = np.load(latents)
        arr[:] = np.nan
        np.save(latents, arr)
    more = tiny("quality_tune.max_steps=6")
    result = run_stage(more, more.quality_tune, curated_dir, tmp_path / "qt", frozen, progress=False)
    assert result.stopped == "nan at step 2" and result.steps == 2
    assert json.loads((tmp_path / "qt" / "checkpoints" / "latest.json").read_text())["step"] == 2


def test_disk_full_while_saving_leaves_latest_on_the_previous_checkpoint(frozen, curated_dir, tmp_path, monkeypatch):
    cfg = tiny("quality_tune.max_steps=2")
    run_stage(cfg, cfg.quality_tune, curated_dir, tmp_path / "qt", frozen, progress=False)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    more = tiny("quality_tune.max_steps=4")
    with pytest.raises(CheckpointError, match="latest still points at step-0000002"):
        run_stage(more, more.quality_tune, curated_dir, tmp_path / "qt", frozen, progress=False)
    ckpts = tmp_path / "qt" / "checkpoints"
    assert json.loads((ckpts / "latest.json").read_text())["step"] == 2
    assert not list(ckpts.glob(".tmp-*"))
    assert weights(ckpts / "step-0000002" / "unet")


def test_base_checkpoint_with_other_latent_channels_is_rejected(frozen, tmp_path):
    cfg = tiny("autoencoder.latent_channels=16")
    other = Frozen(frozen.tokenizer, frozen.text_encoder, build_kl_autoencoder(cfg.autoencoder))
    build_unet(cfg, other, 64).save_pretrained(tmp_path / "base" / "unet")
    with pytest.raises(ChannelMismatchError, match="16-channel latents.*4-channel"):
        load_base_unet(tmp_path / "base", frozen)


def test_a_too_small_curated_set_is_a_clear_error(frozen, tmp_path):
    data = write_imagefolder(tmp_path / "three", 5, missing_captions=2)
    cfg = tiny()
    with pytest.raises(DataError, match=r"3 usable captioned images \(2 without a caption skipped\).*at least 4"):
        run_stage(cfg, cfg.quality_tune, data, tmp_path / "qt", frozen, progress=False)
