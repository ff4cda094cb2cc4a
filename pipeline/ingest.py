"""Ingest: read image-text sources into the run's ingest shards (one row per unique image).

Sources (a list may mix them; globs are expanded, sorted):

- **a folder of images** with a captions sidecar in the Hugging Face ``imagefolder`` layout:
  ``metadata.jsonl`` / ``captions.jsonl`` (or one ``.csv``) beside the images, one row per image with
  ``file_name`` (relative to the sidecar's folder) and ``text`` or ``caption``. Sub-folders may carry
  their own sidecar. An image without a sidecar row is kept with a null caption: the CLIP scorer
  scores null captions as null with a reason and selection decides, so an image is never lost for
  a caption it could still get (e.g. in the specialist annotation round). A warning names each folder
  with such images and their count, and the report shows the missing captions per source.
- **Parquet** with image bytes (``image``/``jpg``/``image_bytes``/..., binary or a Hugging Face
  ``{bytes, path}`` struct) or local paths (``image_path``/``path``/``file_name``/``url`` with
  ``file://``; nothing is downloaded: fetch remote URLs with img2dataset first), and LAION/img2dataset
  columns (``caption``/``TEXT``/``text``, ``key``, ``width``, ...).
- **WebDataset tar shards** as img2dataset writes them: ``0000.jpg`` + ``0000.txt`` and/or ``0000.json``.
- a folder holding no images but ``.tar`` (or else ``.parquet``) files reads those.

Each row gets ``id`` = sha256 of its bytes, the header's size and format, and a small JPEG thumbnail
(see pipeline/imageio.py), computed in a process pool, or with ``backend="ray"`` in Ray tasks per
source unit (pipeline/ingest_ray.py; the same outputs row for row). Images that have a local path keep
it in ``image_path`` (the bytes stay where they are); images that only exist inside a Parquet cell or a
tar member are stored as bytes in ``image``.

Every input row lands in exactly one place, so ``rows_in == ingested + duplicates + quarantined``:
the shards, ``duplicates.parquet`` (exact copies, reason ``exact_duplicate``, ``id`` = the kept row's
id; the first occurrence in source order is kept) or ``quarantine.parquet`` (bad input, with a reason
code and a detail message). Extra per-row fields go into ``meta`` as JSON; an engagement count
(likes, favourites, ...) goes into ``engagement``.

``_stats.json`` is written last and marks the ingest complete: a rerun with the same sources and
settings returns it without re-reading; a run directory holding another ingest is refused.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import math
import multiprocessing
import os
import tarfile
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import UserError
from pipeline import schema
from pipeline.imageio import ImageInfo, ImageProblem, inspect_image, local_path, sha256_hex
from pipeline.layout import RunLayout, shard_name

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "avif")
SIDECAR_JSONL = ("metadata.jsonl", "captions.jsonl")
CAPTION_KEYS = ("caption", "text", "TEXT", "txt")
FILE_NAME_KEYS = ("file_name",)
IMAGE_BYTES_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "image_bytes", "img")
IMAGE_PATH_COLUMNS = ("image_path", "path", "file_name", "filepath", "url")
# Emu's "proprietary signals": the first of these a source carries becomes the engagement column.
ENGAGEMENT_KEYS = (
    "engagement",
    "likes",
    "like_count",
    "num_likes",
    "favorites",
    "favourites",
    "favorite_count",
    "favourite_count",
    "upvotes",
    "score",
)

_STATS_FILE = "_stats.json"
_FORMAT_VERSION = 1
# Files larger than this are not read into memory: no photo of an image-text corpus comes near it.
MAX_FILE_BYTES = 256 * 1024 * 1024
_CHUNK_ITEMS = 32  # items per pool task: large enough to amortise pickling, small enough to balance
_ROW_GROUP_ROWS = 512
BACKENDS = ("local", "ray")  # where images are inspected: this machine's process pool, or Ray tasks


class IngestError(UserError):
    """An input that cannot be ingested at all (no such path, no image column, not a Parquet file)."""


@dataclass
class IngestStats:
    rows_in: int = 0
    ingested: int = 0
    duplicates: int = 0
    quarantined: int = 0
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    missing_captions: int = 0  # ingested rows whose caption is null (absent or empty in the source)
    shards: list[str] = field(default_factory=list)
    seconds: float = 0.0


# --- what a source yields ---------------------------------------------------------------------------
@dataclass
class Item:
    """One input row, before its image is inspected."""

    source: str
    source_key: str
    data: bytes | None = None  # the encoded image, when the source holds it (Parquet cell, tar member)
    path: Path | None = None  # the local file, when the source points at one (read in the worker)
    caption: str | None = None
    engagement: float | None = None
    meta: dict[str, Any] | None = None
    problem: tuple[str, str] | None = None  # known bad before decoding: (reason, detail)


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _kind(path: Path) -> str:
    name = path.name.lower()
    if path.is_dir():
        return "folder"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return "tar"
    raise IngestError(f"{path}: cannot ingest this file; expected a folder of images, a .parquet or a .tar shard")


def _has_images(folder: Path) -> bool:
    for _dirpath, _dirs, files in os.walk(folder):
        if any(f.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS for f in files if "." in f):
            return True
        if any(f in SIDECAR_JSONL for f in files):
            return True
    return False


def expand_sources(sources: Iterable[str | Path]) -> list[tuple[str, Path]]:
    """(kind, path) per source in the order given; globs expand sorted. Raises IngestError."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    expanded: list[tuple[str, Path]] = []
    for source in sources:
        text = str(source)
        if _is_glob(text):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise IngestError(f"{text}: the pattern matches no files")
            paths = [Path(m) for m in matches]
        else:
            path = Path(text)
            if not path.exists():
                raise IngestError(f"{text}: no such file or folder")
            paths = [path]
        for path in paths:
            kind = _kind(path)
            if kind == "folder" and not _has_images(path):
                inner = sorted(path.glob("*.tar")) or sorted(path.glob("*.parquet"))
                if not inner:
                    raise IngestError(f"{path}: the folder holds no images, .tar shards or .parquet files")
                expanded.extend((_kind(p), p) for p in inner)
            else:
                expanded.append((kind, path))
    if not expanded:
        raise IngestError("no sources given")
    for kind, path in expanded:  # a wrong Parquet schema stops the run before anything is written
        if kind == "parquet":
            _open_parquet(path)
    return expanded


