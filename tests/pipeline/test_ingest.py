"""Ingest from each source kind (folder + sidecar, Parquet with bytes / structs / paths, WebDataset
tars), exact-duplicate collapse, sharding, determinism across worker counts, and reruns."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import schema
from pipeline.imageio import load_image_bytes
from pipeline.ingest import IngestError, IngestStats, ingest, read_stats
from pipeline.layout import RunLayout


def photo(index: int, size: int = 160) -> bytes:
    """A distinct JPEG per index: a crop of a real photo (skimage's coffee) at a shifted offset."""
    import skimage.data

    pixels = skimage.data.coffee()
    crop = pixels[index * 7 % 200 : index * 7 % 200 + 200, index * 11 % 300 : index * 11 % 300 + 300]
    image = Image.fromarray(crop).resize((size, size * 2 // 3))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_table(path: Path | list[Path]) -> pa.Table:
    paths = path if isinstance(path, list) else [path]
    return pa.concat_tables([pq.read_table(p) for p in paths])


def shards(run: Path) -> pa.Table:
    return read_table(RunLayout(run).ingest_shards())


def assert_invariant(stats: IngestStats, run: Path) -> None:
    layout = RunLayout(run)
    assert stats.rows_in == stats.ingested + stats.duplicates + stats.quarantined
    assert shards(run).num_rows == stats.ingested
    assert pq.read_table(layout.duplicates).num_rows == stats.duplicates
    assert pq.read_table(layout.quarantine).num_rows == stats.quarantined
    assert sum(stats.quarantine_reasons.values()) == stats.quarantined


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_folder_with_jsonl_sidecar(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    images = {f"{i}.jpg": photo(i) for i in range(3)}
    for name, data in images.items():
        (folder / name).write_bytes(data)
    (folder / "notes.txt").write_text("not an image: ignored")
    write_jsonl(
        folder / "metadata.jsonl",
        [
            {"file_name": "0.jpg", "text": "an espresso", "likes": 12, "defect": "clean"},
            {"file_name": "1.jpg", "text": "another espresso", "favourites": "many"},
        ],
    )
    run = tmp_path / "run"
    stats = ingest([folder], run, workers=1)
    assert (stats.rows_in, stats.ingested, stats.duplicates, stats.quarantined) == (3, 3, 0, 0)
    assert stats.missing_captions == 1  # 2.jpg has no sidecar row: kept, caption null
    assert_invariant(stats, run)

    table = pq.read_table(RunLayout(run).ingest / "shard-00000.parquet")
    assert table.schema.equals(schema.INGEST_SCHEMA)
    rows = {r[schema.SOURCE_KEY]: r for r in table.to_pylist()}
    assert set(rows) == set(images)
    first = rows["0.jpg"]
    assert first[schema.ID] == sha(images["0.jpg"])
    assert first[schema.CAPTION] == "an espresso"
    assert first[schema.ENGAGEMENT] == 12.0
    assert json.loads(first[schema.META]) == {"defect": "clean"}
    assert first[schema.IMAGE] is None and first[schema.IMAGE_PATH] == str((folder / "0.jpg").resolve())
    assert (first[schema.WIDTH], first[schema.HEIGHT], first[schema.FORMAT]) == (160, 106, "JPEG")
    thumb = Image.open(io.BytesIO(first[schema.THUMBNAIL]))
    assert thumb.format == "JPEG" and thumb.mode == "RGB" and thumb.size == (160, 106)  # never upscaled
    # a value that is no number stays visible in meta instead of becoming a wrong engagement
    assert rows["1.jpg"][schema.ENGAGEMENT] is None
    assert json.loads(rows["1.jpg"][schema.META]) == {"favourites": "many"}
    assert rows["2.jpg"][schema.CAPTION] is None and rows["2.jpg"][schema.META] is None


def test_folder_without_sidecar_warns_naming_the_folder_and_count(tmp_path, caplog):
    folder = tmp_path / "photos"
    (folder / "captioned").mkdir(parents=True)
    for i in range(4):
        (folder / f"{i}.jpg").write_bytes(photo(i))  # the top folder: no sidecar at all
    for i in range(4, 7):
        (folder / "captioned" / f"{i}.jpg").write_bytes(photo(i))
    write_jsonl(folder / "captioned" / "captions.jsonl",
                [{"file_name": "4.jpg", "text": "a"}, {"file_name": "5.jpg", "text": "b"}])  # 6.jpg: no row
    with caplog.at_level(logging.WARNING, logger="pipeline.ingest"):
        stats = ingest([folder], tmp_path / "run", workers=1)
    assert (stats.ingested, stats.missing_captions) == (7, 5)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith(f"{folder}: 4 of 4 images have no caption (no captions sidecar")
    assert warnings[1].startswith(f"{folder / 'captioned'}: 1 of 3 images have no caption (no row in the captions sidecar")

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.ingest"):
        ingest([folder / "captioned"], tmp_path / "run2", workers=1)
    assert [r.getMessage().split(":")[0] for r in caplog.records if r.levelno == logging.WARNING] == [str(folder / "captioned")]


def test_thumbnail_longest_side_and_draft(tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "wide.jpg").write_bytes(photo(0, size=600))
    stats = ingest([folder], tmp_path / "run", thumbnail_size=128, workers=1)
    row = shards(tmp_path / "run").to_pylist()[0]
    assert (row[schema.WIDTH], row[schema.HEIGHT]) == (600, 400)  # the original's size, not the thumbnail's
    assert Image.open(io.BytesIO(row[schema.THUMBNAIL])).size == (128, 85)
    assert stats.ingested == 1


def test_folder_csv_sidecar_and_subfolders(tmp_path):
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    (folder / "a.jpg").write_bytes(photo(1))
    (folder / "more" / "b.jpg").write_bytes(photo(2))
    with open(folder / "captions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "caption", "likes"])
        writer.writerow(["a.jpg", "top level", "3"])
        writer.writerow(["more/b.jpg", "in a sub-folder", ""])
    stats = ingest([folder], tmp_path / "run", workers=1)
    rows = {r[schema.SOURCE_KEY]: r for r in shards(tmp_path / "run").to_pylist()}
    assert rows["a.jpg"][schema.CAPTION] == "top level" and rows["a.jpg"][schema.ENGAGEMENT] == 3.0
    assert rows["more/b.jpg"][schema.CAPTION] == "in a sub-folder"
    assert stats.ingested == 2 and stats.missing_captions == 0


def test_parquet_img2dataset_bytes(tmp_path):
    images = [photo(i) for i in range(4)]
    table = pa.table(
        {
            "key": ["000000000", "000000001", "000000002", "000000003"],
            "jpg": images[:3] + [None],
            "caption": ["one", "two", None, "four"],
            "url": ["https://example.org/1.jpg", None, None, None],
            "width": [160, 160, 160, None],
            "status": ["success", "success", "success", "failed_to_download"],
        }
    )
    pq.write_table(table, tmp_path / "00000.parquet")
    run = tmp_path / "run"
    stats = ingest([tmp_path / "00000.parquet"], run, workers=1)
    assert_invariant(stats, run)
    assert stats.ingested == 3 and stats.quarantine_reasons == {"missing_image": 1}
    rows = shards(run).to_pylist()
    assert [r[schema.SOURCE_KEY] for r in rows] == ["0", "1", "2"]
    assert rows[0][schema.IMAGE] == images[0] and rows[0][schema.IMAGE_PATH] is None  # bytes live in the row
    assert rows[0][schema.CAPTION] == "one" and rows[2][schema.CAPTION] is None
    meta = json.loads(rows[0][schema.META])
    assert meta == {"key": "000000000", "url": "https://example.org/1.jpg", "width": 160, "status": "success"}


def test_parquet_hugging_face_image_struct(tmp_path):
    images = [photo(i) for i in range(2)]
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "image": pa.array([{"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(images)], type=struct),
            "text": ["first", "second"],
        }
    )
    pq.write_table(table, tmp_path / "train-00000.parquet")
    stats = ingest([tmp_path / "train-00000.parquet"], tmp_path / "run", workers=1)
    rows = shards(tmp_path / "run").to_pylist()
    assert stats.ingested == 2
    assert [r[schema.CAPTION] for r in rows] == ["first", "second"]
    assert [r[schema.ID] for r in rows] == [sha(b) for b in images]


def test_parquet_with_paths(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(photo(3))
    (images / "b.jpg").write_bytes(photo(4))
    table = pa.table(
        {
            "image_path": [
                "images/a.jpg",
                f"file://{images / 'b.jpg'}",
                "https://example.org/c.jpg",
                "images/gone.jpg",
            ],
            "TEXT": ["relative", "file uri", "remote", "missing"],
        }
    )
    pq.write_table(table, tmp_path / "paths.parquet")
    run = tmp_path / "run"
    stats = ingest([tmp_path / "paths.parquet"], run, workers=1)
    assert_invariant(stats, run)
    rows = shards(run).to_pylist()
    assert [r[schema.CAPTION] for r in rows] == ["relative", "file uri"]
    assert rows[0][schema.IMAGE_PATH] == str((images / "a.jpg").resolve()) and rows[0][schema.IMAGE] is None
    assert stats.quarantine_reasons == {"missing_image": 1, "remote_url": 1}


def make_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_webdataset_tar(tmp_path):
    images = [photo(i) for i in range(3)]
    shard = make_tar(
        tmp_path / "00000.tar",
        [
            ("000000000.jpg", images[0]),
            ("000000000.txt", b"a caption from txt\n"),
            ("000000000.json", json.dumps({"key": "000000000", "caption": "a caption from txt"}).encode()),
            ("000000001.jpg", images[1]),
            ("000000001.json", json.dumps({"caption": "only in json", "likes": 7, "url": "x"}).encode()),
            ("000000002.txt", b"caption without an image"),
            ("sub/000000003.jpg", images[2]),
        ],
    )
    run = tmp_path / "run"
    stats = ingest([shard], run, workers=1)
    assert_invariant(stats, run)
    rows = {r[schema.SOURCE_KEY]: r for r in shards(run).to_pylist()}
    assert rows["000000000"][schema.CAPTION] == "a caption from txt"
    assert json.loads(rows["000000000"][schema.META]) == {"key": "000000000"}
    assert rows["000000001"][schema.CAPTION] == "only in json" and rows["000000001"][schema.ENGAGEMENT] == 7.0
    assert rows["000000001"][schema.IMAGE] == images[1]
    assert rows["sub/000000003"][schema.CAPTION] is None
    assert stats.quarantine_reasons == {"missing_image": 1}


def test_folder_of_tars_and_glob_mixing_kinds_collapses_duplicates(tmp_path):
    shared_image = photo(9)
    tars = tmp_path / "wds"
    tars.mkdir()
    make_tar(tars / "00000.tar", [("a.jpg", shared_image), ("a.txt", b"from the tar")])
    make_tar(tars / "00001.tar", [("b.jpg", photo(10)), ("b.txt", b"second tar")])
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "copy.jpg").write_bytes(shared_image)
    (folder / "copy2.jpg").write_bytes(shared_image)
    run = tmp_path / "run"
    stats = ingest([tars, folder], run, workers=1)
    assert (stats.rows_in, stats.ingested, stats.duplicates) == (4, 2, 2)
    assert_invariant(stats, run)
    kept = shards(run).to_pylist()
    assert kept[0][schema.CAPTION] == "from the tar"  # first occurrence in source order wins
    duplicates = pq.read_table(RunLayout(run).duplicates).to_pylist()
    assert [d[schema.SOURCE_KEY] for d in duplicates] == ["copy.jpg", "copy2.jpg"]
    assert {d[schema.ID] for d in duplicates} == {sha(shared_image)}
    assert {d[schema.REASON] for d in duplicates} == {"exact_duplicate"}
    assert all(str(tars / "00000.tar") in d[schema.DETAIL] for d in duplicates)

    globbed = ingest([str(tars / "*.tar")], tmp_path / "run-glob", workers=1)
    assert globbed.ingested == 2


def test_sharding_and_determinism_across_worker_counts(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(10):
        (folder / f"{i:02d}.jpg").write_bytes(photo(i))
    (folder / "dup.jpg").write_bytes(photo(0))
    (folder / "bad.jpg").write_bytes(b"not an image at all")
    in_process = ingest([folder], tmp_path / "one", shard_rows=4, workers=1)
    pooled = ingest([folder], tmp_path / "two", shard_rows=4, workers=2)
    assert in_process.shards == pooled.shards == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    metadata = [pq.read_metadata(p) for p in RunLayout(tmp_path / "two").ingest_shards()]
    assert [(m.num_rows, m.num_row_groups) for m in metadata] == [(4, 1), (4, 1), (2, 1)]
    assert shards(tmp_path / "one").equals(shards(tmp_path / "two"))
    for name in ("quarantine.parquet", "duplicates.parquet"):
        assert pq.read_table(tmp_path / "one" / "ingest" / name).equals(
            pq.read_table(tmp_path / "two" / "ingest" / name)
        )
    assert_invariant(pooled, tmp_path / "two")


def test_rerun_returns_stored_stats_and_refuses_other_sources(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(photo(1))
    run = tmp_path / "run"
    first = ingest([folder], run, workers=1)
    shard = RunLayout(run).ingest_shards()[0]
    mtime = shard.stat().st_mtime_ns
    again = ingest([folder], run, workers=1)
    assert again == first and shard.stat().st_mtime_ns == mtime  # nothing re-read or rewritten
    assert read_stats(run) == first
    other = tmp_path / "other"
    other.mkdir()
    (other / "b.jpg").write_bytes(photo(2))
    with pytest.raises(IngestError, match="already holds an ingest"):
        ingest([other], run, workers=1)


def test_unfinished_ingest_is_cleared(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(photo(1))
    stale = RunLayout(tmp_path / "run").ingest
    stale.mkdir(parents=True)
    (stale / "shard-00007.parquet").write_bytes(b"left by a crashed run")
    stats = ingest([folder], tmp_path / "run", workers=1)
    assert (
        stats.shards == ["shard-00000.parquet"]
        and [p.name for p in RunLayout(tmp_path / "run").ingest_shards()] == stats.shards
    )


def test_empty_source_still_writes_readable_tables(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "metadata.jsonl").write_text("")
    stats = ingest([folder], tmp_path / "run", workers=1)
    assert stats.rows_in == 0 and stats.shards == ["shard-00000.parquet"]
    assert shards(tmp_path / "run").schema.equals(schema.INGEST_SCHEMA)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: [tmp / "nowhere"], "no such file or folder"),
        (lambda tmp: [str(tmp / "*.parquet")], "matches no files"),
        (lambda tmp: [(tmp / "notes.txt", (tmp / "notes.txt").write_text("x"))[0]], "cannot ingest this file"),
        (lambda tmp: [(tmp / "empty", (tmp / "empty").mkdir())[0]], "holds no images"),
    ],
)
def test_unusable_sources_raise_one_clear_error(tmp_path, make, message):
    with pytest.raises(IngestError, match=message):
        ingest(make(tmp_path), tmp_path / "run", workers=1)
    assert not (tmp_path / "run" / "ingest" / "_stats.json").exists()


def test_real_coco_photos_in_imagefolder_layout(shared_dir, tmp_path):
    """239 real Flickr photos (../shared/data/coco-mini) as a user's folder source: all ingested,
    captions and header sizes agree with the metadata COCO publishes."""
    folder = shared_dir / "data" / "coco-mini"
    expected = {row["file_name"]: row for row in map(json.loads, (folder / "metadata.jsonl").read_text().splitlines())}
    run = tmp_path / "run"
    stats = ingest([folder], run, shard_rows=100)
    assert (stats.rows_in, stats.ingested, stats.duplicates, stats.quarantined) == (len(expected), len(expected), 0, 0)
    assert stats.shards == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    for row in shards(run).to_pylist():
        source = expected[row[schema.SOURCE_KEY]]
        assert row[schema.CAPTION] == source["text"]
        assert (row[schema.WIDTH], row[schema.HEIGHT]) == (source["width"], source["height"])
        meta = json.loads(row[schema.META])
        assert meta["captions"] == source["captions"] and meta["license_id"] == source["license_id"]
        assert max(Image.open(io.BytesIO(row[schema.THUMBNAIL])).size) <= schema.THUMBNAIL_SIZE


def test_load_image_bytes_reads_either_storage(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(photo(1))
    pq.write_table(pa.table({"jpg": [photo(2)]}), tmp_path / "bytes.parquet")
    run = tmp_path / "run"
    ingest([folder, tmp_path / "bytes.parquet"], run, workers=1)
    for row in shards(run).to_pylist():
        assert sha(load_image_bytes(row[schema.IMAGE], row[schema.IMAGE_PATH])) == row[schema.ID]
    assert load_image_bytes(None, f"file://{folder / 'a.jpg'}") == photo(1)
    with pytest.raises(ValueError, match="remote"):
        load_image_bytes(None, "https://example.org/a.jpg")
