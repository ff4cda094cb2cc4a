"""The q-estimator: the haystack's five parts of quality measured from pixels, on ANY image (a haystack
image or a generation), and the caption checks (colour, position, count of the drawn object).

Nothing here reads the truth table: a generated image is judged exactly as a haystack image is, so the
estimator's agreement with the planted q on the haystack (``python -m experiment calibrate``) is what
licenses it as a judge of the generations.

- the subject: the pixels of the dominant saturated hue (saturation > 0.35; hue within 25° of the
  saturation-weighted hue mode), its objects the connected components of that mask;
- composition: :func:`experiment.haystack.composition_part` of the subject's centroid's distance to the
  nearest rule-of-thirds point;
- exposure: highlights clipped to white, and a mean luminance far from mid-grey (log2 ratio);
- colour_contrast: Hasler and Süsstrunk's colourfulness M (2003, "Measuring colourfulness in natural
  images", eq. 2) and RMS contrast, each against a clean-photo level;
- subject_background: the sharpness of the subject's edges (steepest step of the colour distance from the
  background, relative to the step's height: ~1 px wide when sharp) and the clutter of the background
  (its residual after removing the vertical gradient);
- flaws: overlaid text (white strokes against black outlines within 3 px) and 8x8 blocking (the jump
  across 8-px block boundaries against the jumps inside blocks).

Every part is clipped to [0, 1]; q is their mean, as in the haystack. The reference levels were set on
the haystack's own clean and defective renders at 64 px (``python -m experiment calibrate`` prints how
each part follows its planted defect).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from experiment.haystack import COLOURS, PARTS, POSITIONS, composition_part

MIN_SUBJECT_PIXELS = 6  # at 64 px: a ball of radius ~1.4 px; below it there is no subject to judge
SAT_MIN, HUE_WINDOW = 0.35, 25.0


def _hsv(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in degrees, saturation and value of float RGB in [0, 1]."""
    hsv = np.asarray(Image.fromarray((x * 255).round().astype(np.uint8)).convert("HSV"), np.float32) / 255.0
    return hsv[..., 0] * 360.0, hsv[..., 1], hsv[..., 2]


def _hue_distance(a, b):
    d = np.abs(np.asarray(a) - b) % 360.0
    return np.minimum(d, 360.0 - d)


def colour_hues() -> dict[str, float]:
    return {name: float(_hsv(np.array([[rgb]], np.float32) / 255.0)[0][0, 0]) for name, rgb in COLOURS.items()}


@dataclass
class Subject:
    mask: np.ndarray  # bool (H, W)
    hue: float | None  # the dominant hue, degrees
    centroid: tuple[float, float] | None  # (x, y) as fractions of width and height
    components: int


def find_subject(x: np.ndarray) -> Subject:
    hue, sat, val = _hsv(x)
    candidate = (sat > SAT_MIN) & (val > 0.2)
    if candidate.sum() < MIN_SUBJECT_PIXELS:
        return Subject(np.zeros(hue.shape, bool), None, None, 0)
    hist, edges = np.histogram(hue[candidate], bins=36, range=(0, 360), weights=sat[candidate])
    hist = hist + 0.5 * (np.roll(hist, 1) + np.roll(hist, -1))  # a hue on a bin edge still wins
    mode = float(edges[np.argmax(hist)] + 5.0)
    mask = candidate & (_hue_distance(hue, mode) <= HUE_WINDOW)
    if mask.sum() < MIN_SUBJECT_PIXELS:
        return Subject(np.zeros(hue.shape, bool), None, None, 0)
    labels, n = ndimage.label(mask)
    areas = ndimage.sum(mask, labels, range(1, n + 1))
    # objects: components of at least a quarter of the largest one (specks of noise are not objects)
    keep = [i + 1 for i, a in enumerate(areas) if a >= max(MIN_SUBJECT_PIXELS / 2, 0.25 * areas.max())]
    mask = np.isin(labels, keep)
    if mask.sum() < MIN_SUBJECT_PIXELS:  # only specks: no object
        return Subject(np.zeros(hue.shape, bool), None, None, 0)
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    mean_hue = float(np.degrees(np.arctan2(np.sin(np.radians(hue[mask])).mean(), np.cos(np.radians(hue[mask])).mean())) % 360)
    return Subject(mask, mean_hue, ((xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h), len(keep))


def _luminance(x: np.ndarray) -> np.ndarray:
    return x @ np.array([0.299, 0.587, 0.114], np.float32)


def exposure_part(y: np.ndarray) -> float:
    clipped = float((y > 0.985).mean())
    off = abs(np.log2(max(float(y.mean()), 1e-3) / 0.6))
    return float(np.clip(1.0 - 1.6 * clipped - max(0.0, off - 0.25) / 1.2, 0.0, 1.0))


def colour_contrast_part(x: np.ndarray, y: np.ndarray) -> float:
    rgb = x * 255.0
    rg, yb = rgb[..., 0] - rgb[..., 1], 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    colourfulness = float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))
    contrast = float(y.std())
    return float(np.clip(0.5 * colourfulness / 38.0 + 0.5 * contrast / 0.13, 0.0, 1.0))


