"""The embedded sample's overlaid-text rows are caught by OCR at the default max_ocr_words and its clean
photos are not."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from pipeline import schema
from pipeline.config import FILTERS_BY_NAME
from pipeline.sample import generate_sample
from pipeline.scorers import build_scorer
from tests.pipeline.scorers.images import jpeg, table


@pytest.fixture(scope="module")
def sample_rows(tmp_path_factory):
    folder = generate_sample(tmp_path_factory.mktemp("sample"), n=120, seed=0)
    rows = [json.loads(line) for line in (folder / "captions.jsonl").read_text().splitlines()]
    overlay = [r for r in rows if r["defect"] == "overlay_text"][:7]
    clean = [r for r in rows if r["defect"] == "clean"][:4]
    thumbnails = []
    for r in overlay + clean:
        image = Image.open(io.BytesIO((folder / r["file_name"]).read_bytes())).convert("RGB")
        image.thumbnail((schema.THUMBNAIL_SIZE, schema.THUMBNAIL_SIZE))
        thumbnails.append(jpeg(image))
    return overlay, clean, thumbnails


def test_overlay_text_rows_are_caught_and_clean_rows_kept(sample_rows):
    overlay, clean, thumbnails = sample_rows
    scorer = build_scorer("ocr", {"device": "cpu"})
    scorer.setup()
    out = scorer(table(thumbnails))
    counts = out.column(schema.OCR_WORD_COUNT).to_pylist()
    areas = out.column(schema.OCR_TEXT_AREA).to_pylist()
    found = counts[: len(overlay)]
    # every overlaid phrase (7-10 words) is found and, at the default max_ocr_words, dropped: readtext
    # sometimes joins two words ("FREESHIPPING"), still more than 5 words are counted
    limit = FILTERS_BY_NAME["max_ocr_words"].default
    for row, count in zip(overlay, found):
        assert count > limit, (row["overlay_text"], row.get("overlay_font_px"), count)
    assert all(a > 0 for a in areas[: len(overlay)])
    assert counts[len(overlay) :] == [0] * len(clean)
    assert areas[len(overlay) :] == [0.0] * len(clean)
