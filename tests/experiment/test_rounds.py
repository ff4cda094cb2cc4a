"""The curation on the haystack: the real pipeline and the project's round decisions keep better images."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from annotation import schema as S
from experiment.haystack import make_haystack
from experiment.rounds import RoundsConfig, curate


def test_the_simulated_rounds_keep_higher_q_images(tmp_path):
    hay = make_haystack(tmp_path / "hay", 400, seed=5)
    result = curate(hay, tmp_path / "work", RoundsConfig(generalist_target=120, specialist_target=40), 64)
    q, funnel = result["mean_q"], result["funnel"]
    assert funnel["haystack"] == 400
    assert funnel["automatic_filters"] < 400
    assert 0 < funnel["specialist"] <= 40 and funnel["generalist"] <= 120
    assert q["generalist"] > q["automatic_filters"] + 0.03
    assert q["specialist"] > q["generalist"]
    # the rounds wrote the tables the real rounds write, decided by annotation.curation.decide_round
    for name in ("generalist", "specialist"):
        annotations = pq.read_table(tmp_path / "work" / "annotation" / name / "annotations.parquet")
        assert annotations.schema.equals(S.ANNOTATIONS_SCHEMA)
        decisions = pq.read_table(tmp_path / "work" / "annotation" / name / "decisions.parquet")
        assert decisions.schema.equals(S.DECISIONS_SCHEMA)
    # the curated set is an imagefolder whose captions are the specialists' (the grammar's) captions
    lines = [json.loads(x) for x in (tmp_path / "work/annotation/curated/metadata.jsonl").read_text().splitlines()]
    assert len(lines) == funnel["specialist"]
    assert all((tmp_path / "work/annotation/curated" / x["file_name"]).is_file() and " at the " in x["text"] for x in lines)