def subject_background_part(x: np.ndarray, subject: Subject) -> float:
    if subject.centroid is None:
        return 0.0
    near = ndimage.binary_dilation(subject.mask, iterations=2)
    background = ~near
    if background.sum() < 16:
        return 0.0
    bg = np.median(x[background], axis=0)
    distance = np.linalg.norm(x - bg, axis=-1)
    step = float(np.percentile(distance[subject.mask], 75))
    grad = np.hypot(*np.gradient(distance))
    edge = near & ~ndimage.binary_erosion(subject.mask, iterations=1)
    steepness = float(np.percentile(grad[edge], 90)) / max(step, 1e-3) if edge.any() else 0.0
    sharp = np.clip((steepness - 0.22) / (0.5 - 0.22), 0.0, 1.0)
    rows = np.where(background[..., None], x, np.nan)
    residual = x - np.nanmean(rows, axis=1, keepdims=True)  # the vertical gradient removed row by row
    clutter = float(np.sqrt(np.nanmean(np.where(background[..., None], residual, np.nan) ** 2)))
    clean = np.clip(1.0 - (clutter - 0.02) / 0.12, 0.0, 1.0)
    return float(min(sharp, clean))


def flaws_part(y: np.ndarray) -> float:
    bright = ndimage.maximum_filter(y, size=3) > 0.85
    dark = ndimage.minimum_filter(y, size=3) < 0.2
    text = float((bright & dark & (y > 0.85)).mean())
    blocking = blockiness(y)
    return float(np.clip(1.0 - max(text / 0.05, (np.log(max(blocking, 1.0)) - 0.1) / 2.2), 0.0, 1.0))


def blockiness(y: np.ndarray) -> float:
    """Mean jump across 8-px block boundaries over the mean jump inside blocks (rows and columns):
    ~1 for an image without a JPEG grid, larger the coarser the quantisation."""
    ratios = []
    for axis in (0, 1):
        d = np.abs(np.diff(y, axis=axis)).mean(axis=1 - axis)  # mean jump between line i and i+1
        idx = np.arange(len(d))
        boundary = (idx % 8) == 7
        inside = d[~boundary].mean()
        ratios.append(d[boundary].mean() / max(inside, 1e-4))
    return float(np.mean(ratios))


@dataclass
class Estimate:
    q: float
    composition: float
    exposure: float
    colour_contrast: float
    subject_background: float
    flaws: float
    colour: str | None  # the drawn object's colour name (nearest hue), None without a subject
    position: str | None
    count: int

    def to_dict(self) -> dict:
        return asdict(self)


def estimate(image: Image.Image) -> Estimate:
    """The five parts, q and the drawn object's attributes, from the pixels alone."""
    x = np.asarray(image.convert("RGB"), np.float32) / 255.0
    y = _luminance(x)
    subject = find_subject(x)
    parts = {
        "composition": composition_part(_thirds_distance(subject.centroid)) if subject.centroid else 0.0,
        "exposure": exposure_part(y),
        "colour_contrast": colour_contrast_part(x, y),
        "subject_background": subject_background_part(x, subject),
        "flaws": flaws_part(y),
    }
    colour = None
    if subject.hue is not None:
        colour = min(colour_hues().items(), key=lambda kv: _hue_distance(kv[1], subject.hue))[0]
    position = None
    if subject.centroid is not None:
        cx, cy = subject.centroid
        position = f"{'top' if cy < 0.5 else 'bottom'} {'left' if cx < 0.5 else 'right'}"
    return Estimate(q=float(np.mean([parts[p] for p in PARTS])), **parts, colour=colour, position=position,
                    count=subject.components)


def _thirds_distance(centroid: tuple[float, float]) -> float:
    return float(min(np.hypot(centroid[0] - px, centroid[1] - py) for px, py in POSITIONS.values()))


def alignment(est: Estimate, colour: str, position: str, count: int) -> dict[str, bool]:
    """The caption checks of one image: is the drawn object of the caption's colour, at its position, as
    many as it says? ``all``: the three together."""
    checks = {"colour": est.colour == colour, "position": est.position == position, "count": est.count == count}
    return checks | {"all": all(checks.values())}


def parse_caption(caption: str) -> dict | None:
    """The grammar's attributes back from a caption ("two red balls at the top left"), None when the
    caption is not of the grammar."""
    words = caption.strip().split()
    counts = {"a": 1, "an": 1, "two": 2, "three": 3}
    if len(words) < 6 or words[0] not in counts or words[1] not in COLOURS or words[-4:-2] != ["at", "the"]:
        return None
    position = " ".join(words[-2:])
    if position not in POSITIONS:
        return None
    noun = words[2]
    obj = noun[:-2] if noun.endswith("xes") else noun.rstrip("s") if counts[words[0]] > 1 else noun
    return {"count": counts[words[0]], "colour": words[1], "object": obj, "position": position}
