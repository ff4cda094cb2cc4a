"""The embedded sample: every defect present, recorded and real; the same seed gives the same bytes;
ingest reads it as a folder source and collapses exactly the exact duplicates."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import schema
from pipeline.ingest import ingest
from pipeline.layout import RunLayout
from pipeline.sample import BASE_PHOTOS, CAPTIONS_FILE, DEFECTS, SampleError, defect_counts, generate_sample

N = 60


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    return generate_sample(tmp_path_factory.mktemp("sample"), n=N, seed=0)


def rows_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / CAPTIONS_FILE).read_text().splitlines()]


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def grey(folder: Path, name: str) -> np.ndarray:
    return np.asarray(Image.open(folder / name).convert("L"), dtype=np.float32) / 255


def test_every_defect_is_present_and_mostly_clean(sample):
    rows = rows_of(sample)
    assert len(rows) == N and len({r["file_name"] for r in rows}) == N
    counts = Counter(r["defect"] for r in rows)
    assert counts == defect_counts(N) and set(counts) == set(DEFECTS)
    assert counts["clean"] >= N / 2
    assert {r["base"] for r in rows} <= {p.name for p in BASE_PHOTOS}
    assert all(isinstance(r["likes"], int) and r["likes"] >= 0 and r["text"] for r in rows)
    assert sorted(p.name for p in sample.iterdir()) == sorted([CAPTIONS_FILE, *(r["file_name"] for r in rows)])


def test_defects_are_what_they_say(sample):
    rows = rows_of(sample)
    captions = {p.name: p.caption for p in BASE_PHOTOS}
    clean = [r for r in rows if r["defect"] == "clean"]
    clean_contrast = np.median([grey(sample, r["file_name"]).std() for r in clean])
    clean_edges = np.median([np.abs(np.diff(grey(sample, r["file_name"]), axis=1)).mean() for r in clean])
    position = {r["file_name"]: i for i, r in enumerate(rows)}
    for row in rows:
        image = Image.open(sample / row["file_name"])
        longest, shortest = max(image.size), min(image.size)
        defect = row["defect"]
        if defect == "clean":
            assert 384 <= longest <= 640 and longest / shortest <= 2.0 and row["text"] == captions[row["base"]]
        elif defect == "extreme_aspect":
            assert longest / shortest > 3
        elif defect == "tiny":
            assert longest < 128
        elif defect == "overlay_text":
            assert row["overlay_text"].split() and row["overlay_font_px"] >= 10
        elif defect == "blur":
            assert np.abs(np.diff(grey(sample, row["file_name"]), axis=1)).mean() < clean_edges / 2
        elif defect == "low_contrast":
            assert grey(sample, row["file_name"]).std() < clean_contrast / 2
        elif defect == "mismatched_caption":
            assert row["caption_of"] != row["base"] and row["text"] == captions[row["caption_of"]]
        else:
            original = sample / row["duplicate_of"]
            assert position[row["duplicate_of"]] < position[row["file_name"]]  # copies come after originals
            assert rows[position[row["duplicate_of"]]]["defect"] == "clean"
            same_bytes = (sample / row["file_name"]).read_bytes() == original.read_bytes()
            assert same_bytes == (defect == "exact_duplicate")
            if defect == "near_duplicate":
                a = np.asarray(Image.open(original).convert("L").resize((32, 32)), dtype=np.float32)
                b = np.asarray(image.convert("L").resize((32, 32)), dtype=np.float32)
                assert np.abs(a - b).mean() < 20  # still the same picture


def test_only_the_marked_rows_are_near_duplicates(sample):
    import imagehash

    rows = rows_of(sample)
    hashes = {r["file_name"]: imagehash.phash(Image.open(sample / r["file_name"])) for r in rows}
    copies = [r for r in rows if r["defect"] == "near_duplicate"]
    assert all(hashes[r["file_name"]] - hashes[r["duplicate_of"]] <= 6 for r in copies)
    originals = [r["file_name"] for r in rows if r["defect"] not in ("near_duplicate", "exact_duplicate")]
    closest = min(hashes[a] - hashes[b] for i, a in enumerate(originals) for b in originals[i + 1 :])
    assert closest > 6  # selection's default near-duplicate radius


def test_same_seed_same_bytes_other_seed_other_sample(sample, tmp_path):
    again = generate_sample(tmp_path / "again", n=N, seed=0)
    assert digest(again) == digest(sample)
    other = generate_sample(tmp_path / "other", n=N, seed=1)
    assert digest(other) != digest(sample)


def test_regenerating_replaces_a_sample_but_not_foreign_files(tmp_path):
    folder = generate_sample(tmp_path / "s", n=40, seed=3)
    generate_sample(folder, n=20, seed=3)
    assert len(list(folder.iterdir())) == 21  # the 40-row sample's files are gone
    (folder / "mine.txt").write_text("someone's file")
    with pytest.raises(SampleError, match="mine.txt"):
        generate_sample(folder, n=20)
    with pytest.raises(SampleError, match="at least"):
        generate_sample(tmp_path / "small", n=5)


def test_ingest_reads_the_sample(sample, tmp_path):
    run = tmp_path / "run"
    stats = ingest([sample], run, workers=1)
    rows = rows_of(sample)
    exact = sorted(r["file_name"] for r in rows if r["defect"] == "exact_duplicate")
    assert (stats.rows_in, stats.quarantined, stats.missing_captions) == (N, 0, 0)
    assert stats.duplicates == len(exact) and stats.ingested == N - len(exact)
    duplicates = pq.read_table(RunLayout(run).duplicates).to_pylist()
    assert sorted(d[schema.SOURCE_KEY] for d in duplicates) == exact
    kept = pq.read_table(RunLayout(run).ingest_shards()).to_pylist()
    meta = {r[schema.SOURCE_KEY]: json.loads(r[schema.META]) for r in kept}
    assert all("defect" in m and "base" in m for m in meta.values())
    assert all(r[schema.ENGAGEMENT] is not None for r in kept)
    tiny = next(r for r in kept if meta[r[schema.SOURCE_KEY]]["defect"] == "tiny")
    assert Image.open(io.BytesIO(tiny[schema.THUMBNAIL])).size == (tiny[schema.WIDTH], tiny[schema.HEIGHT])
