"""The bad-input zoo: every malformed or odd input either lands in the quarantine table with its reason
or is converted and kept; unusable inputs stop with one clear IngestError. Rows in == ingested +
duplicates + quarantined, always."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import schema
from pipeline.imageio import MAX_IMAGE_PIXELS, ImageProblem, inspect_image, read_header
from pipeline.ingest import IngestError, ingest
from pipeline.layout import RunLayout


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def gradient(width: int = 96, height: int = 64) -> np.ndarray:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    return np.concatenate(
        [
            np.broadcast_to(x, (height, width, 1)),
            np.broadcast_to(y, (height, width, 1)),
            np.full((height, width, 1), 90.0),
        ],
        axis=2,
    ).astype(np.uint8)


def rgb(width: int = 96, height: int = 64) -> Image.Image:
    return Image.fromarray(gradient(width, height))


def png_declaring(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR is rewritten to declare ``width`` x ``height`` (a decompression bomb's
    header: tiny file, huge promised image), with the chunk CRC fixed so the header parses."""
    data = bytearray(encoded(Image.new("RGB", (1, 1)), "PNG"))
    ihdr = bytearray(data[12:29])  # chunk type + 13 data bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def rotated_jpeg() -> bytes:
    """A 96x64 landscape JPEG whose EXIF says: display rotated 90 degrees (a phone's portrait shot)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(rgb(), "JPEG", exif=exif.tobytes())


def animated_gif() -> bytes:
    frames = [Image.fromarray(np.full((40, 60, 3), value, np.uint8)) for value in (30, 120, 220)]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


GOOD_JPEG = encoded(rgb(), "JPEG", quality=90)

# file name -> (bytes, what ingest must do: a quarantine reason, or "kept")
ZOO: dict[str, tuple[bytes, str]] = {
    "corrupt.jpg": (b"\xff\xd8\xff\xe0 this is no JPEG, just bytes with a JPEG start" * 3, "corrupt_image"),
    "random.png": (np.random.default_rng(0).integers(0, 255, 2000, dtype=np.uint8).tobytes(), "corrupt_image"),
    "truncated.jpg": (GOOD_JPEG[: len(GOOD_JPEG) // 2], "truncated_image"),
    "truncated.png": (encoded(rgb(), "PNG")[:117], "truncated_image"),  # half of its 234 bytes
    "zero.jpg": (b"", "empty_file"),
    "bomb.png": (png_declaring(200_000, 200_000), "decompression_bomb"),  # PIL's own error (> 2x its limit)
    "bomb-warning.png": (png_declaring(10_000, 10_000), "decompression_bomb"),  # above ours, below PIL's error
    "float.tif": (
        encoded(Image.fromarray(np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(48, 64), "F"), "TIFF"),
        "unsupported_mode",
    ),
    "portable-pixmap.jpg": (encoded(rgb(), "PPM"), "unsupported_format"),  # PIL reads PPM; we do not accept it
    "cmyk.jpg": (encoded(rgb().convert("CMYK"), "JPEG"), "kept"),
    "grey16.png": (encoded(Image.fromarray(np.arange(64 * 96, dtype=np.uint16).reshape(64, 96) * 10), "PNG"), "kept"),
    "palette.png": (
        encoded(rgb().convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG", transparency=0),
        "kept",
    ),
    "alpha.png": (
        encoded(Image.fromarray(np.dstack([gradient(), np.full((64, 96), 128, np.uint8)]), "RGBA"), "PNG"),
        "kept",
    ),
    "grey-alpha.png": (encoded(rgb().convert("LA"), "PNG"), "kept"),
    "bilevel.png": (encoded(rgb().convert("1"), "PNG"), "kept"),
    "animated.gif": (animated_gif(), "kept"),
    "rotated.jpg": (rotated_jpeg(), "kept"),
    "good.jpg": (GOOD_JPEG, "kept"),
    "zz-copy-of-good.jpg": (GOOD_JPEG, "exact_duplicate"),  # after good.jpg in file order
}


@pytest.fixture()
def zoo(tmp_path) -> Path:
    folder = tmp_path / "zoo"
    folder.mkdir()
    for name, (data, _) in ZOO.items():
        (folder / name).write_bytes(data)
    for index, width in enumerate((90, 80, 70, 60)):  # distinct images for the caption cases
        (folder / f"caption{index}.jpg").write_bytes(encoded(rgb(width, 60), "JPEG"))
    (folder / "a-folder.jpg").mkdir()  # a path that cannot be read as a file
    lines = [
        json.dumps({"file_name": "good.jpg", "text": "a colour gradient"}).encode(),
        json.dumps({"file_name": "caption0.jpg", "text": ""}).encode(),  # empty: kept, caption null
        json.dumps({"file_name": "caption1.jpg", "text": "   "}).encode(),  # blank: kept, caption null
        b'{"file_name": "caption2.jpg", "text": "caf\xe9 latte"}',  # Latin-1, not UTF-8
        json.dumps({"file_name": "caption3.jpg", "text": "caf\u00e9 cr\u00e8me \u2615"}, ensure_ascii=False).encode(),
        json.dumps({"file_name": "missing.jpg", "text": "no such file"}).encode(),
        json.dumps({"file_name": "a-folder.jpg", "text": "a folder"}).encode(),
        b'{"file_name": "good.jpg", "text": "said twice"}',
        b"{this line is not json",
        json.dumps({"text": "no file name"}).encode(),
    ]
    (folder / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return folder


def quarantine_by_key(run: Path) -> dict[str, dict]:
    return {r[schema.SOURCE_KEY]: r for r in pq.read_table(RunLayout(run).quarantine).to_pylist()}


def test_zoo_folder(zoo, tmp_path):
    run = tmp_path / "run"
    stats = ingest([zoo], run, workers=2)
    layout = RunLayout(run)
    kept = {r[schema.SOURCE_KEY]: r for r in pq.read_table(layout.ingest_shards()).to_pylist()}
    quarantined = quarantine_by_key(run)
    duplicates = {r[schema.SOURCE_KEY]: r for r in pq.read_table(layout.duplicates).to_pylist()}

    assert stats.rows_in == stats.ingested + stats.duplicates + stats.quarantined
    assert stats.rows_in == len(kept) + len(quarantined) + len(duplicates)
    assert stats.rows_in == len(ZOO) + 4 + 1 + 1 + 3  # files + caption images + missing + folder + bad rows

    for name, (data, expected) in ZOO.items():
        if expected == "kept":
            assert name in kept, (name, quarantined.get(name))
            thumb = Image.open(io.BytesIO(kept[name][schema.THUMBNAIL]))
            assert thumb.mode == "RGB" and thumb.format == "JPEG", name
        elif expected == "exact_duplicate":
            assert duplicates[name][schema.ID] == kept["good.jpg"][schema.ID]
        else:
            assert quarantined[name][schema.REASON] == expected, (name, quarantined[name])
            assert quarantined[name][schema.DETAIL]
            assert (quarantined[name][schema.ID] is None) == (data == b"")  # hashed whenever there were bytes

    assert quarantined["missing.jpg"][schema.REASON] == "missing_image"
    assert quarantined["a-folder.jpg"][schema.REASON] == "unreadable_path"
    assert quarantined["caption2.jpg"][schema.REASON] == "non_utf8_caption"
    assert quarantined["metadata.jsonl:8"][schema.REASON] == "duplicate_sidecar_row"
    assert quarantined["metadata.jsonl:9"][schema.REASON] == "bad_sidecar_row"
    assert quarantined["metadata.jsonl:10"][schema.REASON] == "bad_sidecar_row"
    assert kept["caption0.jpg"][schema.CAPTION] is None and kept["caption1.jpg"][schema.CAPTION] is None
    assert kept["caption3.jpg"][schema.CAPTION] == "caf\u00e9 cr\u00e8me \u2615"
    assert kept["good.jpg"][schema.CAPTION] == "a colour gradient"

    # converted, with the original's header facts
    assert kept["cmyk.jpg"][schema.FORMAT] == "JPEG"
    assert (kept["animated.gif"][schema.WIDTH], kept["animated.gif"][schema.HEIGHT]) == (60, 40)
    first_frame = np.asarray(Image.open(io.BytesIO(kept["animated.gif"][schema.THUMBNAIL])))
    assert abs(first_frame.mean() - 30) < 6  # the first frame, not a later one
    assert (kept["rotated.jpg"][schema.WIDTH], kept["rotated.jpg"][schema.HEIGHT]) == (64, 96)
    assert Image.open(io.BytesIO(kept["rotated.jpg"][schema.THUMBNAIL])).size == (64, 96)  # upright
    grey16 = np.asarray(Image.open(io.BytesIO(kept["grey16.png"][schema.THUMBNAIL])))
    assert grey16.max() > 200  # 16-bit values scaled to 8 bits, not clipped to white or black
    alpha = np.asarray(Image.open(io.BytesIO(kept["alpha.png"][schema.THUMBNAIL]))).astype(int)
    assert alpha.mean() > np.asarray(rgb()).astype(int).mean() + 20  # composited onto white


def test_bomb_is_rejected_from_the_header_alone():
    with pytest.raises(ImageProblem) as caught:
        read_header(png_declaring(10_000, 10_000))
    assert caught.value.reason == "decompression_bomb" and f"{MAX_IMAGE_PIXELS:,}" in caught.value.detail
    width, height, fmt = read_header(png_declaring(4_000, 3_000))  # large but legal: header only, no decode
    assert (width, height, fmt) == (4000, 3000, "PNG")
    with pytest.raises(ImageProblem) as truncated:
        inspect_image(png_declaring(4_000, 3_000), 64)  # the promised pixels are not there
    assert truncated.value.reason in ("truncated_image", "corrupt_image")


def test_zoo_parquet_and_tar(tmp_path):
    good = encoded(rgb(), "JPEG")
    pq.write_table(
        pa.table(
            {
                "image": pa.array([good, b"", b"garbage", encoded(rgb(50, 50), "PNG"), None], type=pa.binary()),
                "caption": pa.array([b"fine", b"ok", b"fine", b"\xff\xfe not utf-8", b"no image"], type=pa.binary()),
            }
        ),
        tmp_path / "zoo.parquet",
    )
    shard = tmp_path / "zoo.tar"
    with tarfile.open(shard, "w") as archive:
        for name, data in [
            ("0.jpg", good),  # a duplicate of the Parquet's first row
            ("0.txt", b"same image again"),
            ("1.jpg", encoded(rgb(40, 30), "JPEG")),
            ("1.txt", b"\xe9t\xe9 in Latin-1"),
            ("2.jpg", encoded(rgb(30, 30), "JPEG")),
            ("2.json", b"{broken json"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    with tarfile.open(shard) as archive:
        cut = archive.getmember("1.jpg").offset_data + 10
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(shard.read_bytes()[:cut])  # sample 0 whole, sample 1 cut inside its image

    run = tmp_path / "run"
    stats = ingest([tmp_path / "zoo.parquet", shard, truncated], run, workers=1)
    assert stats.rows_in == stats.ingested + stats.duplicates + stats.quarantined
    rows = pq.read_table(RunLayout(run).quarantine).to_pylist()
    reasons = {(Path(r[schema.SOURCE]).name, r[schema.SOURCE_KEY]): r[schema.REASON] for r in rows}
    assert reasons == {
        ("zoo.parquet", "1"): "empty_file",
        ("zoo.parquet", "2"): "corrupt_image",
        ("zoo.parquet", "3"): "non_utf8_caption",
        ("zoo.parquet", "4"): "missing_image",
        ("zoo.tar", "1"): "non_utf8_caption",
        ("truncated.tar", "1"): "corrupt_archive",
    }
    assert stats.duplicates == 2  # zoo.tar's 0.jpg and truncated.tar's 0.jpg repeat the Parquet's row 0
    kept = pq.read_table(RunLayout(run).ingest_shards()).to_pylist()
    broken_json = next(r for r in kept if r[schema.SOURCE_KEY] == "2")
    assert "json_error" in json.loads(broken_json[schema.META])  # kept, with the problem visible in meta


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (pa.table({"caption": ["no image column"], "width": [3]}), "no image column"),
        (pa.table({"image": [1, 2], "caption": ["a", "b"]}), "column 'image' has type int64"),
        (pa.table({"url": [3], "caption": ["x"]}), "column 'url' has type int64"),
        (pa.table({"jpg": [GOOD_JPEG], "caption": [42]}), "caption column 'caption' has type int64"),
    ],
)
def test_parquet_with_a_wrong_or_missing_column_stops_with_a_clear_error(tmp_path, table, message):
    good = tmp_path / "good"
    good.mkdir()
    (good / "a.jpg").write_bytes(GOOD_JPEG)
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(IngestError, match=message) as caught:
        ingest([good, tmp_path / "bad.parquet"], tmp_path / "run", workers=1)
    assert "bad.parquet" in str(caught.value)
    assert not RunLayout(tmp_path / "run").ingest.exists()  # checked before anything was written


def test_files_that_are_not_what_their_suffix_says(tmp_path):
    (tmp_path / "fake.parquet").write_bytes(b"PAR1 but not really")
    with pytest.raises(IngestError, match="not a readable Parquet file"):
        ingest([tmp_path / "fake.parquet"], tmp_path / "run", workers=1)
    (tmp_path / "fake.tar").write_bytes(b"\x00\x01 not a tar archive")
    with pytest.raises(IngestError, match="not a readable tar archive"):
        ingest([tmp_path / "fake.tar"], tmp_path / "run2", workers=1)


def test_two_caption_sidecars_are_ambiguous(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(GOOD_JPEG)
    (folder / "metadata.jsonl").write_text('{"file_name": "a.jpg", "text": "one"}\n')
    (folder / "captions.csv").write_text("file_name,caption\na.jpg,two\n")
    with pytest.raises(IngestError, match="more than one captions sidecar"):
        ingest([folder], tmp_path / "run", workers=1)


def test_non_utf8_csv_caption(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(GOOD_JPEG)
    (folder / "b.jpg").write_bytes(encoded(rgb(50, 40), "JPEG"))
    (folder / "captions.csv").write_bytes(b"file_name,caption\na.jpg,caf\xe9\nb.jpg,fine\n")
    stats = ingest([folder], tmp_path / "run", workers=1)
    assert stats.ingested == 1 and stats.quarantine_reasons == {"non_utf8_caption": 1}
    assert quarantine_by_key(tmp_path / "run")["a.jpg"][schema.ID] is not None


def test_non_utf8_file_name_and_tar_member(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    with open(bytes(folder) + b"/caf\xe9.jpg", "wb") as handle:  # a Latin-1 name, as old archives have
        handle.write(GOOD_JPEG)
    (folder / "fine.jpg").write_bytes(encoded(rgb(50, 40), "JPEG"))
    shard = tmp_path / "names.tar"
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as archive:
        info = tarfile.TarInfo("\u00e9t\u00e9.jpg")  # stored as Latin-1 bytes, read back as undecodable UTF-8
        data = encoded(rgb(40, 40), "JPEG")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    run = tmp_path / "run"
    stats = ingest([folder, shard], run, workers=1)
    assert stats.rows_in == 3 and stats.ingested == 2
    assert stats.quarantine_reasons == {"non_utf8_path": 1}
    keys = [r[schema.SOURCE_KEY] for r in pq.read_table(RunLayout(run).ingest_shards()).to_pylist()]
    assert keys == ["fine.jpg", "\ufffdt\ufffd"]  # kept, its key made printable
