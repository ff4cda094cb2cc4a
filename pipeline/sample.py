"""The embedded sample: a few hundred image-text pairs with controlled defects, built from real photos.

Every filter needs something to catch, and a demo needs data a fresh clone already has. The photos
bundled inside scikit-image (installed with the project, no download) are varied real images; this
module turns them into a folder of JPEG/PNG files plus ``captions.jsonl`` (the imagefolder layout
``pipeline.ingest`` reads), where each row records the defect it carries:

=====================  ==========================================================================
``defect``             what was done (to a clean variant of one base photo)
=====================  ==========================================================================
clean                  random crop (60-100 % per side, aspect <= 2), maybe mirrored, longest side
                       384-640 px, with the photo's descriptive caption
overlay_text           7-10 real English words (an advert, a meme, a watermark) drawn over the photo
                       at 14-72 px, wrapped over lines (``overlay_text`` field)
extreme_aspect         a strip with aspect ratio 3.5-6
tiny                   longest side 40-100 px
blur                   Gaussian blur, radius 4-8 px
low_contrast           contrast cut to 15-30 % and washed towards white
mismatched_caption     a clean image with the caption of another base photo (``caption_of``)
exact_duplicate        a byte-identical copy of a clean file (``duplicate_of``)
near_duplicate         a clean file slightly resized, brightness-shifted and re-encoded (``duplicate_of``)
=====================  ==========================================================================

Every row also has ``base`` (the photo it comes from) and ``likes`` (a heavy-tailed engagement
count, like a social site's). At least half the rows are clean. Copies always come after the file
they copy, so ingest (first occurrence wins) keeps the original. All other rows are drawn at least
16 pHash bits apart, so a near-duplicate filter finds exactly the ``near_duplicate`` rows. The same
``seed`` gives the same bytes.

Base photos (from ``skimage.data``; licences as stated in each loader's docstring):

- ``astronaut``: Eileen Collins, NASA portrait. Public domain (NASA).
- ``chelsea``: Chelsea the cat, by Stefan van der Walt. CC0.
- ``coffee``: a cup of espresso, by Rachel Michetti (Pikolo Espresso Bar). CC0.
- ``rocket``: DSCOVR on Falcon 9 at Cape Canaveral, by SpaceX. Public domain.
- ``hubble_deep_field``: the Hubble eXtreme Deep Field, NASA. Public domain.
- ``retina``: fundus photograph of a human retina, by Mikael Häggström. CC0.
- ``camera``: a man with a film camera on a tripod, by Lav Varshney. CC0 (grey-scale).
- ``immunohistochemistry``: IHC-stained colonic glands, CMMI. No known copyright restrictions.

(``stereo_motorcycle`` is left out: its docstring states no licence.)
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

from pipeline.errors import UserError


@dataclass(frozen=True)
class BasePhoto:
    name: str  # the skimage.data loader
    caption: str
    licence: str


BASE_PHOTOS: tuple[BasePhoto, ...] = (
    BasePhoto(
        "astronaut",
        "a smiling astronaut in an orange flight suit holding a white helmet, an American flag and a space shuttle model behind her",
        "public domain (NASA)",
    ),
    BasePhoto("chelsea", "close-up of a tabby cat with green eyes looking to the side", "CC0 (Stefan van der Walt)"),
    BasePhoto(
        "coffee",
        "a red cup of espresso with crema on a red saucer with a spoon, on a wooden table",
        "CC0 (Rachel Michetti)",
    ),
    BasePhoto(
        "rocket",
        "a rocket on its launch pad at dusk, lit by floodlights between tall lightning towers",
        "public domain (SpaceX)",
    ),
    BasePhoto(
        "hubble_deep_field",
        "thousands of colourful distant galaxies scattered across the black of deep space",
        "public domain (NASA)",
    ),
    BasePhoto(
        "retina",
        "a fundus photograph of a human retina, orange-red with branching blood vessels and a bright optic disc",
        "CC0 (Mikael Häggström)",
    ),
    BasePhoto(
        "camera",
        "a black and white photo of a man in a dark coat looking through a camera on a tripod in a field",
        "CC0 (Lav Varshney)",
    ),
    BasePhoto(
        "immunohistochemistry",
        "a microscope image of stained tissue, brown glands surrounded by pale blue cells",
        "no known copyright restrictions (CMMI)",
    ),
)

# Share of rows per defect; the rest (>= 50 %) are clean.
DEFECT_SHARES: dict[str, float] = {
    "overlay_text": 0.07,
    "extreme_aspect": 0.05,
    "tiny": 0.05,
    "blur": 0.05,
    "low_contrast": 0.05,
    "mismatched_caption": 0.06,
    "exact_duplicate": 0.06,
    "near_duplicate": 0.06,
}
DEFECTS: tuple[str, ...] = ("clean", *DEFECT_SHARES)
_COPIES = ("exact_duplicate", "near_duplicate")

# Short real phrases, as a watermark, a meme or an advert would carry: OCR should read them as words.
# Overlaid text as adverts, memes and watermarks carry it: 7-10 words, more than the OCR word-count
# filter's default of 5 (a photo's own scene text, a sign or a shirt, is mostly 1-4 words).
OVERLAY_PHRASES: tuple[str, ...] = (
    "GRAND OPENING SALE THIS WEEKEND ONLY AT OUR STORE",
    "FREE SHIPPING ON ALL ORDERS OVER FIFTY DOLLARS",
    "BEST PRICE GUARANTEED OR YOUR MONEY BACK",
    "SUBSCRIBE FOR MORE VIDEOS LIKE THIS ONE",
    "LIMITED TIME OFFER ENDS SUNDAY AT MIDNIGHT",
    "Happy Birthday Mom we love you so much",
    "WORLD NEWS TONIGHT LIVE AT SIX ON CHANNEL NINE",
    "Click here to learn more about this amazing deal",
    "Summer Holiday Deals up to half price on flights",
    "Photo by John Smith all rights reserved do not copy",
)
OVERLAY_FONT_SIZES = (14, 20, 28, 40, 56, 72)  # px: small watermark text up to a headline

# Two variants of one photo must differ by this many of the 64 pHash bits (selection groups near
# duplicates within 6 by default): a clean row should never look like a copy of another row.
MIN_DISTINCT_BITS = 16
MAX_TRIES = 30

MIN_SAMPLE_ROWS = 20  # below this not every defect gets a row
CAPTIONS_FILE = "captions.jsonl"


def _load_base(name: str) -> Image.Image:
    import skimage.data

    pixels = getattr(skimage.data, name)()
    return Image.fromarray(pixels).convert("RGB")


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


def _resize_longest(image: Image.Image, longest: int) -> Image.Image:
    scale = longest / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def _clean_variant(base: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random crop (60-100 % per side, aspect <= 2), maybe mirrored, longest side 384-640 px."""
    while True:
        width = round(base.width * _uniform(rng, 0.6, 1.0))
        height = round(base.height * _uniform(rng, 0.6, 1.0))
        if max(width / height, height / width) <= 2.0:
            break
    left = int(rng.integers(0, base.width - width + 1))
    top = int(rng.integers(0, base.height - height + 1))
    image = base.crop((left, top, left + width, top + height))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _resize_longest(image, int(rng.integers(384, 641)))


