"""The CLIP scorer's decode + preprocess stage with 1 thread vs N threads, side by side in one run.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_clip_decode.py --n 200 --threads 2

On a GPU node one clip actor must decode ~1,500-2,600 thumbnails/s to keep a ViT-L/14 busy; this measures
what one thread and N threads manage on this machine's cores, through the scorer's own helper
(``decode_thumbnails(batch, preprocess, pool)``, what ``ClipScorer.image_embeddings`` calls) with
open_clip's ViT-L/14 preprocessing (224 px bicubic resize + centre crop + normalise). Thumbnails: the first
N real COCO photos of ../shared/data/coco-mini made into 512 px thumbnails by the ingest stage.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import torch

from pipeline import schema
from pipeline.imageio import inspect_image
from pipeline.scorers.common import decode_thumbnails


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--coco", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared/data/coco-mini/images")
    args = parser.parse_args()
    import open_clip

    torch.set_num_threads(1)
    _, _, preprocess = open_clip.create_model_and_transforms("ViT-L-14", pretrained=None)
    files = sorted(args.coco.glob("*.jpg"))[: args.n]
    thumbs = [inspect_image(f.read_bytes(), schema.THUMBNAIL_SIZE).thumbnail for f in files]
    batch = pa.record_batch({schema.ID: [f.name for f in files], schema.THUMBNAIL: pa.array(thumbs, pa.binary())})
    pool = ThreadPoolExecutor(args.threads)
    decode_thumbnails(batch.slice(0, 4), preprocess, pool)  # warm-up
    timings = {1: [], args.threads: []}
    for _ in range(args.rounds):  # interleaved, so load from other processes hits both alike
        for threads, p in ((1, None), (args.threads, pool)):
            start = time.perf_counter()
            out = decode_thumbnails(batch, preprocess, p)
            timings[threads].append(time.perf_counter() - start)
            assert len(out) == len(thumbs)
    best = {t: min(v) for t, v in timings.items()}
    for t, dt in best.items():
        print(f"{t} thread(s): {len(thumbs) / dt:.0f} img/s ({1000 * dt / len(thumbs):.2f} ms/img, best of {args.rounds})")
    print(f"speed-up with {args.threads} threads: {best[1] / best[args.threads]:.2f}x")


if __name__ == "__main__":
    main()