# --- shared field handling -------------------------------------------------------------------------
def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # surrogate escapes stand for bytes that were not UTF-8
        return False
    return True


def _clean(value: Any) -> Any:
    """Make a meta value JSON- and UTF-8-safe (undecodable bytes become U+FFFD, bytes are described)."""
    if isinstance(value, str):
        return value if _is_utf8(value) else value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _engagement(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _fields_to_item(item: Item, fields: dict[str, Any], caption_keys: Iterable[str] = CAPTION_KEYS) -> Item:
    """Move the caption, the engagement count and everything else (meta) from ``fields`` onto ``item``."""
    fields = dict(fields)
    for key in caption_keys:
        if key in fields:
            caption = fields.pop(key)
            if caption is not None and not isinstance(caption, str):
                caption = str(caption)
            if caption is not None and not _is_utf8(caption):
                item.problem = item.problem or ("non_utf8_caption", "the caption is not valid UTF-8")
            else:
                item.caption = caption
            break
    for key in ENGAGEMENT_KEYS:
        if key in fields:
            item.engagement = _engagement(fields[key])
            if item.engagement is not None:
                del fields[key]  # a value that is no number stays in meta, where it can be seen
            break
    if fields:
        item.meta = _clean(fields)
    return item


# --- folder + sidecar --------------------------------------------------------------------------------
def _read_sidecar(path: Path) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
    """(row key, fields or None, error) per row. Lines are decoded one by one with surrogate escapes,
    so one non-UTF-8 caption costs one row, not the file."""
    raw = path.read_bytes().decode("utf-8", "surrogateescape")
    if path.suffix == ".jsonl":
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            key = f"{path.name}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield key, None, f"line {number} is not JSON: {exc}"
                continue
            if not isinstance(row, dict):
                yield key, None, f"line {number} is not a JSON object"
                continue
            yield key, row, None
    else:
        reader = csv.DictReader(io.StringIO(raw, newline=""))
        for number, row in enumerate(reader, start=2):  # line 1 is the header
            key = f"{path.name}:{number}"
            if None in row:
                yield key, None, f"row {number} has more fields than the header"
                continue
            yield key, {k: v for k, v in row.items() if v is not None}, None


def _sidecar_in(folder: Path, files: list[str]) -> Path | None:
    candidates = [f for f in SIDECAR_JSONL if f in files] + sorted(f for f in files if f.lower().endswith(".csv"))
    if len(candidates) > 1:
        raise IngestError(f"{folder}: more than one captions sidecar ({', '.join(candidates)}); keep one")
    return folder / candidates[0] if candidates else None


def _warn_uncaptioned(root: Path, images: set[str], rows: dict[str, Any], sidecar_dirs: set[str]) -> None:
    """One warning per folder holding images that no sidecar row describes: they are ingested with a null
    caption (and ``min_clip_score`` drops them as ``clip_score_null``), which must not go unnoticed."""
    uncaptioned: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    for relative in images:
        folder = relative.rpartition("/")[0] or "."
        totals[folder] += 1
        uncaptioned[folder] += relative not in rows
    for folder in sorted(f for f, n in uncaptioned.items() if n):
        where = root / folder if folder != "." else root
        if not any(d == "." or folder == d or folder.startswith(d + "/") for d in sidecar_dirs):
            why = f"no captions sidecar ({' or '.join(SIDECAR_JSONL)} or a .csv with file_name and text/caption)"
        else:
            why = "no row in the captions sidecar"
        log.warning(
            "%s: %d of %d images have no caption (%s); they are ingested with a null caption",
            where,
            uncaptioned[folder],
            totals[folder],
            why,
        )


def _folder_items(root: Path) -> Iterator[Item]:
    source = str(root)
    images: set[str] = set()
    rows: dict[str, dict[str, Any]] = {}
    bad_rows: list[Item] = []
    sidecar_dirs: set[str] = set()
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        folder = Path(dirpath)
        prefix = folder.relative_to(root)
        for name in files:
            if "." in name and name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
                images.add((prefix / name).as_posix())
        sidecar = _sidecar_in(folder, files)
        if sidecar is None:
            continue
        sidecar_dirs.add(prefix.as_posix())
        for key, row, error in _read_sidecar(sidecar):
            sidecar_key = (prefix / key).as_posix()
            if row is None:
                bad_rows.append(Item(source, sidecar_key, problem=("bad_sidecar_row", error)))
                continue
            name = next((row[k] for k in FILE_NAME_KEYS if k in row), None)
            if not isinstance(name, str) or not name.strip():
                bad_rows.append(Item(source, sidecar_key, problem=("bad_sidecar_row", "the row has no file_name")))
                continue
            relative = (prefix / name).as_posix()
            if relative in rows:
                bad_rows.append(
                    Item(source, sidecar_key, problem=("duplicate_sidecar_row", f"a second row for {relative}"))
                )
                continue
            rows[relative] = {k: v for k, v in row.items() if k not in FILE_NAME_KEYS}
    _warn_uncaptioned(root, images, rows, sidecar_dirs)
    yield from bad_rows
    for relative in sorted(images | set(rows)):
        if not _is_utf8(relative):  # Parquet strings are UTF-8: such a path could not be stored or found again
            yield Item(source, _clean(relative), problem=("non_utf8_path", "the file name is not valid UTF-8"))
            continue
        item = Item(source, relative, path=(root / relative).resolve())
        fields = rows.get(relative)
        yield _fields_to_item(item, fields) if fields else item


# --- Parquet -------------------------------------------------------------------------------------------
def _column_choice(path: Path, parquet_schema: pa.Schema) -> tuple[str | None, str | None, str | None]:
    """(bytes column, path column, caption column) of a Parquet file, or IngestError naming the problem."""
    names = parquet_schema.names
    bytes_col = path_col = caption_col = None
    for name in IMAGE_BYTES_COLUMNS:
        if name not in names:
            continue
        kind = parquet_schema.field(name).type
        hf_image = pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0  # Hugging Face {bytes, path}
        if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or hf_image:
            bytes_col = name
        elif (pa.types.is_string(kind) or pa.types.is_large_string(kind)) and name == "image":
            path_col = name
        else:
            raise IngestError(
                f"{path}: column {name!r} has type {kind}; expected binary image bytes or a {{bytes, path}} struct"
            )
        break
    if path_col is None:
        for name in IMAGE_PATH_COLUMNS:
            if name in names:
                kind = parquet_schema.field(name).type
                if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
                    raise IngestError(f"{path}: column {name!r} has type {kind}; expected a string path or URL")
                path_col = name
                break
    if bytes_col is None and path_col is None:
        raise IngestError(
            f"{path}: no image column; expected image bytes in one of {list(IMAGE_BYTES_COLUMNS)} or a path/URL in "
            f"one of {list(IMAGE_PATH_COLUMNS)}; the file has {names}"
        )
    for name in CAPTION_KEYS:
        if name in names:
            kind = parquet_schema.field(name).type
            if not (
                pa.types.is_string(kind)
                or pa.types.is_large_string(kind)
                or pa.types.is_binary(kind)
                or pa.types.is_large_binary(kind)
                or pa.types.is_null(kind)
            ):
                raise IngestError(f"{path}: caption column {name!r} has type {kind}; expected strings")
            caption_col = name
            break
    return bytes_col, path_col, caption_col


def _open_parquet(path: Path) -> tuple[pq.ParquetFile, tuple[str | None, str | None, str | None]]:
    try:
        parquet = pq.ParquetFile(path)
        arrow_schema = parquet.schema_arrow
    except (pa.ArrowException, OSError) as exc:
        raise IngestError(f"{path}: not a readable Parquet file ({exc})") from exc
    return parquet, _column_choice(path, arrow_schema)


def _parquet_items(path: Path, row_group: int | None = None, first_index: int = 0) -> Iterator[Item]:
    """The rows of ``path`` (or of one of its row groups, whose first row has index ``first_index``)."""
    source = str(path)
    parquet, (bytes_col, path_col, caption_col) = _open_parquet(path)
    arrow_schema = parquet.schema_arrow
    binary_cols = {
        f.name
        for f in arrow_schema
        if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type) or f.name == bytes_col
    }
    meta_cols = [n for n in arrow_schema.names if n not in binary_cols and n != caption_col]
    base = path.parent.resolve()
    index = first_index
    # only the columns an item takes: other binary columns (embeddings, masks, ...) are never decoded
    used = [n for n in arrow_schema.names if n in {bytes_col, path_col, caption_col} or n in meta_cols]
    groups = None if row_group is None else [row_group]
    for batch in parquet.iter_batches(batch_size=256, row_groups=groups, columns=used):
        rows = batch.to_pylist()
        for row in rows:
            item = Item(source, str(index))
            index += 1
            value = row.get(bytes_col) if bytes_col else None
            struct_path = None
            if isinstance(value, dict):  # Hugging Face Image feature: {bytes, path}
                struct_path = value.get("path")
                value = value.get("bytes")
            uri = row.get(path_col) if path_col else None
            uri = uri or struct_path
            if value:
                item.data = value
            elif value is not None and not uri:
                item.data = value  # zero bytes: the worker quarantines it as empty_file
            elif uri:
                local = local_path(uri)
                if local is None:
                    item.problem = (
                        "remote_url",
                        f"{uri} is remote; ingest never downloads (fetch it with img2dataset)",
                    )
                else:
                    item.path = local if local.is_absolute() else base / local
            else:
                item.problem = ("missing_image", "the row has no image bytes and no path")
            caption = row.get(caption_col) if caption_col else None
            if isinstance(caption, bytes):
                try:
                    caption = caption.decode("utf-8")
                except UnicodeDecodeError:
                    item.problem = item.problem or ("non_utf8_caption", "the caption bytes are not valid UTF-8")
                    caption = None
            fields = {n: row[n] for n in meta_cols if row.get(n) is not None}
            if caption is not None:
                fields["caption"] = caption
            yield _fields_to_item(item, fields, caption_keys=("caption",))


