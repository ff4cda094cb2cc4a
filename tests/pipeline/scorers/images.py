"""Small real test images: clean photos bundled with scikit-image and the same photos with text drawn
on them with PIL (Pillow's built-in scalable font, so no system fonts are needed)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFont

from pipeline import schema

#: colour photos shipped inside scikit-image (no download): public-domain or CC0 / BSD test images
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "horse", "camera", "cat", "immunohistochemistry")
PHRASES = ("BIG SALE today only", "visit our shop now", "Free shipping on all orders", "50% OFF", "Summer Collection 2024")


def photo(name: str, size: int = schema.THUMBNAIL_SIZE) -> Image.Image:
    import skimage.data

    array = getattr(skimage.data, name)()
    image = Image.fromarray(array if array.dtype == np.uint8 else (array * 255).astype(np.uint8))
    image = image.convert("RGB")
    image.thumbnail((size, size))
    return image


def with_text(image: Image.Image, seed: int, lines: int = 2) -> tuple[Image.Image, int]:
    """Draw ``lines`` phrases (font size by seed) and return the image and the true word count."""
    image = image.copy()
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=16 + 4 * (seed % 6))
    words = 0
    for k in range(lines):
        phrase = PHRASES[(seed + k) % len(PHRASES)]
        y = 10 + (seed * 13 + k * 70) % max(1, image.height - 50)
        draw.text((8 + 6 * k, y), phrase, font=font, fill=(255, 255, 255), stroke_width=2, stroke_fill=(0, 0, 0))
        words += len(phrase.split())
    return image, words


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def table(images: list[Image.Image] | list[bytes], captions: list[str | None] | None = None) -> pa.Table:
    data = [i if isinstance(i, bytes) else jpeg(i) for i in images]
    columns = {
        schema.ID: [f"row-{i}" for i in range(len(data))],
        schema.THUMBNAIL: pa.array(data, type=pa.binary()),
    }
    if captions is not None:
        columns[schema.CAPTION] = pa.array(captions, type=pa.string())
    return pa.table(columns)
