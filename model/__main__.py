"""Command line for the training stage.

    python -m model train-qt  --preset tiny --data CURATED --out OUT [--base PIPELINE] [--pool POOL]
    python -m model pretrain  --preset sd15 --data POOL --out OUT
    python -m model train-autoencoder --preset tiny --data IMAGES --out OUT
    python -m model sample    --checkpoint OUT/quality_tune/best --prompt "a red fox" --out fox.png

``--set key=value`` overrides any config field (``--set quality_tune.max_steps=500``). Multi-GPU:
``torchrun --nproc_per_node 8 -m model train-qt ...`` (``make train-qt GPUS=8``) or ``accelerate launch -m
model train-qt ...``: the loop runs under accelerate; rank 0 alone trains the autoencoder, encodes the
latent cache and writes checkpoints, grids and reports.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in [("train-qt", "quality-tune on a curated set (pre-training first when no base exists)"),
                        ("pretrain", "progressive-resolution pre-training on the pool"),
                        ("train-autoencoder", "train the config's kl autoencoder and report PSNR/SSIM")]:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--preset", default="tiny", help="tiny | mid | sd15 | path to a YAML config")
        p.add_argument("--data", required=True, type=Path, help="imagefolder (metadata.jsonl) or Parquet")
        p.add_argument("--out", required=True, type=Path)
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
        if name == "train-qt":
            p.add_argument("--base", type=Path, help="a pre-trained pipeline folder to start from")
            p.add_argument("--pool", type=Path, help="pool to pre-train on when there is no base")
    s = sub.add_parser("sample", help="sample images from a saved pipeline")
    s.add_argument("--checkpoint", required=True, type=Path)
    s.add_argument("--prompt", action="append", required=True)
    s.add_argument("--out", required=True, type=Path, help="PNG path (a grid when several prompts)")
    s.add_argument("--steps", type=int, default=25)
    s.add_argument("--guidance-scale", type=float, default=5.0)
    s.add_argument("--height", type=int)
    s.add_argument("--width", type=int)
    s.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from model.data import DataError
    from pipeline.weights import WeightsError

    try:
        return _run(args)
    except (DataError, FileNotFoundError, ValueError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "train-qt":
        from model.train import train_quality_tuned

        result = train_quality_tuned(args.data, args.out, args.preset, base=args.base, pool_dir=args.pool,
                                     overrides=args.overrides)
        if not _is_main_process():
            return 0  # under a multi-process launch, rank 0 reports
        qt = result.stages[-1]
        print(f"quality-tuned checkpoint (best, step {qt.best_step}): {result.checkpoint}")
        print(f"final checkpoint (step {qt.steps}, stopped: {qt.stopped}): {qt.final}")
        print(f"sample grids: {qt.out_dir / 'samples'} ({len(result.grids)} grids, last {result.grids[-1].name})")
        print(f"load it: model.pipeline.load_pipeline('{result.checkpoint}')  (a StableDiffusionPipeline)")
        return 0
    if args.command == "pretrain":
        from model.config import load_config
        from model.train import ensure_autoencoder, load_frozen, pretrain

        cfg = load_config(args.preset, args.overrides)
        from model.train import process_state

        with process_state().main_process_first():  # rank 0 trains the autoencoder; the others load it
            ensure_autoencoder(cfg, args.data, args.out)
        results = pretrain(cfg, args.data, args.out, load_frozen(cfg, args.out / "autoencoder"))
        if not _is_main_process():
            return 0
        for r in results:
            print(f"{r.stage}: {r.steps} steps ({r.stopped}); checkpoint {r.final}")
        return 0
    if args.command == "train-autoencoder":
        from model.config import load_config
        from model.train import ensure_autoencoder

        cfg = load_config(args.preset, args.overrides)
        metrics = ensure_autoencoder(cfg, args.data, args.out)
        print(f"autoencoder in {args.out / 'autoencoder'}: " +
              (f"PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.3f}" if metrics else "already trained"))
        return 0
    return _sample(args)


def _is_main_process() -> bool:
    from model.train import process_state

    return process_state().is_main_process


def _sample(args: argparse.Namespace) -> int:
    import math

    import torch
    from diffusers.utils import make_image_grid

    from model.pipeline import load_pipeline

    pipe = load_pipeline(args.checkpoint)
    if torch.cuda.is_available():
        pipe = pipe.to("cuda")
    images = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                  height=args.height, width=args.width, generator=torch.Generator().manual_seed(args.seed)).images
    cols = math.ceil(math.sqrt(len(images)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    make_image_grid(images, rows=math.ceil(len(images) / cols), cols=cols).save(args.out)
    print(f"wrote {args.out} ({len(images)} images, {images[0].width}x{images[0].height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