def _wrap(draw: ImageDraw.ImageDraw, phrase: str, font, stroke: int, width: float) -> list[str]:
    """Greedy line breaking: as many words per line as fit in ``width`` pixels."""
    lines: list[str] = []
    for word in phrase.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        left, _, right, _ = draw.textbbox((0, 0), candidate, font=font, stroke_width=stroke)
        if lines and right - left <= width:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines


def _overlay_text(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, str, int]:
    phrase = OVERLAY_PHRASES[int(rng.integers(len(OVERLAY_PHRASES)))]
    size = int(OVERLAY_FONT_SIZES[int(rng.integers(len(OVERLAY_FONT_SIZES)))])
    draw = ImageDraw.Draw(image)
    while True:  # wrap over lines across the image; shrink until the block fits in half its height
        font = ImageFont.load_default(size=size)  # Pillow's bundled TrueType font (FreeType), no system fonts needed
        stroke = max(1, size // 14)
        text = "\n".join(_wrap(draw, phrase, font, stroke, image.width * 0.95))
        left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font, stroke_width=stroke, align="center")
        if (right - left <= image.width * 0.95 and bottom - top <= image.height * 0.5) or size <= 10:
            break
        size = int(size * 0.8)
    x = int(rng.integers(0, max(1, image.width - (right - left)) + 1)) - left
    y = int(rng.integers(0, max(1, image.height - (bottom - top)) + 1)) - top
    # white glyphs with a black outline, as memes and adverts do: legible on any background
    draw.multiline_text((x, y), text, font=font, fill=(255, 255, 255), stroke_width=stroke, stroke_fill=(0, 0, 0),
                        align="center")
    return image, phrase, size


