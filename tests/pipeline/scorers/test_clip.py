"""CLIP scorer with tiny-random-clip (a randomly initialised 2-layer open_clip model built from config:
no CLIP weights exist offline). Checks the plumbing the real ViT-L/14 goes through."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline import schema
from pipeline.scorers import build_scorer
from pipeline.scorers.common import arrow_to_embeddings
from pipeline.weights import WeightsError
from tests.pipeline.scorers.images import photo, table


@pytest.fixture(scope="module")
def clip(tiny_clip):
    scorer = build_scorer("clip", tiny_clip)
    scorer.setup()
    return scorer


def test_embeddings_scores_and_caption_nulls(clip):
    long_caption = "a very " + "long " * 120 + "caption"
    captions = ["an astronaut in a white suit", None, "   ", long_caption, "a cat"]
    images = [photo("astronaut"), photo("chelsea"), photo("coffee"), photo("rocket"), photo("camera").convert("L")]
    out = clip(table(images, captions))

    image_vectors, image_valid = arrow_to_embeddings(out.column(schema.CLIP_IMAGE_EMBEDDING), what="image")
    text_vectors, text_valid = arrow_to_embeddings(out.column(schema.CLIP_TEXT_EMBEDDING), what="text")
    assert out.schema.field(schema.CLIP_IMAGE_EMBEDDING).type.value_type.bit_width == 16
    assert image_vectors.shape == (5, 32) and image_valid.all()
    stored = np.stack([np.asarray(v, np.float32) for v in out.column(schema.CLIP_IMAGE_EMBEDDING).to_pylist()])
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, atol=2e-3)
    assert text_valid.tolist() == [True, False, False, True, True]

    scores = out.column(schema.CLIP_SCORE).to_pylist()
    assert scores[1] is None and scores[2] is None
    assert out.column(schema.CLIP_SCORE_NULL_REASON).to_pylist() == [None, "missing_caption", "empty_caption", None, None]
    for i in (0, 3, 4):
        assert scores[i] == pytest.approx(float(image_vectors[i] @ text_vectors[i]), abs=2e-3)
        assert -1.0 <= scores[i] <= 1.0
    assert out.column(schema.CAPTION_TRUNCATED).to_pylist() == [False, False, False, True, False]

    # the same image/caption scored alone gives the same embedding (no batch effects)
    alone = clip(table([images[0]], [captions[0]]))
    assert alone.column(schema.CLIP_SCORE)[0].as_py() == pytest.approx(scores[0], abs=2e-3)


def test_datacomp_scale(tiny_clip, clip):
    scaled = build_scorer("clip", {**tiny_clip, "scale": 100})
    scaled.setup()
    t = table([photo("horse")], ["a horse"])
    assert scaled(t).column(schema.CLIP_SCORE)[0].as_py() == pytest.approx(100 * clip(t).column(schema.CLIP_SCORE)[0].as_py(), abs=0.2)


def test_weights_are_resolved_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("NEEDLES_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(WeightsError, match="ViT-L-14 pretrained='openai' is not staged"):
        build_scorer("clip", {"device": "cpu"}).setup()
    with pytest.raises(WeightsError, match="no file at"):
        build_scorer("clip", {"pretrained": None, "checkpoint": str(tmp_path / "nope.pt")}).setup()
    with pytest.raises(ValueError, match="exactly one"):
        build_scorer("clip", {"pretrained": None})


def test_checkpoint_of_another_architecture_is_a_clear_error(tiny_clip):
    from pipeline.scorer import ScorerError

    with pytest.raises(ScorerError, match="does not fit open_clip ViT-B-32"):
        build_scorer("clip", {**tiny_clip, "model": "ViT-B-32"}).setup()


def test_out_of_memory_halves_the_batch_and_logs_it(caplog):
    import torch

    from pipeline.scorers.common import run_halving_on_oom

    seen = []

    def run(chunk):  # a device that fits at most 3 items per batch
        if len(chunk) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        seen.append(list(chunk))
        return sum(chunk)

    with caplog.at_level("WARNING"):
        results = run_halving_on_oom(list(range(10)), 8, run, what="clip image")
    assert sum(results) == sum(range(10))
    assert [x for chunk in seen for x in chunk] == list(range(10))  # every item once, in order
    assert max(len(c) for c in seen) == 2
    assert "retrying with batches of 4" in caplog.text and "retrying with batches of 2" in caplog.text


def test_decode_threads_give_the_same_columns_and_name_a_bad_row(tiny_clip, clip):
    """Thumbnails decoded and preprocessed in the actor's threads (what keeps a GPU fed) score exactly as
    the one-thread path does; a thumbnail that does not decode still names its row."""
    from pipeline.scorer import ScorerError

    threaded = build_scorer("clip", tiny_clip | {"decode_threads": 3})
    threaded.setup()
    assert threaded.resources.num_cpus == 3 and clip.resources.num_cpus == 1
    names = ["astronaut", "chelsea", "coffee", "rocket", "horse", "cat", "camera"]
    batch = table([photo(n) for n in names], [f"a photo of a {n}" for n in names])
    one, three = clip(batch), threaded(batch)
    for column in (schema.CLIP_IMAGE_EMBEDDING, schema.CLIP_TEXT_EMBEDDING, schema.CLIP_SCORE):
        assert three.column(column).to_pylist() == one.column(column).to_pylist()

    broken = batch.set_column(1, schema.THUMBNAIL, pa.array([b"not a jpeg"] * batch.num_rows, pa.binary()))
    with pytest.raises(ScorerError, match="row row-0: thumbnail does not decode"):
        threaded(broken)
