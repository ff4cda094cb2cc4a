"""OCR scorer vs a per-image ``Reader.readtext`` loop on the same thumbnails, side by side in one run.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_ocr.py --n 200

Thumbnails: scikit-image's bundled photos, half of them with text drawn on (tests/pipeline/scorers/images).
Prints wall and CPU time of both (CPU time does not depend on other jobs' load), the speed-up and
whether every word count is equal. The two run interleaved, 50 images at a time.
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import torch
from PIL import Image

from pipeline import schema
from pipeline.scorers import build_scorer
from tests.pipeline.scorers.images import PHOTOS, jpeg, photo, table, with_text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--batch", type=int, default=50)
    args = parser.parse_args()
    base = [photo(name) for name in PHOTOS]
    images = []
    for i in range(args.n):
        image = base[i % len(base)]
        # vary every image a little (crop) so no two inputs are identical
        image = image.crop((i % 7, i % 5, image.width - i % 11, image.height - i % 3))
        images.append(with_text(image, seed=i, lines=1 + i % 3)[0] if i % 2 else image)
    data = [jpeg(im) for im in images]
    torch.set_num_threads(2)
    scorer = build_scorer("ocr", {"device": "cpu"})
    scorer.setup()
    decoded = [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in data]
    scorer(table(data[:2]))  # warm-up both paths
    scorer.reader.readtext(decoded[0])

    # interleaved chunk by chunk, so load from other processes hits both sides alike
    fast: list[int] = []
    slow: list[int] = []
    fast_s = slow_s = fast_cpu = slow_cpu = 0.0
    for s in range(0, len(data), args.batch):
        start, cpu = time.perf_counter(), time.process_time()
        fast += scorer(table(data[s : s + args.batch])).column(schema.OCR_WORD_COUNT).to_pylist()
        fast_s += time.perf_counter() - start
        fast_cpu += time.process_time() - cpu
        start, cpu = time.perf_counter(), time.process_time()
        slow += [sum(len(t.split()) for t in scorer.reader.readtext(a, detail=0)) for a in decoded[s : s + args.batch]]
        slow_s += time.perf_counter() - start
        slow_cpu += time.process_time() - cpu

    equal = sum(a == b for a, b in zip(fast, slow))
    print(f"images: {len(data)} ({sum(1 for c in slow if c)} with text per readtext)")
    print(f"readtext loop: {slow_s:.1f} s wall ({len(data) / slow_s:.2f} img/s), {slow_cpu:.1f} s CPU")
    print(f"ocr scorer:    {fast_s:.1f} s wall ({len(data) / fast_s:.2f} img/s), {fast_cpu:.1f} s CPU")
    print(f"speed-up: {slow_s / fast_s:.2f}x wall, {slow_cpu / fast_cpu:.2f}x CPU time; equal word counts: {equal}/{len(data)}")
    if equal != len(data):
        print("differences (scorer, readtext):", [(i, a, b) for i, (a, b) in enumerate(zip(fast, slow)) if a != b])


if __name__ == "__main__":
    main()
