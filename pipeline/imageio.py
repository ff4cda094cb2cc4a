"""Reading one image: content hash, header, sanity checks and the stored thumbnail.

Everything here is a pure function of the image bytes, cheap enough to run on every input row:

- ``read_header`` opens the image without decoding pixels (width, height, format).
- ``inspect_image`` hashes the bytes (the row's ``id``), checks the header, decodes once at reduced
  scale (JPEG draft mode: libjpeg decodes at 1/2, 1/4 or 1/8 directly) and returns a small RGB JPEG
  thumbnail that every model stage scores from, so no stage decodes the full image again.

Problems are raised as ``ImageProblem(reason, detail)``: ``reason`` is the short code the quarantine
table stores. Odd but usable images (CMYK, 16-bit, palette, alpha, animated, EXIF-rotated) are
converted, not rejected.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Formats a web-scale image-text source carries. Restricting Image.open to them keeps PIL's rarer
# plugins (EPS runs Ghostscript, PSD, ICO, ...) away from untrusted bytes.
# (MPO, a camera's multi-picture JPEG, opens through the JPEG plugin.)
Image.init()
ALLOWED_FORMATS: tuple[str, ...] = tuple(
    f for f in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF") if f in Image.OPEN
)

# Declared pixel count above which an image is treated as a decompression bomb (PIL's own default
# limit, 89.5 MP, made explicit). We check the header ourselves before any decode, and silence PIL's
# warning, so the limit does not depend on what another module set Image.MAX_IMAGE_PIXELS to.
MAX_IMAGE_PIXELS = 89_478_485

THUMBNAIL_QUALITY = 90  # JPEG quality of stored thumbnails: OCR needs crisp glyph edges at 512 px

# EXIF orientations that swap width and height (rotations by 90 or 270 degrees)
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112


class ImageProblem(Exception):
    """An image that cannot be ingested; ``reason`` is the quarantine code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageInfo:
    id: str  # sha256 hex of the bytes
    width: int  # as displayed (after EXIF orientation)
    height: int
    format: str
    thumbnail: bytes  # RGB JPEG, longest side <= thumbnail_size (never upscaled)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _open(data: bytes) -> Image.Image:
    """Open (header only) or raise ImageProblem with the reason a quarantine row needs."""
    if not data:
        raise ImageProblem("empty_file", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageProblem("decompression_bomb", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise _unidentified(data) from exc
    except MemoryError:
        raise
    except Exception as exc:  # PIL's plugins raise many types on hostile headers; all mean corrupt
        raise ImageProblem("corrupt_image", f"header unreadable: {type(exc).__name__}: {exc}") from exc
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageProblem("corrupt_image", f"header declares {width}x{height} pixels")
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageProblem(
            "decompression_bomb", f"header declares {width}x{height} = {width * height:,} pixels > {MAX_IMAGE_PIXELS:,}"
        )
    return image


def _unidentified(data: bytes) -> ImageProblem:
    """Tell an image in a format we do not accept from bytes that are no image at all."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fmt = Image.open(io.BytesIO(data)).format
    except Exception:  # noqa: BLE001 - any failure here means PIL does not know the bytes either
        fmt = None
    if fmt:
        return ImageProblem("unsupported_format", f"{fmt} is not one of {', '.join(ALLOWED_FORMATS)}")
    return ImageProblem("corrupt_image", f"not a recognised image ({len(data)} bytes, starts {data[:8]!r})")


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright), read from the header."""
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block is not a broken image; ignore the tag
        return 1


def _oriented_size(image: Image.Image, orientation: int) -> tuple[int, int]:
    width, height = image.size
    return (height, width) if orientation in _TRANSPOSED_ORIENTATIONS else (width, height)


def read_header(data: bytes) -> tuple[int, int, str]:
    """(width, height, format) from the header alone: no pixel is decoded. Raises ImageProblem."""
    image = _open(data)
    width, height = _oriented_size(image, _orientation(image))
    return width, height, image.format


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any decoded mode to 8-bit RGB. Transparent pixels go onto white (how a page shows a
    transparent logo); 16-bit greys keep their top 8 bits. Raises ImageProblem("unsupported_mode")."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("P", "PA"):
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        pixels = np.asarray(image)
        if pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
            raise ImageProblem("unsupported_mode", f"mode {mode} has values outside 0..65535")
        return Image.fromarray((pixels.astype(np.uint32) >> 8).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        raise ImageProblem("unsupported_mode", "32-bit float pixels have no standard display range")
    try:
        return image.convert("RGB")  # L, 1, CMYK, YCbCr
    except ValueError as exc:
        raise ImageProblem("unsupported_mode", f"cannot convert mode {mode} to RGB: {exc}") from exc


def make_thumbnail(image: Image.Image, size: int, orientation: int = 1,
                   resample: Image.Resampling = Image.Resampling.BOX) -> bytes:
    """Decode ``image`` (opened, not yet loaded) at reduced scale and return an upright RGB JPEG whose
    longest side is ``size`` (smaller images are kept at their size: upscaling adds no information)."""
    if image.format in ("JPEG", "MPO"):
        # libjpeg decodes at the smallest 1/2^k scale still >= size: most of a big JPEG is never decoded.
        image.draft("RGB", (size, size))
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)  # animated: the first frame stands for the image
    image.load()
    if orientation != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode not in ("RGB", "L", "CMYK"):
        image = to_rgb(image)  # before resampling: palette, bilevel and 16-bit modes cannot be resampled as is
    # Pillow's BOX resize averages each output pixel's footprint (area resampling, what OpenCV's
    # INTER_AREA and img2dataset's downscaling do), so it antialiases at any scale; it costs 3/4 of
    # BILINEAR's widened triangle filter (1.22 vs 1.61 ms for 640 -> 512 px here), and the resize is the
    # largest cost of ingest. Every model stage resamples this thumbnail again with its own preprocessing.
    image.thumbnail((size, size), resample)
    image = to_rgb(image)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=THUMBNAIL_QUALITY)
    return out.getvalue()


def inspect_image(data: bytes, thumbnail_size: int, resample: Image.Resampling = Image.Resampling.BOX) -> ImageInfo:
    """Hash, header and thumbnail of one encoded image. Raises ImageProblem with a quarantine reason."""
    image = _open(data)
    orientation = _orientation(image)
    width, height = _oriented_size(image, orientation)
    fmt = image.format
    try:
        thumbnail = make_thumbnail(image, thumbnail_size, orientation, resample)
    except ImageProblem:
        raise
    except Image.DecompressionBombError as exc:  # e.g. a GIF frame larger than its header declared
        raise ImageProblem("decompression_bomb", str(exc)) from exc
    except MemoryError:
        raise
    except Exception as exc:  # any decoder failure on untrusted bytes means a bad image
        message = str(exc)
        if "truncated" in message or isinstance(exc, EOFError):
            raise ImageProblem("truncated_image", message) from exc
        raise ImageProblem("corrupt_image", f"decode failed: {type(exc).__name__}: {message}") from exc
    return ImageInfo(id=sha256_hex(data), width=width, height=height, format=fmt, thumbnail=thumbnail)


def local_path(uri: str) -> Path | None:
    """The local file a path or ``file://`` URI names; None for remote URLs (http, s3, ...)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and uri[1:3] in (":\\", ":/")):  # plain or Windows path
        return Path(uri)
    return None


def load_image_bytes(image: bytes | None, image_path: str | None) -> bytes:
    """The encoded bytes of an ingested row: stored bytes, or the file its ``image_path`` names."""
    if image is not None:
        return image
    if image_path is None:
        raise ValueError("row has neither image bytes nor an image_path")
    path = local_path(image_path)
    if path is None:
        raise ValueError(f"image_path {image_path!r} is remote; ingest only keeps local paths")
    return path.read_bytes()
