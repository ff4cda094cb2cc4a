"""CPU throughput of each model-backed scorer (images/s), so users can size a cluster.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_scorers_cpu.py --n 64

Real weights where they exist offline (EasyOCR, open-nsfw, LAION aesthetic head, MobileNetV2 ImageNet);
CLIP is ViT-L/14 built from open_clip's own config with RANDOM weights ("random-init ViT-L-14": no CLIP
weights exist offline; the compute is the same as the real model's). All scorers in one run, one after
another, on the same 512 px thumbnails; torch uses the machine's cores.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from pipeline.scorers import build_scorer
from tests.pipeline.scorers.images import PHOTOS, jpeg, photo, table, with_text

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"


def rate(scorer, data, batch: int) -> tuple[str, list]:
    """'W img/s wall, C ms CPU/img' (CPU time is what the code costs whatever else runs)."""
    scorer(data.slice(0, 2))  # warm-up
    start, cpu = time.perf_counter(), time.process_time()
    outs = [scorer(data.slice(s, batch)) for s in range(0, data.num_rows, batch)]
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return f"{data.num_rows / wall:.2f} img/s wall, {1000 * cpu / data.num_rows:.1f} ms CPU/img", outs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    base = [photo(name) for name in PHOTOS]
    images = [with_text(base[i % len(base)], seed=i)[0] if i % 4 == 0 else base[i % len(base)] for i in range(args.n)]
    data = table([jpeg(im) for im in images], [f"a photo number {i}" for i in range(args.n)])
    print(f"{args.n} thumbnails (longest side 512), {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}")

    import open_clip

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "random-init-ViT-L-14.pt"
        torch.save(open_clip.create_model("ViT-L-14", pretrained=None).state_dict(), checkpoint)
        clip = build_scorer("clip", {"model": "ViT-L-14", "pretrained": None, "checkpoint": str(checkpoint), "device": "cpu"})
        clip.setup()
        clip_rate, outs = rate(clip, data, 32)
        print(f"clip (random-init ViT-L-14, {clip.dtype or 'fp32'}): {clip_rate}")
    import pyarrow as pa

    scored = pa.concat_tables(outs)
    head = SHARED / "weights" / "aesthetic" / "improved_sac+logos+ava1-l14-linearMSE.pth"
    aesthetic = build_scorer("aesthetic", {"head": str(head)})
    aesthetic.setup()
    print(f"aesthetic (improved head on stored embeddings): {rate(aesthetic, scored, 4096)[0]}")

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "hub" / "checkpoints").mkdir(parents=True)
        (Path(tmp) / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth").symlink_to(SHARED / "weights" / "imagenet" / "mobilenet_v2-b0353104.pth")
        os.environ["TORCH_HOME"] = tmp
        concept = build_scorer("concept", {"backend": "imagenet", "device": "cpu"})
        concept.setup()
        print(f"concept (imagenet backend, MobileNetV2): {rate(concept, data, 64)[0]}")
    nsfw = build_scorer("nsfw", {"device": "cpu", "threads": os.cpu_count() or 1})
    nsfw.setup()
    print(f"nsfw (open_nsfw ONNX): {rate(nsfw, data, 64)[0]}")
    ocr = build_scorer("ocr", {"device": "cpu"})
    ocr.setup()
    print(f"ocr (EasyOCR, 1 in 4 images with text): {rate(ocr, data, 64)[0]}")


if __name__ == "__main__":
    main()