def _extreme_strip(base: Image.Image, rng: np.random.Generator) -> Image.Image:
    ratio = _uniform(rng, 3.5, 6.0)
    if rng.random() < 0.5:  # a horizontal banner
        width, height = base.width, max(1, round(base.width / ratio))
    else:  # a vertical strip
        width, height = max(1, round(base.height / ratio)), base.height
    left = int(rng.integers(0, base.width - width + 1))
    top = int(rng.integers(0, base.height - height + 1))
    return _resize_longest(base.crop((left, top, left + width, top + height)), int(rng.integers(480, 769)))


def _washed_out(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    flat = ImageEnhance.Contrast(image).enhance(_uniform(rng, 0.15, 0.3))
    return Image.blend(flat, Image.new("RGB", image.size, (235, 235, 235)), _uniform(rng, 0.2, 0.4))


def _distinct_variant(
    base: Image.Image, defect: str, rng: np.random.Generator, seen: list[imagehash.ImageHash]
) -> Image.Image:
    """A crop of ``base`` whose pHash is at least MIN_DISTINCT_BITS from every earlier crop of it (the
    best of MAX_TRIES otherwise), so only the rows marked as near duplicates are near duplicates."""
    best, best_distance, best_hash = None, -1, None
    for _ in range(MAX_TRIES):
        image = _extreme_strip(base, rng) if defect == "extreme_aspect" else _clean_variant(base, rng)
        digest = imagehash.phash(image)
        distance = min((digest - other for other in seen), default=64)
        if distance > best_distance:
            best, best_distance, best_hash = image, distance, digest
        if distance >= MIN_DISTINCT_BITS:
            break
    seen.append(best_hash)
    return best


def _near_copy(data: bytes, rng: np.random.Generator) -> bytes:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    scale = _uniform(rng, 0.85, 0.97)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    image = ImageEnhance.Brightness(image).enhance(_uniform(rng, 0.9, 1.1))
    return _encode(image, "JPEG", int(rng.integers(70, 86)))


def _encode(image: Image.Image, fmt: str, quality: int) -> bytes:
    out = io.BytesIO()
    if fmt == "PNG":
        image.save(out, "PNG")
    else:
        image.save(out, "JPEG", quality=quality)
    return out.getvalue()


class SampleError(UserError, ValueError):
    """A sample that cannot be made as asked (too few rows, a folder holding other files)."""


def defect_counts(n: int) -> dict[str, int]:
    """Rows per defect for a sample of ``n`` rows (every defect at least once)."""
    if n < MIN_SAMPLE_ROWS:
        raise SampleError(f"a sample needs at least {MIN_SAMPLE_ROWS} rows so every defect appears; got n={n}")
    counts = {defect: max(1, round(n * share)) for defect, share in DEFECT_SHARES.items()}
    return {"clean": n - sum(counts.values()), **counts}


def _plan(n: int, rng: np.random.Generator) -> list[dict]:
    """Row specs in file order: originals shuffled, each copy placed somewhere after what it copies."""
    counts = defect_counts(n)
    rows = [{"defect": d} for d, c in counts.items() if d not in _COPIES for _ in range(c)]
    for row in rows:
        row["base"] = int(rng.integers(len(BASE_PHOTOS)))
    order = [rows[i] for i in rng.permutation(len(rows))]
    clean = [row for row in order if row["defect"] == "clean"]
    for defect in _COPIES:
        for _ in range(counts[defect]):
            original = clean[int(rng.integers(len(clean)))]
            position = next(i for i, row in enumerate(order) if row is original)  # identity: specs can be equal
            order.insert(int(rng.integers(position + 1, len(order) + 1)), {"defect": defect, "copies": original})
    return order


def _prepare(out_dir: Path) -> None:
    """Create ``out_dir``, or clear a previous sample there. Anything else in it is left alone: refuse."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way, no permission
        raise SampleError(f"{out_dir}: cannot create the sample folder ({exc.strerror or exc})") from exc
    captions = out_dir / CAPTIONS_FILE
    previous: list[str] = []
    if captions.exists():
        previous = [json.loads(line)["file_name"] for line in captions.read_text().splitlines() if line.strip()]
    known = set(previous) | {CAPTIONS_FILE}
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in known)
    if foreign:
        raise SampleError(f"{out_dir} holds files that are not a sample ({', '.join(foreign[:5])}); use an empty folder")
    for name in previous:
        (out_dir / name).unlink(missing_ok=True)
    captions.unlink(missing_ok=True)


def generate_sample(out_dir: Path, n: int = 300, seed: int = 0) -> Path:
    """Write ``n`` images and ``captions.jsonl`` into ``out_dir`` (see the module docstring); returns it."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    plan = _plan(n, rng)
    _prepare(out_dir)
    bases = [_load_base(photo.name) for photo in BASE_PHOTOS]
    records: list[dict] = []
    written: dict[int, tuple[bytes, dict]] = {}  # id(spec) -> (bytes, record) of clean rows, for copies
    seen: list[list[imagehash.ImageHash]] = [[] for _ in BASE_PHOTOS]  # pHashes of each base's variants so far
    for index, spec in enumerate(plan):
        defect = spec["defect"]
        record: dict = {"defect": defect}
        fmt, quality = "JPEG", int(rng.integers(85, 96))
        if defect in _COPIES:
            original_bytes, original = written[id(spec["copies"])]
            base = BASE_PHOTOS[[p.name for p in BASE_PHOTOS].index(original["base"])]
            record.update(base=base.name, duplicate_of=original["file_name"])
            data = original_bytes if defect == "exact_duplicate" else _near_copy(original_bytes, rng)
            suffix = Path(original["file_name"]).suffix if defect == "exact_duplicate" else ".jpg"
            caption = original["text"]
        else:
            base = BASE_PHOTOS[spec["base"]]
            record["base"] = base.name
            caption = base.caption
            image = _distinct_variant(bases[spec["base"]], defect, rng, seen[spec["base"]])
            if defect == "overlay_text":
                image, phrase, size = _overlay_text(image, rng)
                record.update(overlay_text=phrase, overlay_font_px=size)
            elif defect == "tiny":
                image = _resize_longest(image, int(rng.integers(40, 101)))
            elif defect == "blur":
                image = image.filter(ImageFilter.GaussianBlur(_uniform(rng, 4.0, 8.0)))
            elif defect == "low_contrast":
                image = _washed_out(image, rng)
            elif defect == "mismatched_caption":
                other = (spec["base"] + 1 + int(rng.integers(len(BASE_PHOTOS) - 1))) % len(BASE_PHOTOS)
                caption = BASE_PHOTOS[other].caption
                record["caption_of"] = BASE_PHOTOS[other].name
            elif defect == "clean" and rng.random() < 0.1:
                fmt = "PNG"  # real sources mix formats
            data = _encode(image, fmt, quality)
            suffix = ".png" if fmt == "PNG" else ".jpg"
        record["file_name"] = f"{index:04d}{suffix}"
        record["text"] = caption
        record["likes"] = int(rng.lognormal(3.0, 1.2))
        (out_dir / record["file_name"]).write_bytes(data)
        if defect == "clean":
            written[id(spec)] = (data, record)
        records.append(record)
    ordered = [{"file_name": r.pop("file_name"), "text": r.pop("text"), **r} for r in records]
    (out_dir / CAPTIONS_FILE).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
    return out_dir
