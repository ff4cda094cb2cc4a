"""Readers, buckets and the balanced bucket sampler."""

from __future__ import annotations

import collections

import pytest
from PIL import Image

from model.data import (BalancedBucketSampler, DataError, assign_buckets, make_buckets, nearest_bucket,
                        read_captioned, split_validation)
from tests.model.conftest import write_imagefolder, write_parquet


def test_bucket_sampler_draws_every_bucket_equally_often_and_is_a_pure_function_of_the_draw():
    members = [list(range(50)), list(range(5)), list(range(3))]  # very unequal buckets
    sampler = BalancedBucketSampler(members, batch_size=2, seed=7)
    counts = collections.Counter(sampler.batch(d)[0] for d in range(300))
    assert counts == {0: 100, 1: 100, 2: 100}
    # within a bucket, every item comes once per pass
    seen = collections.Counter(i for d in range(300) for i in [sampler.batch(d)] if i[0] == 0 for i in i[1])
    assert set(seen.values()) == {4}  # 100 visits x 2 items / 50 items
    again = BalancedBucketSampler(members, batch_size=2, seed=7)
    assert [again.batch(d) for d in (5, 123, 299)] == [sampler.batch(d) for d in (5, 123, 299)]


def test_buckets_have_the_resolution_area_and_small_buckets_are_folded_into_neighbours():
    buckets = make_buckets(256, [1.0, 0.5, 2.0])
    assert all(h % 64 == 0 and w % 64 == 0 and 0.75 < h * w / 256**2 < 1.3 for h, w in buckets)
    assert buckets[nearest_bucket(400, 200, buckets)][1] > buckets[nearest_bucket(400, 200, buckets)][0]
    sizes = [(100, 100)] * 6 + [(200, 100)]  # one wide image alone in its bucket
    assignment = assign_buckets(sizes, buckets, min_per_bucket=2)
    assert len(set(assignment)) == 1


def test_missing_captions_are_skipped_and_counted_or_rejected(tmp_path):
    folder = write_imagefolder(tmp_path / "set", 6, missing_captions=2)
    items, report = read_captioned(folder, "skip")
    assert len(items) == 4 and report.rows == 6 and len(report.missing_caption) == 2
    with pytest.raises(DataError, match="2 of 6 rows have no caption"):
        read_captioned(folder, "error")


def test_parquet_with_schema_columns_is_read(tmp_path):
    items, report = read_captioned(write_parquet(tmp_path / "pq", 5))
    assert report.usable == 5 and items[0].load().size[0] > 0 and items[0].caption


def test_validation_split_never_takes_a_whole_bucket():
    train, val = split_validation([10, 1, 2], 0.5, seed=0)
    assert all(len(t) >= 1 for t in train) and sum(map(len, val)) >= 1
    assert sorted(train[0] + val[0]) == list(range(10))


def test_the_latent_cache_is_rebuilt_when_its_buckets_would_change(tmp_path):
    """Same images and models, other aspect-ratio buckets or minimum bucket size: a new cache, not the old one."""
    import torch

    from model.data import build_cache

    items, _ = read_captioned(write_imagefolder(tmp_path / "set", 12))
    encoded = []

    def build(ratios, min_per_bucket):
        def encode(x):
            encoded.append(len(x))
            return torch.nn.functional.avg_pool2d(x, 8)  # stands in for an autoencoder: 1/8 size

        return build_cache(items, tmp_path / "cache", 128, ratios, encode, lambda p: {"text": torch.zeros(len(p), 4, 8)},
                           fingerprint="models", min_per_bucket=min_per_bucket)

    square = build([1.0], 1)
    assert len(square.buckets) == 1
    assert build([1.0], 1).buckets == square.buckets and sum(encoded) == 12, "an unchanged cache is reused"
    mixed = build([1.0, 0.5, 2.0], 1)  # the set has square and 1:2 photos
    assert len(mixed.buckets) == 2 and sum(encoded) == 24
    folded = build([1.0, 0.5, 2.0], 7)  # 6 of each: a bucket needs 7, so all fold into one
    assert len(folded.buckets) == 1 and sum(encoded) == 36


def test_parquet_rows_that_name_their_image_by_path_or_file_uri_are_read(tmp_path):
    """The pool keeps either the bytes or the image's local path (plain or file://): both load."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import schema

    folder = write_imagefolder(tmp_path / "set", 2)
    files = sorted((folder / "images").glob("*.jpg"))
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({schema.IMAGE_PATH: [str(files[0]), files[1].as_uri()], schema.CAPTION: ["a", "b"]}),
                   tmp_path / "pq" / "shard-00000.parquet")
    items, report = read_captioned(tmp_path / "pq")
    assert report.usable == 2 and [it.load().size for it in items] == [Image.open(f).size for f in files]


def _add_rows(folder, rows: list[dict]) -> None:
    import json

    with open(folder / "metadata.jsonl", "a") as metadata:
        metadata.writelines(json.dumps(row) + "\n" for row in rows)


def escaping_rows(folder, outside) -> list[dict]:
    """metadata.jsonl rows whose file_name leaves ``folder`` for the real image file ``outside``: an
    absolute path, a '..' escape, a symbolic link inside the folder that points out of it, not a string."""
    (folder / "images" / "link.jpg").symlink_to(outside)
    return [{"file_name": str(outside), "text": "absolute"},
            {"file_name": f"../{outside.parent.name}/{outside.name}", "text": "dot-dot"},
            {"file_name": "images/link.jpg", "text": "a link out"},
            {"file_name": 7, "text": "not a path"}]


def test_file_names_outside_the_imagefolder_are_refused_per_row_and_counted(tmp_path):
    import shutil

    folder = write_imagefolder(tmp_path / "set", 4, missing_captions=1)
    (tmp_path / "elsewhere").mkdir()
    outside = shutil.copy(folder / "images" / "0001.jpg", tmp_path / "elsewhere" / "secret.jpg")
    _add_rows(folder, escaping_rows(folder, outside))

    items, report = read_captioned(folder, "skip")
    assert report.rows == 8 and report.usable == 3 and len(report.missing_caption) == 1
    assert report.rows == report.usable + len(report.missing_caption) + len(report.bad_path), "no row silently lost"
    assert [it.key for it in items] == ["images/0001.jpg", "images/0002.jpg", "images/0003.jpg"]
    reasons = report.bad_path
    assert reasons[str(outside)].startswith(f"file_name {str(outside)!r} is an absolute path")
    assert "goes up with '..'" in reasons["../elsewhere/secret.jpg"]
    assert f"resolves to {outside}, outside" in reasons["images/link.jpg"]
    assert reasons["metadata.jsonl line 8"] == "file_name must be a relative path, got 7"
    assert report.to_dict()["bad_path"] == reasons  # what report.json's data report shows
