"""Distribution metrics of generated images against a reference image set: KID (primary), FD, CMMD.

At the sample sizes of a human evaluation (tens to hundreds of images per checkpoint) the Fréchet
distance is mostly bias (issue 10: two halves of COCO-mini score FD 263 against a blurred copy's 285 on
MobileNetV2 features, while KID separates them, 0.0035 against 0.139), so KID, an unbiased estimate, is
the primary number. The features are torchvision's ImageNet MobileNetV2 (the 1280-d pooled layer), the
classifier the pipeline's concept scorer already stages; CMMD uses the CLIP image embeddings the clip
judge makes anyway. Every image, generated or reference, goes through the pipeline's own thumbnail
(pipeline.imageio.inspect_image) first, so both sets are processed alike.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import linalg

from model.evaluation.errors import EvaluationError

log = logging.getLogger(__name__)

FEATURES_WEIGHTS = "MobileNet_V2_Weights.IMAGENET1K_V1"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's kernel k(x, y) = (x·y / d + 1)³, d the feature width (Bińkowski et al. 2018, "Demystifying
    MMD GANs", §4)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(k_xx: np.ndarray, k_yy: np.ndarray, k_xy: np.ndarray) -> float:
    """The unbiased estimate of MMD² from kernel matrices (Gretton et al. 2012, JMLR, Lemma 6):
    mean of k(x_i, x_j) over i != j, plus the same for y, minus twice the mean of k(x_i, y_j)."""
    m, n = len(k_xx), len(k_yy)
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * k_xy.mean())


@dataclass(frozen=True)
class KID:
    mean: float
    std: float
    subsets: int
    subset_size: int

    def to_dict(self) -> dict:
        return asdict(self)


def kid(x: np.ndarray, y: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> KID:
    """Kernel Inception Distance (Bińkowski et al. 2018) as torchmetrics and clean-fid compute it: the
    unbiased polynomial-kernel MMD² on ``subsets`` random subsets of min(len(x), len(y), subset_size)
    rows of each set (drawn without replacement), reported as mean and std over the subsets. When both
    sets are smaller than subset_size every subset is the whole of each set and std is 0."""
    m = min(len(x), len(y), subset_size)
    if m < 2:
        raise EvaluationError(f"KID needs at least 2 images in each set, got {len(x)} and {len(y)}")
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        xs = x[rng.choice(len(x), m, replace=False)]
        ys = y[rng.choice(len(y), m, replace=False)]
        values.append(mmd2_unbiased(polynomial_kernel(xs, xs), polynomial_kernel(ys, ys), polynomial_kernel(xs, ys)))
    return KID(float(np.mean(values)), float(np.std(values)), subsets, m)


def cmmd(x: np.ndarray, y: np.ndarray, sigma: float = 10.0, scale: float = 1000.0) -> float:
    """CMMD (Jayasumana et al. 2024, "Rethinking FID", §5): MMD² with the Gaussian RBF kernel
    k(x, y) = exp(-||x - y||² / (2 sigma²)), sigma = 10, on L2-normalised CLIP image embeddings, times
    1000. As the authors' reference code (google-research/cmmd, distance.py) computes it: the plain means
    of the three kernel matrices, diagonals included."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    gamma = 1.0 / (2.0 * sigma**2)

    def mean_kernel(a: np.ndarray, b: np.ndarray) -> float:
        squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
        return float(np.exp(-gamma * squared).mean())

    return scale * (mean_kernel(x, x) + mean_kernel(y, y) - 2.0 * mean_kernel(x, y))


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """FD (Heusel et al. 2017, FID's formula on these features): ||mu_x - mu_y||² +
    Tr(S_x + S_y - 2 (S_x S_y)^½), the matrix square root by scipy.linalg.sqrtm. Biased at small n:
    a secondary number beside KID."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    mu_x, mu_y = x.mean(0), y.mean(0)
    s_x, s_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    with warnings.catch_warnings():
        # fewer images than feature dimensions make both covariances singular: sqrtm warns, and its
        # result is still the one FID implementations use (the imaginary part is rounding, dropped)
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(s_x @ s_y)
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(s_x + s_y - 2.0 * np.real(root)))


def features_weights():
    """The WeightSpec of ImageNetFeatures' MobileNetV2 (``python -m model weights`` stages it)."""
    from pipeline.weights import WeightSpec

    return WeightSpec(f"imagenet:{FEATURES_WEIGHTS}", "torchvision", FEATURES_WEIGHTS,
                      expected="torchvision ImageNet MobileNetV2 state dict")


