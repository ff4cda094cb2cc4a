"""Early stopping on the automatic score of the fixed-prompt samples (``sample.score``): the curation
pipeline's CLIP and aesthetic scorers on the generated images.

No CLIP weights exist offline, so CLIP here is "tiny-random-clip-768" (tests/builders.py): a 2-layer open_clip
model with RANDOM weights and 768-wide embeddings, so the REAL LAION aesthetic head from ../shared can read
them. Its scores are meaningless; the tests check that the score is the pipeline's
score of the samples and that it picks the best checkpoint and stops training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.config import SampleScoreConfig, load_config
from model.evaluation import PipelineSampleScorer
from model.pipeline import load_pipeline
from model.train import Frozen, run_stage, sample_grid
from tests.builders import tiny_random_clip
from tests.model.conftest import FAST, photo_variants

HEAD = "weights/aesthetic/improved_sac+logos+ava1-l14-linearMSE.pth"


@pytest.fixture(scope="module")
def score_options(tmp_path_factory, shared_dir) -> dict:
    return {"metric": "aesthetic+clip", "clip_weight": 10.0,
            "clip": tiny_random_clip(tmp_path_factory.mktemp("clip"), embed_dim=768),
            "aesthetic": {"head": str(shared_dir / HEAD)}}


def test_the_score_is_the_aesthetic_and_clip_score_of_the_samples(score_options, shared_dir):
    import open_clip

    scorer = PipelineSampleScorer(SampleScoreConfig.model_validate(score_options))
    images = [im for im, _ in photo_variants(3)]
    prompts = ["an astronaut in a white suit", "a cup of coffee", "a tabby cat"]
    parts = scorer(images, prompts)

    # the same figures computed here directly: open_clip's own loader and the head's documented layers
    name = score_options["clip"]["model"]
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=score_options["clip"]["checkpoint"])
    model.eval()
    with torch.no_grad():
        image = F.normalize(model.encode_image(torch.stack([preprocess(im) for im in images])), dim=-1)
        text = F.normalize(model.encode_text(open_clip.get_tokenizer(name)(prompts)), dim=-1)
        head = torch.load(shared_dir / HEAD, map_location="cpu", weights_only=True)
        x = image.half().float()  # the pipeline stores embeddings as float16
        for i in (0, 2, 4, 6, 7):  # improved predictor: Linear layers, dropout between, no activations
            x = F.linear(x, head[f"layers.{i}.weight"], head[f"layers.{i}.bias"])
    assert parts["clip_score"] == pytest.approx((image * text).sum(-1).mean().item(), abs=2e-3)
    assert parts["aesthetic"] == pytest.approx(x.mean().item(), abs=1e-3)
    assert parts["score"] == pytest.approx(parts["aesthetic"] + 10.0 * parts["clip_score"])

    only_clip = PipelineSampleScorer(SampleScoreConfig.model_validate(score_options | {"metric": "clip_score"}))
    assert only_clip(images, prompts)["score"] == pytest.approx(parts["clip_score"], abs=1e-6)
    with pytest.raises(ValueError, match="3 images for 2 prompts"):
        scorer(images, prompts[:2])


def test_a_typo_in_the_scorer_options_fails_when_the_config_loads(score_options):
    with pytest.raises(ValueError, match="sample.score.clip"):
        load_config("tiny", [f"sample.score={json.dumps(score_options | {'clip': {'modle': 'ViT-L-14'}})}"])
    laion = {"model": "ViT-L-14", "pretrained": "laion2b_s32b_b82k"}
    with pytest.raises(ValueError, match="trained on ViT-L-14 openai embeddings"):
        load_config("tiny", [f"sample.score={json.dumps(score_options | {'clip': laion, 'aesthetic': {}})}"])


def test_quality_tuning_keeps_the_best_sample_score_and_stops_on_it(score_options, frozen, curated_dir, tmp_path):
    patience = 2
    cfg = load_config("tiny", FAST + [f"sample.score={json.dumps(score_options)}", "quality_tune.max_steps=12",
                                      "quality_tune.learning_rate=3e-3", "quality_tune.ema_decay=null",
                                      f"quality_tune.early_stopping_patience={patience}"])
    scorer = PipelineSampleScorer(cfg.sample.score)
    result = run_stage(cfg, cfg.quality_tune, curated_dir, tmp_path / "qt", frozen, sample_scorer=scorer, progress=False)
    history = json.loads((tmp_path / "qt" / "report.json").read_text())["history"]

    assert history and all(isinstance(h[k], float) for h in history
                           for k in ("val_loss", "sample_score", "sample_aesthetic", "sample_clip_score"))
    # replay the rule from the outside: best = highest sample score; stop after `patience` evals without a better one
    best, best_step, bad, stop_at = None, None, 0, None
    for h in history:
        if best is None or h["sample_score"] > best + 1e-6:
            best, best_step, bad = h["sample_score"], h["step"], 0
        else:
            bad += 1
            if bad >= patience:
                stop_at = h["step"]
                break
    print(f"scores {[round(h['sample_score'], 4) for h in history]}; best step {best_step}; stopped {result.stopped}")
    assert result.best_step == best_step
    assert result.stopped == ("early_stopping" if stop_at else "max_steps")
    assert history[-1]["step"] == (stop_at or 12)
    assert len(result.grids) == len(history), "every evaluation keeps its grid"

    # best/ holds the weights that scored best: sampling it again gives the recorded score
    pipe = load_pipeline(result.checkpoint)
    scaling = pipe.vae.config.scaling_factor
    images = sample_grid(pipe.unet, Frozen(pipe.tokenizer, pipe.text_encoder, pipe.vae), cfg, scaling,
                         *_sample_size(result.grids[0], len(cfg.sample.prompts)))
    assert scorer(images, cfg.sample.prompts)["score"] == pytest.approx(best, abs=1e-3)


def _sample_size(grid: Path, n: int) -> tuple[int, int]:
    """Height and width of one sample in a saved grid (ceil(sqrt(n)) columns, as run_stage lays them out)."""
    import math

    from PIL import Image

    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    with Image.open(grid) as im:
        return im.height // rows, im.width // cols
