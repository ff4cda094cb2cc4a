"""Training data: captioned images in, cached latents + text embeddings out, batches by balanced
aspect-ratio bucket.

Inputs (the curated set or the pool):
- an imagefolder: ``metadata.jsonl`` with ``file_name`` (relative to the folder) and ``text``;
- Parquet (one file or a folder of ``*.parquet`` shards) with pipeline/schema.py's columns: ``image``
  (bytes) or ``image_path``, and ``caption``.

Every image goes to the aspect-ratio bucket nearest its own (Playground v2.5 §3.2), is resized to cover
the bucket and centre-cropped, encoded once by the autoencoder, and its caption once by the text
encoder; both are written to disk as ``.npy`` (memory-mapped on read) so a 200K-image pool does not need
to fit in RAM. The sampler then draws the buckets by size^alpha with a cap on how often any image repeats
(BalancedBucketSampler): not in proportion to size, so rare aspect ratios are learned, and not equally,
so a small bucket's few images are not memorised.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from pipeline import schema
from pipeline.errors import UserError
from pipeline.imageio import load_image_bytes

log = logging.getLogger(__name__)


class DataError(UserError, ValueError):
    """The training data cannot be used as given (too few images, missing captions under ``error``)."""


@dataclass
class CaptionedImage:
    key: str  # file name / shard:row, for reports
    caption: str
    load: Callable[[], Image.Image] = field(repr=False)


@dataclass
class ReadReport:
    """Every row read, accounted for: ``rows`` = ``usable`` + skipped with a reason (no caption, a bad
    ``file_name``, unreadable image)."""

    rows: int = 0
    usable: int = 0
    missing_caption: list[str] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)  # key -> reason
    bad_path: dict[str, str] = field(default_factory=dict)  # key -> why its file_name was refused

    def to_dict(self) -> dict:
        return {"rows": self.rows, "usable": self.usable, "missing_caption": len(self.missing_caption),
                "missing_caption_keys": self.missing_caption[:50], "unreadable": self.unreadable,
                "bad_path": self.bad_path}


def read_captioned(path: str | Path, missing_captions: str = "skip") -> tuple[list[CaptionedImage], ReadReport]:
    """Rows of an imagefolder or Parquet set. A row with an empty/null caption is skipped and counted
    (``missing_captions="skip"``) or rejected with the offending keys (``"error"``)."""
    path = Path(path)
    if (path / "metadata.jsonl").is_file():
        rows = _imagefolder_rows(path)
    elif path.suffix == ".parquet" or (path.is_dir() and any(path.glob("*.parquet"))):
        rows = _parquet_rows(path)
    else:
        raise DataError(f"{path}: neither an imagefolder (metadata.jsonl) nor Parquet (*.parquet)")
    report = ReadReport()
    items = []
    for key, caption, load in rows:
        report.rows += 1
        if isinstance(load, RowProblem):
            report.bad_path[key] = load.reason
            continue
        if caption is None or not str(caption).strip():
            report.missing_caption.append(key)
            continue
        items.append(CaptionedImage(key, str(caption).strip(), load))
    if report.missing_caption and missing_captions == "error":
        raise DataError(f"{path}: {len(report.missing_caption)} of {report.rows} rows have no caption "
                        f"(first: {report.missing_caption[:5]}); set data.missing_captions=skip to drop them")
    if report.missing_caption:
        log.warning("%s: skipped %d rows with no caption", path, len(report.missing_caption))
    if report.bad_path:
        log.warning("%s: skipped %d rows whose file_name is outside the folder (first: %s)", path,
                    len(report.bad_path), next(iter(report.bad_path.items())))
    report.usable = len(items)
    return items, report


@dataclass(frozen=True)
class RowProblem:
    """Why a row cannot be used at all (its ``load`` in place of a loader); counted in the report."""

    reason: str


def inside_folder(root: Path, file_name) -> Path | RowProblem:
    """``root / file_name`` when it stays inside ``root``: a relative path without ``..`` whose real
    location (symbolic links followed) is under ``root``'s; otherwise the reason it is refused."""
    if not isinstance(file_name, str) or not file_name.strip():
        return RowProblem(f"file_name must be a relative path, got {file_name!r}")
    name = Path(file_name)
    if name.is_absolute():
        return RowProblem(f"file_name {file_name!r} is an absolute path; it must be relative to {root}")
    if ".." in name.parts:
        return RowProblem(f"file_name {file_name!r} goes up with '..'; it must stay inside {root}")
    file = root / name
    if not file.resolve().is_relative_to(root.resolve()):
        return RowProblem(f"file_name {file_name!r} resolves to {file.resolve()}, outside {root} (a symbolic link "
                          f"out of the folder)")
    return file


