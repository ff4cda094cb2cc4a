"""The haystack's known quality and the pixel q-estimator: q falls with every defect, the caption checks
read the drawn object back."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from experiment.haystack import (DEFECTS, HaystackError, draw_scene, make_haystack, parts_of, read_truth, render,
                                 true_q)
from experiment.quality import alignment, estimate, parse_caption

STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@pytest.fixture(scope="module")
def clean_scenes():
    rng = np.random.default_rng(7)
    return [dataclasses.replace(draw_scene(rng, defect_rate=0.0), dx=0.0, dy=0.0) for _ in range(8)]


@pytest.mark.parametrize("defect", [d for d in DEFECTS if d != "offset"])
def test_true_q_and_the_estimate_fall_as_each_defect_grows_the_others_fixed(clean_scenes, defect):
    truth, estimated = [], []
    for strength in STRENGTHS:
        scenes = [dataclasses.replace(s, **{defect: strength}) for s in clean_scenes]
        truth.append(np.mean([true_q(s) for s in scenes]))
        estimated.append(np.mean([estimate(render(s)).q for s in scenes]))
    assert all(b < a for a, b in zip(truth, truth[1:])), truth
    # the estimate is measured from pixels: non-increasing within its jitter, and clearly lower at full strength
    assert all(b <= a + 0.01 for a, b in zip(estimated, estimated[1:])), (defect, estimated)
    assert estimated[-1] < estimated[0] - 0.1, (defect, estimated)


def test_composition_falls_with_the_offset_from_the_thirds_point(clean_scenes):
    for offsets in ((0.0, 0.05, 0.1, 0.15),):
        truth = [np.mean([parts_of(dataclasses.replace(s, dx=o))["composition"] for s in clean_scenes]) for o in offsets]
        est = [np.mean([estimate(render(dataclasses.replace(s, dx=o))).composition for s in clean_scenes])
               for o in offsets]
        assert all(b < a for a, b in zip(truth, truth[1:]))
        assert all(b < a for a, b in zip(est, est[1:])), est
        assert max(abs(t - e) for t, e in zip(truth, est)) < 0.1, (truth, est)


def test_caption_checks_read_the_drawn_object_back(tmp_path):
    hay = make_haystack(tmp_path / "hay", 60, seed=3)
    truth = read_truth(hay).to_pylist()
    from PIL import Image

    passed = []
    for t in truth:
        est = estimate(Image.open(hay / t["file_name"]))
        assert parse_caption(t["caption"]) == {k: t[k] for k in ("count", "colour", "object", "position")}
        passed.append(alignment(est, t["colour"], t["position"], t["count"])["all"])
        if not any(t[f"defect_{d}"] for d in ("washout", "exposure", "clutter", "text")):
            # a vivid subject on a clean background, not cut by overlaid text, is always read right
            assert passed[-1], (t["caption"], est)
    assert np.mean(passed) > 0.45  # washed-out, dark, cluttered or text-covered renders lose their subject
    # a wrong caption fails its check
    t = truth[0]
    wrong = next(c for c in ("red", "blue") if c != t["colour"])
    assert not alignment(estimate(Image.open(hay / t["file_name"])), wrong, t["position"], t["count"])["all"]


def test_haystack_is_seeded_and_refuses_bad_sizes(tmp_path):
    a, b = make_haystack(tmp_path / "a", 5, seed=1), make_haystack(tmp_path / "b", 5, seed=1)
    assert (a / "000004.png").read_bytes() == (b / "000004.png").read_bytes()
    assert (a / "captions.jsonl").read_text() == (b / "captions.jsonl").read_text()
    with pytest.raises(HaystackError):
        make_haystack(tmp_path / "c", 0, seed=1)
    with pytest.raises(HaystackError):
        make_haystack(tmp_path / "c", 3, seed=1, size=16)
