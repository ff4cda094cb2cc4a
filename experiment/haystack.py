"""A synthetic photogenic haystack: images whose quality we know, because we planted every defect.

Each image is one to three vivid objects (ball, box, tent, diamond) of one colour on a soft two-tone
background, captioned from a small grammar ("two red balls at the top left"). Its quality q is the mean of
five parts, the specialist round's criteria (Emu §3.3; annotation/rounds/specialist.xml) made measurable:

==================  =============================================================  =====================
part                what lowers it (a planted defect, strength 0-1)                the specialist rating
==================  =============================================================  =====================
composition         the subject's centroid off its rule-of-thirds point            composition
exposure            a gain that clips highlights or crushes shadows                lighting
colour_contrast     colours washed out towards grey (saturation and contrast cut)  color_contrast
subject_background  a cluttered background (noise blotches) or a blurred image     subject_background
flaws               overlaid text, 8x8 blocking                                    (could_be_better)
==================  =============================================================  =====================

Every part is 1 - the strength of its defect (composition: 1 - offset/0.25 of the image side, see
:func:`composition_part`), so q falls when any defect grows and the others stay fixed. The haystack is
mostly mediocre: each defect is planted with probability ``defect_rate`` at a strength drawn from
U(0.2, 1), and the offset from U(0, 0.3), so images with q near 1 are rare needles.

``make_haystack`` writes what the pipeline ingests as-is (``pipeline.ingest``: a folder of images with a
``captions.jsonl`` of ``file_name``/``text``, the shape of ``python -m pipeline sample``) and
``truth.parquet``: per ``file_name`` q, each part, the caption's attributes (object, colour, position,
count) and the planted strengths (``defect_<name>``).
The same seed gives the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from pipeline.errors import UserError

CAPTIONS_FILE = "captions.jsonl"
TRUTH_FILE = "truth.parquet"

#: colour name -> RGB of the object (saturated, distinct hues: the caption check reads the hue back)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "orange": (240, 130, 10), "yellow": (235, 215, 20),
    "green": (30, 170, 40), "blue": (30, 70, 220), "purple": (150, 40, 200),
}
OBJECTS = ("ball", "box", "tent", "diamond")
#: position name -> the rule-of-thirds point (x, y as fractions of the side) the subject belongs at
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (1 / 3, 1 / 3), "top right": (2 / 3, 1 / 3),
    "bottom left": (1 / 3, 2 / 3), "bottom right": (2 / 3, 2 / 3),
}
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
PARTS = ("composition", "exposure", "colour_contrast", "subject_background", "flaws")
DEFECTS = ("offset", "exposure", "washout", "clutter", "blur", "text", "blocking")
#: how far (fraction of the side) the subject may sit from its thirds point before composition is 0
MAX_OFFSET = 0.25
#: muted background tones (top, bottom) of the two-tone gradient: low saturation, so the subject stands out
BACKGROUNDS = (((200, 215, 230), (150, 170, 190)), ((225, 215, 195), (175, 160, 140)),
               ((205, 225, 205), (150, 175, 150)), ((220, 220, 220), (165, 165, 170)))


class HaystackError(UserError, ValueError):
    """The haystack cannot be made as asked (a bad count or size)."""


@dataclass(frozen=True)
class Scene:
    """Everything that fixes one image: the caption's attributes and the planted defect strengths."""

    object: str
    colour: str
    position: str
    count: int
    background: int
    dx: float  # subject offset from its thirds point, fractions of the side
    dy: float
    exposure: float = 0.0  # 0-1; the sign of the gain is exposure_sign
    exposure_sign: int = 1  # +1 over-exposed (highlights clip), -1 under-exposed (shadows crush)
    washout: float = 0.0
    clutter: float = 0.0
    blur: float = 0.0
    text: float = 0.0
    blocking: float = 0.0
    noise_seed: int = 0
    extras: dict = field(default_factory=dict)

    @property
    def offset(self) -> float:
        return float(np.hypot(self.dx, self.dy))

    @property
    def caption(self) -> str:
        noun = self.object + ("es" if self.object.endswith("x") else "s") if self.count > 1 else self.object
        article = COUNT_WORDS[self.count]
        if self.count == 1 and self.colour[0] in "aeiou":
            article = "an"
        return f"{article} {self.colour} {noun} at the {self.position}"


def composition_part(offset: float) -> float:
    return float(max(0.0, 1.0 - offset / MAX_OFFSET))