def _imagefolder_rows(root: Path):
    """(key, caption, loader or RowProblem) per row of ``metadata.jsonl``; a ``file_name`` that leaves the
    folder is a RowProblem, never opened."""
    for line_no, line in enumerate((root / "metadata.jsonl").read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "file_name" not in row:
            raise DataError(f"{root}/metadata.jsonl line {line_no}: no file_name")
        file = inside_folder(root, row["file_name"])
        key = row["file_name"] if isinstance(row["file_name"], str) else f"metadata.jsonl line {line_no}"
        if isinstance(file, RowProblem):
            yield key, row.get("text"), file
        else:
            yield key, row.get("text"), (lambda f=file: Image.open(f))


def _parquet_rows(path: Path):
    import pyarrow.parquet as pq

    files = [path] if path.is_file() else sorted(path.glob("*.parquet"))
    for file in files:
        table = pq.read_table(file)
        names = set(table.column_names)
        if schema.CAPTION not in names or not names & {schema.IMAGE, schema.IMAGE_PATH}:
            raise DataError(f"{file}: needs a {schema.CAPTION!r} column and {schema.IMAGE!r} or {schema.IMAGE_PATH!r}")
        images = table.column(schema.IMAGE).to_pylist() if schema.IMAGE in names else [None] * table.num_rows
        paths = table.column(schema.IMAGE_PATH).to_pylist() if schema.IMAGE_PATH in names else [None] * table.num_rows
        captions = table.column(schema.CAPTION).to_pylist()
        ids = table.column(schema.ID).to_pylist() if schema.ID in names else [None] * table.num_rows
        for i, (data, image_path, caption, row_id) in enumerate(zip(images, paths, captions, ids)):
            # stored bytes, or the local file (plain path or file:// URI) the row's image_path names
            yield (row_id or f"{file.name}:{i}", caption,
                   lambda d=data, p=image_path: Image.open(io.BytesIO(load_image_bytes(d, p))))


# --- aspect-ratio buckets -------------------------------------------------------------------------


def make_buckets(resolution: int, aspect_ratios: list[float]) -> list[tuple[int, int]]:
    """(height, width) per aspect ratio w/h, sides multiples of 64, area about resolution²."""
    buckets = set()
    for ratio in aspect_ratios:
        w = max(64, round(resolution * math.sqrt(ratio) / 64) * 64)
        h = max(64, round(resolution / math.sqrt(ratio) / 64) * 64)
        buckets.add((h, w))
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest in log space (so 2:1 and 1:2 are equally far
    from 1:1)."""
    target = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][1] / buckets[i][0]) - target))


def assign_buckets(sizes: list[tuple[int, int]], buckets: list[tuple[int, int]], min_per_bucket: int) -> list[int]:
    """Bucket index per (width, height). A bucket with fewer than ``min_per_bucket`` images is folded
    into its nearest neighbour: balanced sampling would otherwise show its few images as often as a
    full bucket's many, and overfit them."""
    assignment = [nearest_bucket(w, h, buckets) for w, h in sizes]
    alive = set(assignment)
    while len(alive) > 1:
        counts = {b: assignment.count(b) for b in alive}
        small = min(alive, key=lambda b: counts[b])
        if counts[small] >= min_per_bucket:
            break
        alive.discard(small)
        ratio = math.log(buckets[small][1] / buckets[small][0])
        into = min(alive, key=lambda b: abs(math.log(buckets[b][1] / buckets[b][0]) - ratio))
        assignment = [into if a == small else a for a in assignment]
    return assignment


def crop_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> torch.Tensor:
    """Resize to cover the bucket, centre-crop, -> (3, H, W) in [-1, 1]."""
    return crop_with_geometry(image, bucket)[0]


def crop_with_geometry(image: Image.Image, bucket: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """crop_to_bucket's pixels and SDXL's micro-conditioning of them (SDXL §2.2, diffusers' ``time_ids``):
    (original height, original width, crop top, crop left, target height, target width), the crop's
    corner in the resized image's pixels."""
    h, w = bucket
    image = image.convert("RGB")
    original = (image.height, image.width)
    scale = max(w / image.width, h / image.height)
    size = (max(w, round(image.width * scale)), max(h, round(image.height * scale)))
    image = image.resize(size, Image.BICUBIC)
    left, top = (size[0] - w) // 2, (size[1] - h) // 2
    image = image.crop((left, top, left + w, top + h))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return pixels, (*original, top, left, h, w)


# --- the cache -------------------------------------------------------------------------------------


def build_cache(items: list[CaptionedImage], cache_dir: Path, resolution: int, aspect_ratios: list[float],
                encode_images: Callable[[torch.Tensor], torch.Tensor],
                encode_text: Callable[[list[str]], dict[str, torch.Tensor]], fingerprint: str, min_per_bucket: int,
                batch_size: int = 16, report: ReadReport | None = None, zero_empty: bool = False) -> "LatentCache":
    """Encode every image and caption once into ``cache_dir``; reuse it when ``complete.json`` shows the
    same fingerprint (models + data + resolution). ``encode_text`` gives {"text": ..., and for SDXL
    "pooled": ...}; each is cached, with its encoding of "" (or zeros, ``zero_empty``: SDXL's
    unconditional input) for caption dropout, and every image's ``time_ids`` beside them. Images that
    fail to decode are recorded in the report as unreadable with the error, never silently dropped."""
    from tqdm import tqdm

    keys_hash = hashlib.sha256("\n".join(f"{i.key}\t{i.caption}" for i in items).encode()).hexdigest()[:12]
    # everything the cached tensors and their bucket assignment depend on
    fingerprint = f"{fingerprint}-{resolution}-{sorted(aspect_ratios)}-{min_per_bucket}-{keys_hash}-{zero_empty}-v2"
    marker = cache_dir / "complete.json"
    if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fingerprint:
        return LatentCache(cache_dir)
    report = report or ReadReport(rows=len(items), usable=len(items))

    sizes, readable = [], []
    for item in items:
        try:
            with item.load() as im:
                im.load()  # decode fully now: a truncated file must fail here, not mid-cache
                sizes.append(im.size)
            readable.append(item)
        except Exception as e:  # any decoder error makes the row unusable; keep the reason
            report.unreadable[item.key] = f"{type(e).__name__}: {e}"
    report.usable = len(readable)
    buckets = make_buckets(resolution, aspect_ratios)
    assignment = assign_buckets(sizes, buckets, min_per_bucket) if readable else []

    cache_dir.mkdir(parents=True, exist_ok=True)
    meta = {"fingerprint": fingerprint, "resolution": resolution, "buckets": [], "report": None}
    latent_sq_sum, latent_count = 0.0, 0
    for b in sorted(set(assignment)):
        members = [it for it, a in zip(readable, assignment) if a == b]
        name = f"bucket-{buckets[b][0]}x{buckets[b][1]}"
        lat_chunks, geometry, cond_chunks = [], [], {}
        for start in tqdm(range(0, len(members), batch_size), desc=f"caching {name}", leave=False):
            chunk = members[start:start + batch_size]
            cropped = [crop_with_geometry(it.load(), buckets[b]) for it in chunk]
            latents = encode_images(torch.stack([pixels for pixels, _ in cropped])).float()
            geometry += [g for _, g in cropped]
            latent_sq_sum += float(latents.pow(2).sum())
            latent_count += latents.numel()
            lat_chunks.append(latents.half().numpy())
            for key, value in encode_text([it.caption for it in chunk]).items():
                cond_chunks.setdefault(key, []).append(value.half().cpu().numpy())
        (cache_dir / name).mkdir(exist_ok=True)
        np.save(cache_dir / name / "latents.npy", np.concatenate(lat_chunks))
        np.save(cache_dir / name / "time_ids.npy", np.asarray(geometry, np.float32))
        for key, chunks in cond_chunks.items():
            np.save(cache_dir / name / f"{key}.npy", np.concatenate(chunks))
        (cache_dir / name / "keys.json").write_text(json.dumps([it.key for it in members]))
        meta["buckets"].append({"name": name, "size": list(buckets[b]), "count": len(members)})
    for key, value in encode_text([""]).items():
        empty = value.half().cpu().numpy()[0]
        np.save(cache_dir / f"empty_{key}.npy", np.zeros_like(empty) if zero_empty else empty)
    meta["latent_rms"] = math.sqrt(latent_sq_sum / latent_count) if latent_count else None
    meta["report"] = report.to_dict()
    marker.write_text(json.dumps(meta, indent=1))
    return LatentCache(cache_dir)


class LatentCache:
    """Read side of the cache: per bucket, memory-mapped latents (N, C, h, w), the text conditioning
    (text (N, L, D), for SDXL pooled (N, P)) and time_ids (N, 6); ``empty``: each conditioning of ""."""

    def __init__(self, cache_dir: Path):
        self.dir = Path(cache_dir)
        self.meta = json.loads((self.dir / "complete.json").read_text())
        self.buckets = [b["name"] for b in self.meta["buckets"]]
        self.latents = [np.load(self.dir / n / "latents.npy", mmap_mode="r") for n in self.buckets]
        self.empty = {f.stem[len("empty_"):]: torch.from_numpy(np.load(f).astype(np.float32))
                      for f in sorted(self.dir.glob("empty_*.npy"))}
        self.cond = {key: [np.load(self.dir / n / f"{key}.npy", mmap_mode="r") for n in self.buckets]
                     for key in [*self.empty, "time_ids"]}

    @property
    def sizes(self) -> list[int]:
        return [len(x) for x in self.latents]

    def __len__(self) -> int:
        return sum(self.sizes)

    def gather(self, bucket: int, indices: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Latents and conditioning of ``indices`` in ``bucket`` as float32 tensors."""
        idx = np.asarray(indices)
        return (torch.from_numpy(self.latents[bucket][idx].astype(np.float32)),
                {key: torch.from_numpy(arrays[bucket][idx].astype(np.float32)) for key, arrays in self.cond.items()})


def split_validation(sizes: list[int], val_fraction: float, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Held-out indices per bucket (at least one image overall, never a whole bucket) and the rest."""
    rng = np.random.default_rng(seed)
    total = sum(sizes)
    n_val = max(1, round(total * val_fraction))
    flat = [(b, i) for b, n in enumerate(sizes) for i in range(n)]
    chosen = set()
    for k in rng.permutation(total):
        b, i = flat[k]
        if len(chosen) >= n_val:
            break
        if sum(1 for (bb, _) in chosen if bb == b) < sizes[b] - 1:
            chosen.add((b, i))
    val = [[i for i in range(n) if (b, i) in chosen] for b, n in enumerate(sizes)]
    train = [[i for i in range(n) if (b, i) not in chosen] for b, n in enumerate(sizes)]
    return train, val


def bucket_weights(sizes: list[int], alpha: float, max_repeat_ratio: float | None) -> list[float]:
    """The share of draws of each bucket: ∝ size^alpha (0 = every bucket equally, Playground v2.5 §3.2's
    balance; 1 = in proportion to size, every image equally), then, with ``max_repeat_ratio`` r, no
    bucket's images are drawn more than r times as often as the average image: a share above
    r x size / total is cut to it and the surplus spread over the other buckets by their weights (water
    filling; r >= 1 always has a solution, since the proportional shares meet it)."""
    total = sum(sizes)
    base = [n**alpha for n in sizes]
    shares = [b / sum(base) for b in base]
    if max_repeat_ratio is None:
        return shares
    caps = [max_repeat_ratio * n / total for n in sizes]
    fixed: set[int] = set()
    while True:
        over = [b for b in range(len(sizes)) if b not in fixed and shares[b] > caps[b] + 1e-12]
        if not over:
            return shares
        fixed.update(over)
        free = [b for b in range(len(sizes)) if b not in fixed]
        left = 1.0 - sum(caps[b] for b in fixed)
        shares = [caps[b] if b in fixed else left * base[b] / sum(base[f] for f in free) for b in range(len(sizes))]


class BalancedBucketSampler:
    """Batches drawn from one bucket at a time, each bucket with a share of the draws ∝ size^alpha, capped
    so no image repeats more than ``max_repeat_ratio`` times the average (``bucket_weights``).

    Why not Playground v2.5 §3.2's plain equal draw (alpha = 0, no cap; still the class default)? In a
    curated set the buckets are very unequal: in a 2,000-image set of buckets 1500/300/150/30/20 it shows
    each image of the 20-image bucket 20.0x as often as the average image and 75x as often as a square
    one (counted over 50 rounds of draws: tests/model/test_review_fixes.py), so those few images are
    memorised. The config's default (``data.bucket_weight_alpha`` 0.5, ``data.max_repeat_ratio`` 4)
    measures 4.0x the average and 5.9x a square image there (the cap holds to the 1/4096 rounding of the
    shares), while the two smallest buckets still get 4x their proportional share of the draws, so the
    rare aspect ratios stay represented. alpha = 1 would show every image equally (1.0x) but give the
    20-image bucket only 1% of the draws.

    Deterministic in (seed, draw): the draws come in rounds of ``sum(slots)`` draws in which bucket b
    has ``slots[b]`` (its share of the round, at least 1, divided by the counts' gcd: equal shares give
    rounds of one visit per bucket) in a seeded random order, and the j-th visit to bucket b takes the
    next ``batch_size`` items of b's stream of seeded permutations (a fresh permutation per pass over
    b). So ``batch(draw)`` needs no state, and a resumed run sees exactly the batches the uninterrupted
    run would have.
    """

    ROUND = 4096  # draws per round before the gcd reduction: shares resolved to ~1/4096

    def __init__(self, members: list[list[int]], batch_size: int, seed: int, alpha: float = 0.0,
                 max_repeat_ratio: float | None = None):
        self.members = [m for m in members]
        self.active = [b for b, m in enumerate(members) if m]
        if not self.active:
            raise DataError("no training images in any bucket")
        self.batch_size = batch_size
        self.seed = seed
        shares = bucket_weights([len(members[b]) for b in self.active], alpha, max_repeat_ratio)
        slots = [max(1, round(w * self.ROUND)) for w in shares]
        divisor = math.gcd(*slots)
        self.slots = [c // divisor for c in slots]
        self.round_length = sum(self.slots)
        self._slot_bucket = np.repeat(np.arange(len(self.active)), self.slots)

    def repeat_ratios(self) -> list[float]:
        """Per active bucket: how often each of its images is drawn relative to the average image."""
        total = sum(len(self.members[b]) for b in self.active)
        return [c / self.round_length * total / len(self.members[b]) for b, c in zip(self.active, self.slots)]

    @functools.lru_cache(maxsize=4)
    def _round_order(self, rnd: int) -> np.ndarray:
        """The active-bucket index of each draw of round ``rnd`` (a pure function, cached for speed)."""
        return self._slot_bucket[np.random.default_rng([self.seed, 0, rnd]).permutation(self.round_length)]

    @functools.lru_cache(maxsize=16)
    def _permutation(self, bucket: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 1, bucket, epoch]).permutation(len(self.members[bucket]))

    def _visit(self, draw: int) -> tuple[int, int]:
        """(index into ``active``, how many earlier draws visited that bucket)."""
        rnd, pos = divmod(draw, self.round_length)
        order = self._round_order(rnd)
        k = int(order[pos])
        return k, rnd * self.slots[k] + int(np.count_nonzero(order[:pos] == k))

    def bucket_of(self, draw: int) -> int:
        return self.active[self._visit(draw)[0]]

    def batch(self, draw: int) -> tuple[int, list[int]]:
        k, visit = self._visit(draw)
        bucket = self.active[k]
        members = self.members[bucket]
        n = len(members)
        out = []
        for pos in range(visit * self.batch_size, (visit + 1) * self.batch_size):
            epoch, offset = divmod(pos, n)
            out.append(members[self._permutation(bucket, epoch)[offset]])
        return bucket, out