# --- WebDataset tar shards -------------------------------------------------------------------------
def _split_member(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _tar_sample(source: str, key: str, parts: dict[str, bytes]) -> Item:
    item = Item(source, key)
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in parts), None)
    fields: dict[str, Any] = {}
    if "json" in parts:
        try:
            loaded = json.loads(parts["json"].decode("utf-8", "surrogateescape"))
            if isinstance(loaded, dict):
                fields = loaded
            else:
                fields = {"json": loaded}
        except json.JSONDecodeError as exc:
            fields = {"json_error": str(exc)}
    if "txt" in parts:
        try:
            fields["caption"] = parts["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            item.problem = ("non_utf8_caption", f"{key}.txt is not valid UTF-8")
    else:
        for name in CAPTION_KEYS:  # img2dataset's .json carries the caption too
            if name in fields:
                fields["caption"] = fields.pop(name)
                break
    extra = sorted(e for e in parts if e != image_ext and e not in ("txt", "json"))
    if extra:
        fields["other_members"] = extra
    if image_ext is None:
        item.problem = item.problem or ("missing_image", f"the sample has no image member (has {sorted(parts)})")
    else:
        item.data = parts[image_ext]
    return _fields_to_item(item, fields, caption_keys=("caption",))


def _tar_items(path: Path) -> Iterator[Item]:
    source = str(path)
    try:
        archive = tarfile.open(path, mode="r|*")  # noqa: SIM115 - closed by the with below; streaming read
    except (tarfile.TarError, OSError) as exc:
        raise IngestError(f"{path}: not a readable tar archive ({exc})") from exc
    key: str | None = None
    parts: dict[str, bytes] = {}
    try:
        with archive:
            for member in archive:
                if not member.isfile():
                    continue
                member_key, ext = _split_member(member.name)
                if member_key != key:
                    if key is not None:
                        yield _tar_sample(source, key, parts)
                    key, parts = member_key, {}
                handle = archive.extractfile(member)
                parts[ext] = handle.read() if handle else b""
    except (tarfile.TarError, OSError, EOFError) as exc:
        where = f"in sample {key}" if key else "at its start"
        # the samples before this one were yielded whole; this one and any after it are lost with the archive
        yield Item(source, key or "", problem=("corrupt_archive", f"the archive breaks off {where}: {exc}"))
        return
    if key is not None:
        yield _tar_sample(source, key, parts)


def iter_items(sources: list[tuple[str, Path]]) -> Iterator[Item]:
    readers = {"folder": _folder_items, "parquet": _parquet_items, "tar": _tar_items}
    for kind, path in sources:
        yield from readers[kind](path)


# --- inspection (runs in the pool's workers) ------------------------------------------------------
Outcome = tuple[ImageInfo | None, str | None, str | None, str | None]  # info, reason, detail, id


def _inspect(data: bytes | None, path: Path | None, problem: tuple[str, str] | None, thumbnail_size: int) -> Outcome:
    if data is None and path is not None:
        try:
            if path.is_file() and path.stat().st_size > MAX_FILE_BYTES:
                return None, "file_too_large", f"{path} has {path.stat().st_size:,} bytes > {MAX_FILE_BYTES:,}", None
            data = path.read_bytes()
        except FileNotFoundError:
            return None, "missing_image", f"{path} does not exist", None
        except OSError as exc:  # permission denied, a folder, an I/O error
            return None, "unreadable_path", f"{path}: {exc.strerror or exc}", None
    # the id of a good image is the hash inspect_image computes; a quarantined row's bytes are hashed here
    if problem is not None:
        return None, problem[0], problem[1], sha256_hex(data) if data else None
    if data is None:
        return None, "missing_image", "the row has no image", None
    try:
        return inspect_image(data, thumbnail_size), None, None, None
    except ImageProblem as exc:
        return None, exc.reason, exc.detail, sha256_hex(data) if data else None


def _inspect_chunk(
    jobs: list[tuple[bytes | None, Path | None, tuple[str, str] | None]], thumbnail_size: int
) -> list[Outcome]:
    return [_inspect(data, path, problem, thumbnail_size) for data, path, problem in jobs]


def _chunks(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
    chunk: list[Item] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _jobs(chunk: list[Item]) -> list[tuple[bytes | None, Path | None, tuple[str, str] | None]]:
    return [(item.data, item.path, item.problem) for item in chunk]


def _inspected(items: Iterator[Item], thumbnail_size: int, workers: int) -> Iterator[tuple[Item, Outcome]]:
    """(item, outcome) in input order. workers <= 1 runs in this process (debugging, tests)."""
    if workers <= 1:
        for item in items:
            yield item, _inspect(item.data, item.path, item.problem, thumbnail_size)
        return
    from concurrent.futures import ProcessPoolExecutor

    # forkserver: safe when the caller has threads (Ray, Prefect, torch), unlike fork
    context = multiprocessing.get_context("forkserver")
    window = workers * 4  # chunks in flight: keeps every worker busy, bounds memory on huge sources
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending: deque = deque()
        for chunk in _chunks(items, _CHUNK_ITEMS):
            pending.append((chunk, pool.submit(_inspect_chunk, _jobs(chunk), thumbnail_size)))
            while len(pending) >= window:
                done_chunk, future = pending.popleft()
                yield from zip(done_chunk, future.result())
        while pending:
            done_chunk, future = pending.popleft()
            yield from zip(done_chunk, future.result())


# --- writing -------------------------------------------------------------------------------------------
class _TableWriter:
    """Buffers rows and streams them to Parquet as row groups; rolls to a new file every ``file_rows``."""

    def __init__(self, paths: Iterator[Path], table_schema: pa.Schema, file_rows: int | None = None) -> None:
        self._paths = paths
        self._schema = table_schema
        self._file_rows = file_rows
        self._rows: list[dict[str, Any]] = []
        self._writer: pq.ParquetWriter | None = None
        self._in_file = 0
        self.files: list[Path] = []

    def add(self, row: dict[str, Any]) -> None:
        self._rows.append(row)
        if len(self._rows) >= _ROW_GROUP_ROWS or (
            self._file_rows and self._in_file + len(self._rows) >= self._file_rows
        ):
            self._flush()

    def _flush(self) -> None:
        if not self._rows and self._writer is not None:
            return
        if self._writer is None:
            path = next(self._paths)
            # Encoded images do not compress and never repeat: skip snappy and dictionary pages for
            # them (a third of the parent process's time otherwise), keep both for the other columns.
            binary = {f.name for f in self._schema if pa.types.is_binary(f.type)}
            self._writer = pq.ParquetWriter(
                path,
                self._schema,
                compression={name: "none" if name in binary else "snappy" for name in self._schema.names},
                use_dictionary=[name for name in self._schema.names if name not in binary],
            )
            self.files.append(path)
            self._in_file = 0
        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self._schema))
            self._in_file += len(self._rows)
            self._rows = []
        if self._file_rows and self._in_file >= self._file_rows:
            self._writer.close()
            self._writer = None
            self._in_file = 0

    def close(self) -> list[Path]:
        if self._rows or not self.files:  # an empty table is still written, so readers find the file
            self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return self.files