def parts_of(scene: Scene) -> dict[str, float]:
    """The true parts of q from the planted strengths (each 1 - its defect)."""
    return {
        "composition": composition_part(scene.offset),
        "exposure": 1.0 - scene.exposure,
        "colour_contrast": 1.0 - scene.washout,
        "subject_background": 1.0 - max(scene.clutter, scene.blur),
        "flaws": 1.0 - max(scene.text, scene.blocking),
    }


def true_q(scene: Scene) -> float:
    parts = parts_of(scene)
    return float(sum(parts.values()) / len(parts))


# --- drawing --------------------------------------------------------------------------------------


def _shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill) -> None:
    if kind == "ball":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "box":
        draw.rectangle((cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85), fill=fill)
    elif kind == "tent":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    else:  # diamond
        draw.polygon([(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)], fill=fill)


def subject_layout(scene: Scene, size: int) -> list[tuple[float, float, float]]:
    """(cx, cy, r) in pixels of each object: a small cluster whose centroid is the thirds point plus the
    offset (the objects sit side by side, so their mean is exactly that point)."""
    tx, ty = POSITIONS[scene.position]
    cx, cy = (tx + scene.dx) * size, (ty + scene.dy) * size
    r = size * (0.13 if scene.count == 1 else 0.085)
    step = 2.3 * r
    xs = [cx + (i - (scene.count - 1) / 2) * step for i in range(scene.count)]
    return [(x, cy, r) for x in xs]


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The image of a scene: drawn at 4x and downsampled (anti-aliased, sharp at ``size``), then the
    defects applied in the order a camera and a re-upload would: exposure, washout, blur, text, blocking."""
    big = size * 4
    rng = np.random.default_rng(scene.noise_seed)
    top, bottom = (np.array(c, np.float32) for c in BACKGROUNDS[scene.background])
    t = np.linspace(0.0, 1.0, big, dtype=np.float32)[:, None, None]
    canvas = np.broadcast_to(top * (1 - t) + bottom * t, (big, big, 3)).copy()
    if scene.clutter:  # blotchy, multi-coloured texture behind the subject: a busy background
        coarse = rng.uniform(-1, 1, (12, 12, 3)).astype(np.float32)
        texture = np.asarray(Image.fromarray(((coarse + 1) * 127.5).astype(np.uint8)).resize((big, big), Image.NEAREST),
                             np.float32) / 127.5 - 1
        fine = rng.uniform(-1, 1, (big // 4, big // 4, 3)).astype(np.float32).repeat(4, 0).repeat(4, 1)
        canvas += scene.clutter * (50 * texture + 30 * fine)
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for cx, cy, r in subject_layout(scene, big):
        _shape(draw, scene.object, cx, cy, r, COLOURS[scene.colour])
    image = image.resize((size, size), Image.LANCZOS)
    x = np.asarray(image, np.float32) / 255.0
    if scene.washout:  # towards the image's mean grey: saturation and contrast both fall
        grey = x.mean(axis=2, keepdims=True)
        x = (1 - scene.washout) * x + scene.washout * (0.75 * grey.mean() + 0.25 * grey)
    if scene.exposure:  # a gain (over) or a gain towards black (under); what leaves [0, 1] is clipped
        gain = 1.0 + 2.2 * scene.exposure if scene.exposure_sign > 0 else 1.0 / (1.0 + 3.0 * scene.exposure)
        x = x * gain
    image = Image.fromarray((np.clip(x, 0, 1) * 255).round().astype(np.uint8))
    if scene.blur:
        image = image.filter(ImageFilter.GaussianBlur(radius=0.3 + 2.2 * scene.blur * size / 64))
    if scene.text:
        image = _overlay_text(image, scene.text, rng)
    if scene.blocking:
        image = _blocking(image, scene.blocking)
    return image


def _blocking(image: Image.Image, strength: float) -> Image.Image:
    """The 8x8 blocks a heavy re-encode leaves (JPEG keeps little more than each block's DC term at its
    lowest qualities): a blend of the image with its 8x8 block means, 0.85 x ``strength`` of the way (a
    full mosaic would read as sharp edges again). A real
    JPEG's artefacts do not grow monotonically with its quality setting at 64 px, which a defect here must."""
    x = np.asarray(image, np.float32)
    h, w = (x.shape[0] // 8) * 8, (x.shape[1] // 8) * 8
    blocks = x[:h, :w].reshape(h // 8, 8, w // 8, 8, 3).mean(axis=(1, 3))
    means = x.copy()
    means[:h, :w] = blocks.repeat(8, 0).repeat(8, 1)
    mix = 0.85 * strength
    return Image.fromarray(np.clip((1 - mix) * x + mix * means, 0, 255).round().astype(np.uint8))


def _overlay_text(image: Image.Image, strength: float, rng: np.random.Generator) -> Image.Image:
    """White capitals with a black outline across the image; ``strength`` sets how many lines (1-3)."""
    size = image.width
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(8, size // 6))
    lines = 1 + int(round(2 * strength))
    letters = "ABCDEFGHKMNPRSTUWXYZ"
    for i in range(lines):
        word = "".join(rng.choice(list(letters), size=8))
        y = (i + 0.3) * size / (lines + 0.3)
        draw.text((size * 0.04, y), word, fill=(255, 255, 255), font=font, stroke_width=1, stroke_fill=(0, 0, 0))
    return image


# --- the haystack ---------------------------------------------------------------------------------


def draw_scene(rng: np.random.Generator, defect_rate: float = 0.35) -> Scene:
    """One random scene: uniform attributes; each defect planted with probability ``defect_rate`` at
    U(0.2, 1); the subject offset uniform in a disc of radius 0.3 of the side around its thirds point."""
    angle, radius = rng.uniform(0, 2 * np.pi), 0.3 * np.sqrt(rng.uniform())
    strengths = {d: (float(rng.uniform(0.2, 1.0)) if rng.uniform() < defect_rate else 0.0)
                 for d in ("exposure", "washout", "clutter", "blur", "text", "blocking")}
    return Scene(object=str(rng.choice(OBJECTS)), colour=str(rng.choice(list(COLOURS))),
                 position=str(rng.choice(list(POSITIONS))), count=int(rng.choice([1, 1, 2, 3])),
                 background=int(rng.integers(len(BACKGROUNDS))),
                 dx=float(np.clip(radius * np.cos(angle), -0.12, 0.12)),
                 dy=float(np.clip(radius * np.sin(angle), -0.12, 0.12)),
                 exposure_sign=int(rng.choice([-1, 1])), noise_seed=int(rng.integers(2**31)), **strengths)


def truth_row(file_name: str, scene: Scene) -> dict:
    """One row of truth.parquet: q, its parts, the caption and its attributes, and the planted defects as
    ``defect_<name>`` (``defect_exposure`` is the strength; the ``exposure`` column is the part of q)."""
    attributes = {k: v for k, v in asdict(scene).items() if k not in DEFECTS and k != "extras"}
    defects = {f"defect_{d}": scene.offset if d == "offset" else getattr(scene, d) for d in DEFECTS}
    return {"file_name": file_name, "q": true_q(scene), **parts_of(scene), "caption": scene.caption,
            **attributes, **defects}


def _render_to(job: tuple[Scene, int, Path]) -> None:
    scene, size, path = job
    render(scene, size).save(path, format="PNG")


def make_haystack(out: Path, count: int, seed: int, size: int = 64, defect_rate: float = 0.35,
                  workers: int = 1) -> Path:
    """Write ``count`` images (PNG, ``size`` px square) + ``captions.jsonl`` + ``truth.parquet`` into
    ``out``; returns ``out``. Deterministic in ``seed`` (the scenes are drawn in order from one generator;
    ``workers`` > 1 only renders them in parallel processes)."""
    if count < 1:
        raise HaystackError(f"count must be >= 1, got {count}")
    if size < 32:
        raise HaystackError(f"size must be >= 32 px (the objects and text need room), got {size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scenes = [draw_scene(rng, defect_rate) for _ in range(count)]
    names = [f"{i:06d}.png" for i in range(count)]
    jobs = [(scene, size, out / name) for scene, name in zip(scenes, names)]
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_render_to, jobs, chunksize=64))
    else:
        for job in jobs:
            _render_to(job)
    rows = [truth_row(name, scene) for name, scene in zip(names, scenes)]
    captions = [json.dumps({"file_name": name, "text": scene.caption}) + "\n" for name, scene in zip(names, scenes)]
    (out / CAPTIONS_FILE).write_text("".join(captions))
    pq.write_table(pa.Table.from_pylist(rows), out / TRUTH_FILE)
    return out


def read_truth(haystack: Path) -> pa.Table:
    path = Path(haystack) / TRUTH_FILE
    if not path.is_file():
        raise HaystackError(f"{path} does not exist: make the haystack first (python -m experiment haystack)")
    return pq.read_table(path)
