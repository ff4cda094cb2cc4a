"""The funnel and the HTML report over a small run directory with real JPEG thumbnails."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import schema
from pipeline.config import THRESHOLD_FILTERS, parse_config
from pipeline.report import ReportError, build_report, captions_by_source, funnel, funnel_markdown
from pipeline.select import SelectError, run_select
from tests.builders import random_photo, write_ingest_run

N = 40


def quarantine_rows(reasons: list[str]) -> pa.Table:
    return pa.Table.from_pylist(
        [{schema.SOURCE: "test", schema.SOURCE_KEY: f"bad{k}", schema.ID: None, schema.REASON: r, schema.DETAIL: "made in a test"}
         for k, r in enumerate(reasons)],
        schema=schema.QUARANTINE_SCHEMA,
    )


@pytest.fixture
def run(tmp_path):
    """40 ingested rows in 2 shards + 3 quarantined + 2 exact duplicates; scores chosen per row."""
    layout = write_ingest_run(tmp_path / "run", N, shard_rows=20)
    pq.write_table(quarantine_rows(["corrupt_image", "corrupt_image", "empty_file"]), layout.quarantine)
    pq.write_table(quarantine_rows(["exact_duplicate", "exact_duplicate"]), layout.duplicates)
    rng = np.random.default_rng(1)
    layout.score.mkdir()
    for shard in layout.ingest_shards():
        ids = pq.read_table(shard, columns=[schema.ID])[schema.ID]
        m = len(ids)
        phash = rng.integers(-(2**63), 2**63 - 1, m, dtype=np.int64)
        phash[1] = phash[0] ^ 0b101  # one near-duplicate pair per shard (rows 0 and 1 pass the thresholds)
        aesthetic = rng.uniform(3, 8, m)
        aesthetic[:2] = [6.0, 7.0]
        pq.write_table(
            pa.table({
                schema.ID: ids,
                schema.ASPECT_RATIO: pa.array(np.r_[[1.5, 1.5, 4.0, 4.0], rng.uniform(1, 2, m - 4)], pa.float32()),
                schema.AESTHETIC_SCORE: pa.array(aesthetic, pa.float32()),
                schema.PHASH: pa.array(phash),
                schema.CLIP_SCORE: pa.array([0.5] * 5 + [None] + [0.5] * (m - 6), pa.float32()),  # row 5: empty caption
                schema.CONCEPT: pa.array(rng.choice(["food", "people", "animal"], m)),
            }),
            layout.score / shard.name,
        )
    return layout


CONFIG = {
    "scorers": {},
    "filters": {**{f.name: None for f in THRESHOLD_FILTERS}, "max_aspect_ratio": 3.0, "min_clip_score": 0.28, "min_aesthetic": 4.0, "max_nsfw": 0.5, "near_duplicates": True},
    "balance": {"target_size": 15, "quotas": {"food": 0.6}},
}


def test_funnel_accounts_for_every_row(run):
    config = parse_config(CONFIG)
    stats = run_select(run.root, config)
    rows = funnel(run.root)
    by_stage = [(r["stage"], r["reason"], r["rows"]) for r in rows]
    assert by_stage[0] == ("rows in", None, N + 3 + 2)
    assert ("exact duplicates", "exact_duplicate", 2) in by_stage
    assert ("quarantined", "corrupt_image", 2) in by_stage and ("quarantined", "empty_file", 1) in by_stage
    assert ("ingested", None, N) in by_stage
    assert by_stage[-1] == ("kept", None, stats.kept)
    drops = [r for r in rows if r["stage"] not in ("rows in", "ingested", "kept")]
    assert sum(r["rows"] for r in drops) == rows[0]["rows"] - stats.kept  # rows in = kept + dropped + quarantined
    assert all(a["remaining"] >= b["remaining"] for a, b in itertools.pairwise(rows))
    assert rows[-1]["remaining"] == stats.kept == 15
    filters = [(r["stage"], r["reason"]) for r in rows if r["stage"] not in ("rows in", "exact duplicates", "quarantined", "ingested", "kept")]
    # declaration order, not size order; the near-duplicate drops and the balance cut come last
    assert filters == [("max_aspect_ratio", "max_aspect_ratio"), ("min_clip_score", "clip_score_null"), ("min_aesthetic", "min_aesthetic"),
                       ("near_duplicates", "near_duplicates"), ("balance", "balance_quota")]
    table = funnel_markdown(rows)
    assert table.splitlines()[0] == "| stage | reason | rows | remaining |" and "| kept |  | 15 | 15 |" in table


def test_report_shows_funnel_histograms_concepts_and_contact_sheets(run):
    config = parse_config(CONFIG)
    run_select(run.root, config)
    index = build_report(run.root, config)
    assert index == run.report / "index.html"
    page = index.read_text(encoding="utf-8")
    links = re.findall(r"src='([^']+)'", page)
    assert links and all(not link.startswith(("/", "http")) for link in links)  # relative: the folder travels
    for link in links:
        with Image.open(run.report / link) as image:
            image.verify()
    assert {"scores.png", "concepts.png", "sheet-kept.png", "sheet-max_aspect_ratio.png",
            "sheet-near_duplicates.png", "sheet-balance_quota.png"} <= set(links)
    assert "Skipped" in page and "max_nsfw" in page  # set in the config, no nsfw column
    assert f"rows in {N + 5}" in page
    # contact sheet: 8 columns of 160 px cells (+ labels); 15 kept rows -> 2 rows of cells
    with Image.open(run.report / "sheet-kept.png") as sheet:
        assert sheet.size == (8 * 164 + 4, 2 * (160 + 30 + 4) + 4)
        assert np.asarray(sheet.convert("L")).std() > 20  # real thumbnails, not blank cells
    # the near-duplicate sheet shows each dropped row beside its representative
    assert "2 of 2 rows" in page


def test_report_shows_missing_captions_per_source(tmp_path):
    """A real ingest of a folder without a sidecar beside a captioned one: the report names the source."""
    from pipeline.engine import score_run
    from pipeline.ingest import ingest
    from pipeline.scorers import build_chain

    rng = np.random.default_rng(3)
    bare, captioned = tmp_path / "bare", tmp_path / "captioned"
    for folder, n in ((bare, 4), (captioned, 3)):
        folder.mkdir()
        for i in range(n):
            (folder / f"{i}.jpg").write_bytes(random_photo(rng, 96, 64))
    (captioned / "metadata.jsonl").write_text("".join(f'{{"file_name": "{i}.jpg", "text": "photo {i}"}}\n' for i in range(3)))
    run_dir = tmp_path / "run"
    ingest([bare, captioned], run_dir, workers=1)
    score_run(run_dir, build_chain({"size": {}}), backend="local")
    config = parse_config({"scorers": {}, "filters": {f.name: None for f in THRESHOLD_FILTERS}, "balance": {"target_size": None}})
    run_select(run_dir, config)

    assert captions_by_source(run_dir) == [(str(bare), 4, 4), (str(captioned), 3, 0)]
    page = build_report(run_dir, config).read_text(encoding="utf-8")
    assert "captions missing: 4 of 7 ingested rows have no caption" in page
    assert f"<tr><td>{bare}</td><td class='n'>4</td><td class='n bad'>4</td><td>100.0%</td></tr>" in page
    assert f"<tr><td>{captioned}</td><td class='n'>3</td><td class='n'>0</td><td>0.0%</td></tr>" in page


def test_report_without_missing_captions_raises_no_alarm(run):
    config = parse_config(CONFIG)
    run_select(run.root, config)
    page = build_report(run.root, config).read_text(encoding="utf-8")
    assert "captions missing:" not in page and f"<tr><td>test</td><td class='n'>{N}</td><td class='n'>0</td>" in page


def test_report_refuses_a_stale_selection(run):
    config = parse_config(CONFIG)
    run_select(run.root, config)
    write_ingest_run(run.root, N + 5, shard_rows=N + 5, seed=7)  # ingest re-run: new rows, old selection
    with pytest.raises(ReportError, match="stale"):
        build_report(run.root, config)
    assert not run.report.exists()


def test_report_without_selection_says_what_to_run(tmp_path):
    with pytest.raises(SelectError, match="run select first"):
        funnel(tmp_path)