class ImageNetFeatures:
    """The 1280-d pooled features of torchvision's ImageNet MobileNetV2 (``mobilenet_v2(weights=
    "IMAGENET1K_V1")`` with the classifier removed), preprocessed by the weights' own transforms. The
    weights file is resolved by pipeline/weights.py exactly as the concept scorer's imagenet backend
    does: staged under $TORCH_HOME/hub/checkpoints, never downloaded here (a WeightsError otherwise)."""

    def __init__(self, device: str = "auto", batch_size: int = 64) -> None:
        from pipeline.scorers.common import pick_device
        from pipeline.weights import resolve, torch_home
        import torch
        from torchvision.models import get_weight, mobilenet_v2

        resolve(features_weights())
        os.environ.setdefault("TORCH_HOME", str(torch_home()))  # where torchvision's loader looks
        weights = get_weight(FEATURES_WEIGHTS)
        self.device = pick_device(device)
        self.model = mobilenet_v2(weights=weights).eval().to(self.device)
        self.model.classifier = torch.nn.Identity()  # forward() then returns the pooled features
        self.transform = weights.transforms()
        self.batch_size = batch_size

    def __call__(self, images: list) -> np.ndarray:
        import torch

        out = [np.zeros((0, 1280), np.float32)]
        for start in range(0, len(images), self.batch_size):
            x = torch.stack([self.transform(im) for im in images[start : start + self.batch_size]]).to(self.device)
            with torch.inference_mode():
                out.append(self.model(x).float().cpu().numpy())
        return np.concatenate(out)


@dataclass
class ReferenceSet:
    """What was read of a reference set: the thumbnails used, and the images that could not be read."""

    path: Path
    thumbnails: list[bytes]
    rows: int
    unreadable: dict[str, str]

    def to_dict(self) -> dict:
        return {"path": str(self.path), "rows": self.rows, "images": len(self.thumbnails),
                "unreadable": len(self.unreadable), "unreadable_examples": dict(list(self.unreadable.items())[:10])}


def read_reference(path: str | Path, limit: int | None = None, seed: int = 0) -> ReferenceSet:
    """Thumbnails (pipeline.imageio's JPEG thumbnails) of a reference image set: an imagefolder
    (metadata.jsonl with file_name), Parquet with the pipeline's thumbnail/image/image_path columns (a
    pool or curated set: a file or a folder of shards), or a folder of image files (searched
    recursively). ``limit`` takes a seeded random sample of that many rows."""
    from pipeline import schema
    from pipeline.imageio import ImageProblem, inspect_image

    path = Path(path)
    keys, load, stored_thumbnails = _reference_rows(path)
    rows = len(keys)
    if not rows:
        raise EvaluationError(f"reference set {path} holds no images (an imagefolder, Parquet with "
                              f"{schema.THUMBNAIL!r}/{schema.IMAGE!r} columns, or a folder of image files)")
    chosen = range(rows) if limit is None or rows <= limit else sorted(np.random.default_rng(seed).choice(rows, limit, replace=False))
    thumbnails, unreadable = [], {}
    for index, data in zip(chosen, load(list(chosen))):
        try:
            if isinstance(data, Exception):  # the file or row could not be read at all
                raise data
            if data is None:
                raise ValueError("null image")
            # a pool's stored thumbnails are already the pipeline's: another JPEG pass would only degrade them
            thumbnails.append(data if stored_thumbnails else inspect_image(data, schema.THUMBNAIL_SIZE).thumbnail)
        except (ImageProblem, OSError, ValueError) as error:
            unreadable[keys[index]] = str(error)
    if not thumbnails:
        raise EvaluationError(f"reference set {path}: none of its {len(chosen)} images could be read "
                              f"(first: {next(iter(unreadable.items()))})")
    if unreadable:
        log.warning("reference set %s: %d of %d images unreadable (first: %s)", path, len(unreadable), len(chosen), next(iter(unreadable.items())))
    return ReferenceSet(path, thumbnails, rows, unreadable)


