"""OCR scorer vs a per-image ``Reader.readtext`` loop on the same thumbnails, side by side in one run.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_ocr.py --n 200                  # synthetic, half with text
    PYTHONPATH=. .venv/bin/python benchmarks/bench_ocr.py --n 200 --source coco    # real photos

Thumbnails: ``--source sample`` (default): scikit-image's bundled photos, half of them with text drawn on
(tests/pipeline/scorers/images), a worst case for the gate; ``--source coco``: the first N real COCO photos
of ``../shared/data/coco-mini`` made into thumbnails by the ingest stage's own ``inspect_image``.
Three routes, interleaved 50 images at a time so load from other processes hits all alike: the readtext
loop, the scorer as configured by default (no text-presence gate: every image takes the full-size pass)
and the scorer with the opt-in gate ``gate_scale: 0.5`` (CRAFT at half size first; only images that may
have text take the full-size pass; lossy on small scene text). Prints wall and CPU time of each (CPU time does not depend on other jobs' load), the
speed-ups over readtext and whether every word count and text area is equal (the two scorer routes'
areas are compared with each other; readtext has no area).
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline import schema
from pipeline.imageio import inspect_image
from pipeline.scorers import build_scorer
from tests.pipeline.scorers.images import PHOTOS, jpeg, photo, table, with_text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--source", choices=("sample", "coco"), default="sample")
    parser.add_argument("--coco", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared/data/coco-mini/images")
    args = parser.parse_args()
    data = coco_thumbnails(args.coco, args.n) if args.source == "coco" else sample_thumbnails(args.n)
    torch.set_num_threads(2)
    full = build_scorer("ocr", {"device": "cpu"})
    gated = build_scorer("ocr", {"device": "cpu", "gate_scale": 0.5})
    full.setup()
    gated.setup()
    decoded = [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in data]
    full(table(data[:2]))  # warm-up every path
    gated(table(data[:2]))
    full.reader.readtext(decoded[0])

    routes = {
        "readtext loop": lambda chunk, arrays: ([sum(len(t.split()) for t in full.reader.readtext(a, detail=0)) for a in arrays], None),
        "scorer (default)": lambda chunk, arrays: _counts_areas(full(table(chunk))),
        f"scorer, gate {gated.options.gate_scale}": lambda chunk, arrays: _counts_areas(gated(table(chunk))),
    }
    counts = {name: [] for name in routes}
    areas = {name: [] for name in routes}
    wall = dict.fromkeys(routes, 0.0)
    cpu = dict.fromkeys(routes, 0.0)
    for s in range(0, len(data), args.batch):
        for name, route in routes.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            c, a = route(data[s : s + args.batch], decoded[s : s + args.batch])
            wall[name] += time.perf_counter() - start
            cpu[name] += time.process_time() - cpu_start
            counts[name] += c
            areas[name] += a or []

    reference, no_gate, with_gate = routes
    print(f"images: {len(data)} ({sum(1 for c in counts[reference] if c)} with text per readtext)")
    for name in routes:
        line = f"{name:<18} {wall[name]:6.1f} s wall ({len(data) / wall[name]:.2f} img/s), {cpu[name]:6.1f} s CPU"
        if name != reference:
            equal = sum(a == b for a, b in zip(counts[name], counts[reference]))
            line += f"; speed-up {wall[reference] / wall[name]:.2f}x wall, {cpu[reference] / cpu[name]:.2f}x CPU; equal word counts {equal}/{len(data)}"
            if equal != len(data):
                line += f"; differences (i, route, readtext): {[(i, a, b) for i, (a, b) in enumerate(zip(counts[name], counts[reference])) if a != b]}"
        print(line)
    print(f"gate vs no gate: {wall[no_gate] / wall[with_gate]:.2f}x wall, {cpu[no_gate] / cpu[with_gate]:.2f}x CPU; "
          f"full-size passes skipped: {gated.skipped_full_pass}/{len(data) + 2} (incl. 2 warm-up); "
          f"equal text areas: {sum(a == b for a, b in zip(areas[no_gate], areas[with_gate]))}/{len(data)}")


def sample_thumbnails(n: int) -> list[bytes]:
    base = [photo(name) for name in PHOTOS]
    images = []
    for i in range(n):
        image = base[i % len(base)]
        # vary every image a little (crop) so no two inputs are identical
        image = image.crop((i % 7, i % 5, image.width - i % 11, image.height - i % 3))
        images.append(with_text(image, seed=i, lines=1 + i % 3)[0] if i % 2 else image)
    return [jpeg(im) for im in images]


def coco_thumbnails(folder: Path, n: int) -> list[bytes]:
    files = sorted(folder.glob("*.jpg"))[:n]
    if len(files) < n:
        raise SystemExit(f"error: {folder} has {len(files)} photos, fewer than --n {n}")
    return [inspect_image(f.read_bytes(), schema.THUMBNAIL_SIZE).thumbnail for f in files]


def _counts_areas(out) -> tuple[list[int], list[float]]:
    return out.column(schema.OCR_WORD_COUNT).to_pylist(), out.column(schema.OCR_TEXT_AREA).to_pylist()

if __name__ == "__main__":
    main()
