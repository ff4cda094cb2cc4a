"""Aesthetic scorer on the real LAION heads in ../shared/weights/aesthetic."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline import schema
from pipeline.scorer import ScorerError
from pipeline.scorers import build_scorer
from pipeline.scorers.common import embeddings_to_arrow
from pipeline.weights import WeightsError

IMPROVED = "improved_sac+logos+ava1-l14-linearMSE"


@pytest.fixture
def heads(shared_dir):
    return shared_dir / "weights" / "aesthetic"


def embedding_table(vectors: np.ndarray, valid: np.ndarray | None = None) -> pa.Table:
    return pa.table({schema.CLIP_IMAGE_EMBEDDING: embeddings_to_arrow(vectors, valid)})


def test_improved_head_reads_the_real_format_and_computes_the_documented_forward(heads):
    path = heads / f"{IMPROVED}.pth"
    state = torch.load(path, weights_only=True, map_location="cpu")
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "layers.0.weight": (1024, 768), "layers.0.bias": (1024,),
        "layers.2.weight": (128, 1024), "layers.2.bias": (128,),
        "layers.4.weight": (64, 128), "layers.4.bias": (64,),
        "layers.6.weight": (16, 64), "layers.6.bias": (16,),
        "layers.7.weight": (1, 16), "layers.7.bias": (1,),
    }
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(6, 768)).astype(np.float32)
    scorer = build_scorer("aesthetic", {"head": str(path)})
    scorer.setup()
    scores = np.array(scorer(embedding_table(vectors)).column(schema.AESTHETIC_SCORE).to_pylist())

    # by hand: normalise, then the five Linear layers with nothing between (dropout is off at inference)
    x = torch.from_numpy(vectors)
    x = x / x.norm(dim=1, keepdim=True)
    x = x.half().float()  # the embedding column is float16
    for i in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    np.testing.assert_allclose(scores, x[:, 0].numpy(), rtol=1e-5, atol=1e-4)
    assert np.all((scores > -5) & (scores < 15))


def test_relu_and_v1_heads(heads):
    relu = torch.load(heads / "improved_ava+logos-l14-reluMSE.pth", weights_only=True, map_location="cpu")
    v1 = torch.load(heads / "laion_v1_sa_0_4_vit_l_14_linear.pth", weights_only=True, map_location="cpu")
    vectors = np.random.default_rng(1).normal(size=(4, 768)).astype(np.float32)
    x0 = torch.from_numpy(vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).half().float()

    x = x0
    for n, i in enumerate((0, 3, 6, 9, 11)):
        x = x @ relu[f"layers.{i}.weight"].T + relu[f"layers.{i}.bias"]
        x = torch.relu(x) if n < 4 else x
    out = build_scorer("aesthetic", {"head": str(heads / "improved_ava+logos-l14-reluMSE.pth")})
    out.setup()
    np.testing.assert_allclose(out(embedding_table(vectors)).column(schema.AESTHETIC_SCORE).to_pylist(), x[:, 0].numpy(), rtol=1e-5, atol=1e-4)

    linear = build_scorer("aesthetic", {"head": str(heads / "laion_v1_sa_0_4_vit_l_14_linear.pth")})
    linear.setup()
    expected = (x0 @ v1["weight"].T + v1["bias"])[:, 0].numpy()
    np.testing.assert_allclose(linear(embedding_table(vectors)).column(schema.AESTHETIC_SCORE).to_pylist(), expected, rtol=1e-5, atol=1e-4)


def test_head_for_another_clip_width_is_refused(heads):
    scorer = build_scorer("aesthetic", {"head": str(heads / "laion_v1_sa_0_4_vit_b_32_linear.pth")})
    scorer.setup()
    with pytest.raises(ScorerError, match="takes 512-wide CLIP embeddings, but clip_image_embedding is 768-wide"):
        scorer(embedding_table(np.ones((2, 768), np.float32)))


def test_null_embeddings_stay_null(heads):
    scorer = build_scorer("aesthetic", {"head": str(heads / f"{IMPROVED}.pth")})
    scorer.setup()
    out = scorer(embedding_table(np.ones((3, 768), np.float32), np.array([True, False, True])))
    scores = out.column(schema.AESTHETIC_SCORE).to_pylist()
    assert scores[1] is None and scores[0] == pytest.approx(scores[2])


def test_known_head_resolves_from_the_weights_dir_and_checks_its_hash(heads, tmp_path, monkeypatch):
    monkeypatch.setenv("NEEDLES_WEIGHTS_DIR", str(tmp_path))
    scorer = build_scorer("aesthetic", {"head": IMPROVED})
    with pytest.raises(WeightsError, match="sac\\+logos\\+ava1-l14-linearMSE.pth"):
        scorer.setup()
    (tmp_path / "files").mkdir()
    staged = tmp_path / "files" / "sac+logos+ava1-l14-linearMSE.pth"
    staged.symlink_to(heads / f"{IMPROVED}.pth")
    scorer.setup()
    assert scorer.head.input_width == 768
    staged.unlink()
    staged.symlink_to(heads / "improved_ava+logos-l14-linearMSE.pth")  # right name, wrong file
    with pytest.raises(WeightsError, match="expected 21dd590f"):
        scorer.setup()


def test_not_a_head_is_a_clear_error(tmp_path):
    bogus = tmp_path / "bogus.pth"
    torch.save({"fc.weight": torch.zeros(1, 768)}, bogus)
    with pytest.raises(ScorerError, match="unknown layout"):
        build_scorer("aesthetic", {"head": str(bogus)}).setup()
