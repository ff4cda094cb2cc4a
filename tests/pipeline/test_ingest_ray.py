"""Ingest on Ray (``backend="ray"``: a Ray task per tar shard, Parquet row group or chunk of a folder's
files) writes exactly what the local process pool writes: the same shards, ids, thumbnails, captions,
quarantine reasons and details, duplicates and stats, row for row, on a real local Ray."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import ingest_ray, schema
from pipeline.ingest import IngestError, ingest
from pipeline.layout import RunLayout
from tests.pipeline.test_bad_input import ZOO, encoded, rgb, zoo  # noqa: F401 - zoo is a fixture
from tests.pipeline.test_ingest import photo, sha


def outputs(run: Path) -> dict[str, pa.Table]:
    layout = RunLayout(run)
    tables = {p.name: pq.read_table(p) for p in layout.ingest_shards()}
    tables["quarantine"] = pq.read_table(layout.quarantine)
    tables["duplicates"] = pq.read_table(layout.duplicates)
    return tables


def assert_same_ingest(local_stats, ray_stats, local_run: Path, ray_run: Path) -> None:
    local, on_ray = asdict(local_stats), asdict(ray_stats)
    local.pop("seconds"), on_ray.pop("seconds")
    assert on_ray == local
    assert local_stats.rows_in == local_stats.ingested + local_stats.duplicates + local_stats.quarantined
    a, b = outputs(local_run), outputs(ray_run)
    assert list(a) == list(b)
    for name in a:
        assert a[name].schema == b[name].schema, name
        assert a[name].to_pylist() == b[name].to_pylist(), name  # ids, thumbnails, captions, reasons, details
    assert [pq.read_metadata(p).num_row_groups for p in RunLayout(local_run).ingest_shards()] == [
        pq.read_metadata(p).num_row_groups for p in RunLayout(ray_run).ingest_shards()
    ]


def zoo_parquet_and_tars(folder: Path) -> list[Path]:
    """test_bad_input's Parquet and tar zoo: empty bytes, garbage, non-UTF-8 captions, no image, a
    duplicate across sources, broken JSON, a tar cut inside a sample."""
    folder.mkdir()
    good = encoded(rgb(), "JPEG")
    pq.write_table(
        pa.table(
            {
                "image": pa.array([good, b"", b"garbage", encoded(rgb(50, 50), "PNG"), None], type=pa.binary()),
                "caption": pa.array([b"fine", b"ok", b"fine", b"\xff\xfe not utf-8", b"no image"], type=pa.binary()),
            }
        ),
        folder / "zoo.parquet",
        row_group_size=2,  # three row groups: three Ray tasks
    )
    shard = folder / "zoo.tar"
    make_tar(
        shard,
        [
            ("0.jpg", good),
            ("0.txt", b"same image again"),
            ("1.jpg", encoded(rgb(40, 30), "JPEG")),
            ("1.txt", b"\xe9t\xe9 in Latin-1"),
            ("2.jpg", encoded(rgb(30, 30), "JPEG")),
            ("2.json", b"{broken json"),
        ],
    )
    with tarfile.open(shard) as archive:
        cut = archive.getmember("1.jpg").offset_data + 10
    truncated = folder / "truncated.tar"
    truncated.write_bytes(shard.read_bytes()[:cut])
    return [folder / "zoo.parquet", shard, truncated]


def make_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


@pytest.fixture()
def small_units(monkeypatch):
    """Many small units, few in flight and three dedup partitions, so a handful of files exercise chunking,
    back-pressure and the hash-partitioned duplicate collapse."""
    monkeypatch.setattr(ingest_ray, "FOLDER_CHUNK_ITEMS", 4)
    monkeypatch.setattr(ingest_ray, "MAX_IN_FLIGHT", 2)
    monkeypatch.setattr(ingest_ray, "DEDUP_PARTITIONS", 3)


def test_bad_input_zoo_on_ray_equals_local(local_ray, small_units, zoo, tmp_path):  # noqa: F811
    sources = [zoo, *zoo_parquet_and_tars(tmp_path / "more")]
    local = ingest(sources, tmp_path / "local", shard_rows=5, workers=2)
    on_ray = ingest(sources, tmp_path / "ray", shard_rows=5, backend="ray")
    assert_same_ingest(local, on_ray, tmp_path / "local", tmp_path / "ray")
    # the zoo's cases are all there (each reason as test_bad_input expects, here from the Ray run)
    quarantined = outputs(tmp_path / "ray")["quarantine"].to_pylist()
    reasons = {r[schema.REASON] for r in quarantined}
    assert {expected for _, expected in ZOO.values()} - {"kept", "exact_duplicate"} <= reasons
    assert {"missing_image", "unreadable_path", "non_utf8_caption", "bad_sidecar_row", "corrupt_archive"} <= reasons
    assert all(r[schema.DETAIL] for r in quarantined)
    assert on_ray.duplicates == 3  # the zoo's copy of good.jpg; both tars' 0.jpg repeat the Parquet's row 0
    assert len(on_ray.shards) > 2 and on_ray.quarantine_reasons == local.quarantine_reasons


def test_mixed_sources_on_ray_equal_local(local_ray, small_units, tmp_path):
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    for i in range(9):
        (folder / f"{i:02d}.jpg").write_bytes(photo(i))
    (folder / "sub" / "deep.jpg").write_bytes(photo(20))
    (folder / "dup-of-tar.jpg").write_bytes(photo(30))
    (folder / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"{i:02d}.jpg", "text": f"photo {i}", "likes": i}) + "\n" for i in range(6))
    )
    parquet = tmp_path / "laion.parquet"
    pq.write_table(
        pa.table(
            {
                "jpg": pa.array([photo(40 + i) for i in range(10)] + [photo(3)], type=pa.binary()),
                "caption": [f"parquet {i}" for i in range(11)],
                "key": [f"{i:09d}" for i in range(11)],
                "width": list(range(11)),
            }
        ),
        parquet,
        row_group_size=3,
    )
    paths = tmp_path / "paths.parquet"  # a Parquet of local paths, relative to its folder
    pq.write_table(pa.table({"image_path": ["folder/00.jpg", "folder/missing.jpg", "folder/07.jpg"]}), paths)
    tars = tmp_path / "wds"
    tars.mkdir()
    make_tar(tars / "00000.tar", [("a.jpg", photo(30)), ("a.txt", b"tar a"), ("b.jpg", photo(31)), ("b.json", b'{"caption": "tar b", "likes": 4}')])
    make_tar(tars / "00001.tar", [("c.jpg", photo(32)), ("c.txt", b"tar c"), ("d.jpg", photo(1))])
    sources = [str(tars / "*.tar"), folder, parquet, paths]

    local = ingest(sources, tmp_path / "local", shard_rows=7, workers=2)
    on_ray = ingest(sources, tmp_path / "ray", shard_rows=7, backend="ray")
    assert_same_ingest(local, on_ray, tmp_path / "local", tmp_path / "ray")
    assert (on_ray.rows_in, on_ray.duplicates, on_ray.quarantine_reasons) == (29, 5, {"missing_image": 1})
    kept = pa.concat_tables(pq.read_table(p) for p in RunLayout(tmp_path / "ray").ingest_shards()).to_pylist()
    assert kept[0][schema.SOURCE_KEY] == "a" and kept[0][schema.CAPTION] == "tar a"  # source order kept
    assert [r[schema.SOURCE_KEY] for r in kept if r[schema.SOURCE] == str(parquet)][:3] == ["0", "1", "2"]


def test_ray_ingest_errors_and_rerun(local_ray, tmp_path):
    (tmp_path / "fake.tar").write_bytes(b"\x00\x01 not a tar archive")
    with pytest.raises(IngestError, match="not a readable tar archive"):  # the worker's error, unwrapped
        ingest([tmp_path / "fake.tar"], tmp_path / "run", backend="ray")
    with pytest.raises(IngestError, match="backend must be one of"):
        ingest([tmp_path / "fake.tar"], tmp_path / "run", backend="spark")

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(photo(1))
    first = ingest([folder], tmp_path / "ok", backend="ray")
    again = ingest([folder], tmp_path / "ok")  # same outputs whichever backend: the finished ingest stands
    assert first == again and first.ingested == 1


def test_cli_ingest_backend_ray(local_ray, tmp_path, capsys):
    from pipeline.__main__ import main

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(photo(i))
    assert main(["ingest", str(folder), "--run", str(tmp_path / "run"), "--backend", "ray", "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["rows_in"], printed["ingested"]) == (3, 3)
    assert main(["ingest", str(folder), "--run", str(tmp_path / "again"), "--quiet"]) == 0  # default: local
    assert json.loads(capsys.readouterr().out)["ingested"] == 3
    with pytest.raises(SystemExit) as refused:
        main(["ingest", str(folder), "--run", str(tmp_path / "bad"), "--backend", "spark"])
    assert refused.value.code == 2 and "invalid choice: 'spark'" in capsys.readouterr().err


def test_dedup_partition_keeps_the_first_owner_in_order():
    seen = ingest_ray.SeenIds()  # the actor's class, called in-process: its ordering rule
    a, b = bytes.fromhex(sha(b"a")), bytes.fromhex(sha(b"b"))
    assert seen.claim([a, b, a], [("s", "1"), ("s", "2"), ("s", "3")]) == [None, None, ("s", "1")]
    assert seen.claim([b, a], [("t", "1"), ("t", "2")]) == [("s", "2"), ("s", "1")]
    assert seen.size() == 2