def _reference_rows(path: Path):
    """(row keys, load(indices) -> iterator of encoded image bytes, or the error that stopped reading
    one, whether those bytes are stored pipeline thumbnails) for the three layouts."""
    if (path / "metadata.jsonl").is_file():
        from model.data import RowProblem, inside_folder

        keys, files = [], []  # a file, or the reason the row has none: counted with the unreadable images
        for line_no, line in enumerate((path / "metadata.jsonl").read_text().splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            file = inside_folder(path, row["file_name"]) if "file_name" in row else RowProblem("no file_name")
            keys.append(str(file) if isinstance(file, Path) else f"{path / 'metadata.jsonl'} line {line_no}")
            files.append(ValueError(file.reason) if isinstance(file, RowProblem) else file)
        return keys, lambda indices: (_read_bytes(files[i]) for i in indices), False
    shards = [path] if path.suffix == ".parquet" else sorted(path.glob("*.parquet")) if path.is_dir() else []
    if shards:
        return _parquet_rows(shards)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        return [str(f) for f in files], lambda indices: (_read_bytes(files[i]) for i in indices), False
    raise EvaluationError(f"reference set {path} does not exist or is not an image folder, imagefolder or Parquet")


def _read_bytes(file: Path | Exception) -> bytes | Exception:
    if isinstance(file, Exception):  # a row refused before reading (a file_name outside the folder)
        return file
    try:
        return file.read_bytes()
    except OSError as error:  # counted with the unreadable images, with this reason
        return error


def _parquet_rows(shards: list[Path]):
    """Row keys of the shards, a loader that reads only the chosen rows' image column, shard by shard
    (a 200K-row pool's thumbnails do not fit in memory at once), and whether that column is thumbnails."""
    import pyarrow.parquet as pq

    from pipeline import schema
    from pipeline.imageio import load_image_bytes

    columns, keys = [], []
    for shard in shards:
        names = pq.read_schema(shard).names
        column = next((c for c in (schema.THUMBNAIL, schema.IMAGE, schema.IMAGE_PATH) if c in names), None)
        if column is None:
            raise EvaluationError(f"reference shard {shard} has none of the columns {schema.THUMBNAIL!r}, "
                                  f"{schema.IMAGE!r}, {schema.IMAGE_PATH!r}; its columns: {names}")
        columns.append(column)
        keys += [f"{shard.name}:{i}" for i in range(pq.ParquetFile(shard).metadata.num_rows)]

    def load(indices: list[int]) -> Iterator[bytes | Exception]:
        start = 0
        wanted = iter(indices)
        index = next(wanted, None)
        for shard, column in zip(shards, columns):
            for batch in pq.ParquetFile(shard).iter_batches(columns=[column], batch_size=1024):
                end = start + batch.num_rows
                while index is not None and index < end:
                    value = batch.column(0)[index - start].as_py()
                    try:
                        data = value if column != schema.IMAGE_PATH else load_image_bytes(None, value)
                    except (OSError, ValueError) as error:
                        data = error
                    yield data
                    index = next(wanted, None)
                start = end

    return keys, load, set(columns) == {schema.THUMBNAIL}
