"""The OCR scorer's opt-in text-presence gate (half-size CRAFT first): off by default; when on, a clean
photo is scored 0 without the full-size pass, an overlaid-text image still takes it, and the counts and
areas equal the ungated route's (which tests/pipeline/scorers/test_ocr.py holds to Reader.readtext)."""

from __future__ import annotations

import pytest

from pipeline import schema
from pipeline.scorers import build_scorer
from tests.pipeline.scorers.images import photo, table, with_text


@pytest.fixture(scope="module")
def scorers():
    gated = build_scorer("ocr", {"device": "cpu", "gate_scale": 0.5})
    full = build_scorer("ocr", {"device": "cpu"})
    gated.setup()
    full.setup()
    return gated, full


def test_clean_photo_skips_full_pass_and_text_image_does_not(scorers):
    gated, full = scorers
    assert full.options.gate_scale is None, "the gate is off by default (it misses small scene text)"
    clean = photo("horse")
    text, _ = with_text(photo("coffee"), seed=2, lines=2)

    gated.skipped_full_pass = 0
    out = gated(table([clean]))
    assert gated.skipped_full_pass == 1
    assert out.column(schema.OCR_WORD_COUNT).to_pylist() == [0]
    assert out.column(schema.OCR_TEXT_AREA).to_pylist() == [0.0]

    gated.skipped_full_pass = 0
    out = gated(table([text]))
    assert gated.skipped_full_pass == 0, "an overlaid-text image must take the full-size pass"
    assert out.column(schema.OCR_WORD_COUNT).to_pylist()[0] >= 2

    both = table([clean, text])
    gated_out, full_out = gated(both), full(both)
    assert full.skipped_full_pass == 0, "the default runs every image through the full pass"
    for column in (schema.OCR_WORD_COUNT, schema.OCR_TEXT_AREA):
        assert gated_out.column(column).to_pylist() == full_out.column(column).to_pylist()


def test_gate_scale_out_of_range_is_rejected():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        build_scorer("ocr", {"gate_scale": 0})
    with pytest.raises(ValidationError):
        build_scorer("ocr", {"gate_scale": 1.5})