def _shard_paths(folder: Path) -> Iterator[Path]:
    index = 0
    while True:
        yield folder / shard_name(index)
        index += 1


def _fingerprint(sources: list[tuple[str, Path]], shard_rows: int, thumbnail_size: int) -> dict[str, Any]:
    return {
        "format_version": _FORMAT_VERSION,
        "sources": [f"{kind}:{path.resolve()}" for kind, path in sources],
        "shard_rows": shard_rows,
        "thumbnail_size": thumbnail_size,
    }


def _clear(folder: Path) -> None:
    """Remove the files of an unfinished ingest (no _stats.json) so shards never mix two attempts."""
    for stale in [*folder.glob("shard-*.parquet"), folder / "quarantine.parquet", folder / "duplicates.parquet"]:
        stale.unlink(missing_ok=True)


def read_stats(run_dir: Path) -> IngestStats | None:
    """The stats of a finished ingest in ``run_dir``, or None when there is none."""
    path = RunLayout(run_dir).ingest / _STATS_FILE
    if not path.exists():
        return None
    stored = json.loads(path.read_text())
    return IngestStats(**stored["stats"])


def ingest(
    sources: list[str | Path],
    run_dir: Path,
    *,
    shard_rows: int = 10_000,
    thumbnail_size: int = schema.THUMBNAIL_SIZE,
    workers: int | None = None,
    progress: bool = False,
    backend: str = "local",
) -> IngestStats:
    """Read ``sources`` into ``run_dir``'s ingest shards; see the module docstring. Raises IngestError
    for unusable input; bad rows never raise, they are quarantined with a reason.

    ``backend="local"`` inspects images in a process pool of ``workers`` processes on this machine;
    ``backend="ray"`` reads and inspects each source unit (tar shard, Parquet row group, chunk of a
    folder's files) in a Ray task (see pipeline/ingest_ray.py; ``workers`` is not used). Both write the
    same outputs row for row."""
    if backend not in BACKENDS:
        raise IngestError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if shard_rows < 1:
        raise IngestError(f"shard_rows must be >= 1, got {shard_rows}")
    if thumbnail_size < 32:  # as IngestConfig.thumbnail_size allows
        raise IngestError(f"thumbnail_size must be >= 32 px, got {thumbnail_size}")
    expanded = expand_sources(sources)
    layout = RunLayout(run_dir)
    fingerprint = _fingerprint(expanded, shard_rows, thumbnail_size)
    stats_path = layout.ingest / _STATS_FILE
    if stats_path.exists():
        stored = json.loads(stats_path.read_text())
        if stored.get("inputs") == fingerprint:
            log.info("ingest of these sources is already complete in %s; skipping", layout.ingest)
            return IngestStats(**stored["stats"])
        raise IngestError(
            f"{layout.ingest} already holds an ingest of other sources or settings ({stored.get('inputs')}); "
            "use a new run directory"
        )
    try:
        layout.ingest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way, no permission, a read-only disk
        raise IngestError(f"{layout.ingest}: cannot create the run folder ({exc.strerror or exc})") from exc
    _clear(layout.ingest)
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    started = time.perf_counter()
    stats = IngestStats()
    reasons: Counter[str] = Counter()
    # local: raw digest -> (source, key) of the kept row, here; ray: the same map, hash-partitioned over
    # Ray actors (pipeline/ingest_ray.py), which return each good row's kept row (None: it is the first)
    first_seen: dict[bytes, tuple[str, str]] = {}
    shards = _TableWriter(_shard_paths(layout.ingest), schema.INGEST_SCHEMA, file_rows=shard_rows)
    quarantine = _TableWriter(iter([layout.quarantine]), schema.QUARANTINE_SCHEMA)
    duplicates = _TableWriter(iter([layout.duplicates]), schema.QUARANTINE_SCHEMA)

    if backend == "ray":
        from pipeline.ingest_ray import inspected_on_ray

        results = _counting_results(inspected_on_ray(expanded, thumbnail_size), stats)
    else:
        inspected = _inspected(_counting(iter_items(expanded), stats), thumbnail_size, workers)
        results = ((item, outcome, _LOOK_UP) for item, outcome in inspected)
    if progress:
        from tqdm import tqdm

        results = tqdm(results, desc="ingest", unit="img")
    for item, (info, reason, detail, digest), kept in results:
        if info is None:
            stats.quarantined += 1
            reasons[reason] += 1
            quarantine.add(
                {
                    schema.SOURCE: item.source,
                    schema.SOURCE_KEY: _clean(item.source_key),
                    schema.ID: digest,
                    schema.REASON: reason,
                    schema.DETAIL: _clean(detail),
                }
            )
            continue
        if kept is _LOOK_UP:
            raw_id = bytes.fromhex(info.id)
            kept = first_seen.get(raw_id)
            if kept is None:
                first_seen[raw_id] = (item.source, item.source_key)
        if kept is not None:
            kept_source, kept_key = kept
            stats.duplicates += 1
            duplicates.add(
                {
                    schema.SOURCE: item.source,
                    schema.SOURCE_KEY: _clean(item.source_key),
                    schema.ID: info.id,
                    schema.REASON: "exact_duplicate",
                    schema.DETAIL: _clean(f"same bytes as {kept_source} :: {kept_key}"),
                }
            )
            continue
        caption = item.caption if item.caption is not None and item.caption.strip() else None
        stats.missing_captions += caption is None
        stats.ingested += 1
        shards.add(
            {
                schema.ID: info.id,
                schema.IMAGE: item.data if item.path is None else None,
                schema.IMAGE_PATH: str(item.path) if item.path is not None else None,
                schema.CAPTION: caption,
                schema.WIDTH: info.width,
                schema.HEIGHT: info.height,
                schema.FORMAT: info.format,
                schema.THUMBNAIL: info.thumbnail,
                schema.SOURCE: item.source,
                schema.SOURCE_KEY: _clean(item.source_key),
                schema.ENGAGEMENT: item.engagement,
                schema.META: json.dumps(item.meta, sort_keys=True, ensure_ascii=False, default=str)
                if item.meta
                else None,
            }
        )
    shard_files = shards.close()
    quarantine.close()
    duplicates.close()

    stats.quarantine_reasons = dict(sorted(reasons.items()))
    stats.shards = [p.name for p in shard_files]
    stats.seconds = round(time.perf_counter() - started, 3)
    if stats.rows_in != stats.ingested + stats.duplicates + stats.quarantined:
        raise RuntimeError(f"ingest lost rows: {asdict(stats)}")  # a bug, never bad input
    stats_path.write_text(json.dumps({"inputs": fingerprint, "stats": asdict(stats)}, indent=2))
    log.info(
        "ingested %d of %d rows (%d duplicates, %d quarantined: %s; %d without a caption) in %.1f s",
        stats.ingested,
        stats.rows_in,
        stats.duplicates,
        stats.quarantined,
        stats.quarantine_reasons,
        stats.missing_captions,
        stats.seconds,
    )
    return stats


def _counting(items: Iterator[Item], stats: IngestStats) -> Iterator[Item]:
    for item in items:
        stats.rows_in += 1
        yield item


_LOOK_UP = object()  # "is this id new?" is answered by the driver's own map (local backend)


def _counting_results(results: Iterator[tuple[Any, ...]], stats: IngestStats) -> Iterator[tuple[Any, ...]]:
    for result in results:
        stats.rows_in += 1
        yield result
