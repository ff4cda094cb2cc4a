"""Early stopping on the automatic score of quality-tuning's evaluation samples (``sample.score``): the
curation pipeline's CLIP and aesthetic scorers, or KID against the curated images, on images of a prompt
selection that the evaluation stage then leaves out of what it reports.

No CLIP weights exist offline, so CLIP here is "tiny-random-clip-768" (tests/builders.py): a 2-layer open_clip
model with RANDOM weights and 768-wide embeddings, so the REAL LAION aesthetic head from ../shared can read
them. Its scores are meaningless; the tests check that the score is the pipeline's
score of the samples and that it picks the best checkpoint and stops training."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from model.config import SampleScoreConfig, load_config
from model.evaluation import PipelineSampleScorer
from model.pipeline import load_pipeline
from model.evaluation import EvaluationError, load_prompts
from model.evaluation.generate import generate
from model.evaluation.prompts import SELECTION_FILE, selection_prompts
from model.bases import Frozen
from model.export import score_selection
from model.train import run_stage
from tests.builders import tiny_random_clip
from tests.model.conftest import FAST, photo_variants

# a small selection (4 PartiPrompts x 2 seeds) keeps each evaluation of the tiny model quick on a CPU
SMALL = {"n_prompts": 4, "seeds": 2, "batch_size": 4}

HEAD = "weights/aesthetic/improved_sac+logos+ava1-l14-linearMSE.pth"


@pytest.fixture(scope="module")
def score_options(tmp_path_factory, shared_dir) -> dict:
    return {"metric": "aesthetic+clip", "clip_weight": 10.0, **SMALL,
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

    # best/ holds the weights that scored best: sampling its selection again gives the recorded score
    pipe = load_pipeline(result.checkpoint)
    scaling = pipe.vae.config.scaling_factor
    again = score_selection(pipe.unet, Frozen(pipe.tokenizer, pipe.text_encoder, pipe.vae), cfg, scaling,
                            *_sample_size(result.grids[0], len(cfg.sample.prompts)), scorer)
    assert again["score"] == pytest.approx(best, abs=1e-3)
    # the scored images were the selection's 4 PartiPrompts x 2 seeds, recorded beside the checkpoint
    record = json.loads((result.checkpoint / SELECTION_FILE).read_text())
    assert record["prompts"] == scorer.prompts and len(scorer.prompts) == 4 and record["seeds"] == [0, 1]
    parti = load_prompts("parti")
    assert set(record["prompt_ids"]) <= set(parti.column("prompt_id").to_pylist())


def test_kid_early_stopping_offline_and_its_prompts_are_not_reported(staged_mobilenet, frozen, curated_dir, tmp_path,
                                                                     capsys):
    """metric kid: minus the KID of the samples' MobileNetV2 features against the curated images (no CLIP
    needed). The prompts that chose the checkpoint are then left out by the evaluation stage."""
    from model.__main__ import main
    from model.evaluation.distribution import ImageNetFeatures, kid, read_reference
    from pipeline.imageio import inspect_image
    from pipeline.schema import THUMBNAIL_SIZE

    cfg = load_config("tiny", FAST + [f"sample.score={json.dumps({'metric': 'kid', 'reference_limit': 8, **SMALL})}",
                                      "quality_tune.max_steps=4", "quality_tune.ema_decay=null"])
    scorer = PipelineSampleScorer(cfg.sample.score, reference=curated_dir, seed=cfg.seed)
    assert scorer.clip is None and scorer.reference.shape == (8, 1280)

    # the score of some images is minus KID as computed here from the same pieces, by hand
    images = [im for im, _ in photo_variants(4, seed=3)]
    parts = scorer(images, ["p"] * 4)
    features = ImageNetFeatures()
    own = [inspect_image(_png(im), THUMBNAIL_SIZE).thumbnail for im in images]
    reference = read_reference(curated_dir, limit=8, seed=cfg.seed).thumbnails
    expected = kid(features([_open(t) for t in own]), features([_open(t) for t in reference]), seed=0).mean
    assert parts["kid"] == pytest.approx(expected, rel=1e-4, abs=1e-6) and parts["score"] == -parts["kid"]

    result = run_stage(cfg, cfg.quality_tune, curated_dir, tmp_path / "qt", frozen, sample_scorer=scorer, progress=False)
    report = json.loads((tmp_path / "qt" / "report.json").read_text())
    assert all(h["sample_score"] == -h["sample_kid"] for h in report["history"]) and len(report["history"]) == 2
    best = max(report["history"], key=lambda h: h["sample_score"])
    assert result.best_step == best["step"] and result.best_sample_score == best["sample_score"]
    assert report["selection_prompts"]["prompts"] == scorer.prompts

    # the evaluation stage: those 4 prompts are not among the ones it reports on
    chosen = selection_prompts([result.checkpoint])[str(result.checkpoint)]
    assert chosen == scorer.prompts
    with pytest.raises(EvaluationError, match="4 of these prompts chose checkpoint"):
        generate({"tuned": result.checkpoint}, load_prompts("parti").filter(
            pa.compute.is_in(load_prompts("parti").column("prompt"), pa.array(chosen))), 1, tmp_path / "refused")
    assert main(["generate", "--checkpoint", f"tuned={result.checkpoint}", "--prompts", "parti", "--n", "6",
                 "--seeds", "1", "--steps", "1", "--out", str(tmp_path / "eval")]) == 0
    assert "left out the 4 prompts that chose" in capsys.readouterr().out
    manifest = pq.read_table(tmp_path / "eval" / "manifest.parquet")
    assert manifest.num_rows == 6 and not set(manifest.column("prompt").to_pylist()) & set(chosen)
    # and load_prompts(exclude=) drops exactly them from the full set
    assert load_prompts("parti", exclude=chosen).num_rows == load_prompts("parti").num_rows - 4


def _png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _open(data: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def _sample_size(grid: Path, n: int) -> tuple[int, int]:
    """Height and width of one sample in a saved grid (ceil(sqrt(n)) columns, as run_stage lays them out)."""
    import math

    from PIL import Image

    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    with Image.open(grid) as im:
        return im.height // rows, im.width // cols


def test_model_weights_stages_the_judges_features_and_says_what_is_missing(staged_mobilenet, tmp_path, monkeypatch,
                                                                             capsys):
    from model.__main__ import main

    monkeypatch.setenv("NEEDLES_OFFLINE", "1")
    assert main(["weights"]) == 0
    assert "mobilenet_v2-b0353104.pth" in capsys.readouterr().out
    # the sd15 preset's sample.score needs ViT-L/14, which is not staged here: one clear error, exit 2
    monkeypatch.setenv("NEEDLES_WEIGHTS_DIR", str(tmp_path / "empty"))
    assert main(["weights", "--preset", "sd15"]) == 2
    assert "ViT-L-14" in capsys.readouterr().err
