"""Command line for the training stage.

    python -m model train-qt  --preset tiny --data CURATED --out OUT [--base PIPELINE] [--pool POOL]
    python -m model train-qt  --preset public-lora --base stabilityai/stable-diffusion-xl-base-1.0 --data CURATED --out OUT
    python -m model pretrain  --preset sd15 --data POOL --out OUT
    python -m model train-autoencoder --preset tiny --data IMAGES --out OUT
    python -m model sample    --checkpoint OUT/quality_tune/best --prompt "a red fox" --out fox.png
    python -m model generate  --checkpoint base=BASE --checkpoint tuned=TUNED --prompts parti --n 64 --seeds 2 --out RUN/generate
    python -m model judge     --run RUN [--reference POOL_OR_IMAGES]
    python -m model train-pref --checkpoint CKPT --pairs PAIRS.parquet --out OUT [--set preference.objective=simpo]
    python -m model weights   [--preset sd15]   (stage the judges' and sample.score's weights, with network)

``--set key=value`` overrides any config field (``--set quality_tune.max_steps=500``). Multi-GPU:
``torchrun --nproc_per_node 8 -m model train-qt ...`` (``make train-qt GPUS=8``) or ``accelerate launch -m
model train-qt ...``: the loop runs under accelerate; rank 0 alone trains the autoencoder, encodes the
latent cache and writes checkpoints, grids and reports.

An error a user can fix (a pipeline.errors.UserError: bad data, config, base, checkpoint, missing weights)
prints one line and exits 2, as ``python -m pipeline`` does; anything else is a bug and keeps its traceback.
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
            p.add_argument("--base", help="the base to quality-tune: a pipeline folder (needles', SD 1.x/2.x, SDXL) or a "
                                          "hub id staged by `python -m model weights --base ID`; presets public-full, "
                                          "public-lora")
            p.add_argument("--pool", type=Path, help="pool to pre-train on when there is no base")
    s = sub.add_parser("sample", help="sample images from a saved pipeline")
    s.add_argument("--checkpoint", required=True, type=Path)
    s.add_argument("--prompt", action="append", required=True)
    s.add_argument("--out", required=True, type=Path, help="PNG path (a grid when several prompts)")
    _add_sampling_args(s)
    s.add_argument("--seed", type=int, default=0)
    _add_evaluation_parsers(sub)
    t = sub.add_parser("train-pref", help="preference tuning (Diffusion-DPO or SimPO, with the pixel-space term) on pairs")
    t.add_argument("--checkpoint", required=True, help="the starting pipeline folder: needles' own, or an SD 1.x/2.x or "
                                                        "SDXL base (folder or staged hub id)")
    t.add_argument("--pairs", required=True, type=Path, help="a preference pairs Parquet (python -m annotation pref-export)")
    t.add_argument("--out", required=True, type=Path, help="best/, final/, report.json, checkpoints/ (a rerun on the "
                                                            "same folder resumes), latents/")
    t.add_argument("--preset", help="for a public base: the preset whose preference section applies (default public-full)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="e.g. preference.objective=simpo, preference.pixel_loss_weight=2, preference.feedback=[ai]")
    w = sub.add_parser("weights", help="stage the evaluation's weights (ImageNet MobileNetV2 for KID/FD, and the "
                                       "preset's sample.score CLIP/aesthetic weights) where there is network")
    w.add_argument("--preset", help="also stage what this preset's sample.score needs (tiny | mid | sd15 | YAML)")
    w.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    w.add_argument("--base", action="append", default=[], metavar="HUB_ID",
                   help="also stage this public base's pipeline files (e.g. stabilityai/stable-diffusion-xl-base-1.0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from pipeline.errors import UserError
    from pipeline.weights import WeightsError

    # what a user can fix (every model error class derives from UserError: DataError, ConfigError,
    # BaseError, CheckpointError, AutoencoderError, EvaluationError) is one line and exit 2, as in
    # `python -m pipeline`; anything else is a bug and keeps its traceback
    try:
        return _run(args)
    except (UserError, WeightsError) as e:
        print("error: " + " ".join(line.strip() for line in str(e).splitlines() if line.strip()), file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "train-qt":
        from model.train import train_quality_tuned

        result = train_quality_tuned(args.data, args.out, args.preset, base=args.base, pool_dir=args.pool,
                                     overrides=args.overrides)
        if not _is_main_process():
            return 0  # under a multi-process launch, rank 0 reports
        qt = result.stages[-1]
        from model.export import write_lineage

        for folder in {f for f in (result.checkpoint, qt.final) if f.is_dir()}:  # which curated set and config made them
            write_lineage(folder, args.data, args.out / "config.yaml")
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
    if args.command == "train-pref":
        return _train_pref(args)
    if args.command == "generate":
        return _generate(args)
    if args.command == "judge":
        return _judge(args)
    if args.command == "weights":
        return _weights(args)
    return _sample(args)


def _weights(args: argparse.Namespace) -> int:
    """Stage (download unless NEEDLES_OFFLINE, then verify) every file the evaluation stage and the
    preset's sample.score need; the curation pipeline's own are `python -m pipeline weights`'."""
    from model.evaluation.distribution import features_weights
    from pipeline.weights import stage

    specs = [features_weights()]
    if args.preset:
        from model.config import load_config
        from pipeline.scorers import build_scorer

        score = load_config(args.preset, args.overrides).sample.score
        if score is not None and score.metric != "kid":
            for name in ("clip", "aesthetic") if score.metric != "clip_score" else ("clip",):
                specs += build_scorer(name, getattr(score, name)).weights()
    for spec in specs:
        print(f"{spec.name}: {stage(spec)}")
    from model.bases import stage_base

    for base in args.base:
        print(f"{base}: {stage_base(base)}")
    return 0


def _train_pref(args: argparse.Namespace) -> int:
    from model.train_pref import train_preference

    result = train_preference(args.checkpoint, args.pairs, args.out, preset=args.preset, overrides=args.overrides)
    last = result.history[-1] if result.history else {}
    print(f"preference-tuned checkpoint (lowest held-out loss): {result.checkpoint}")
    print(f"final checkpoint (step {result.steps}, stopped: {result.stopped}): {result.final}")
    print(f"pairs: {result.pairs}; beta {result.beta:.4g}")
    if last:
        print(f"held-out preference accuracy {last['val_preference_accuracy']:.3f}, reward margin "
              f"{last['val_reward_margin']:.4g} (step {last['step']}); report: {result.out_dir / 'report.json'}")
    return 0


def _is_main_process() -> bool:
    from model.train import process_state

    return process_state().is_main_process


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """The sampler's options, the same for `sample` and `generate`."""
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)


def _sample(args: argparse.Namespace) -> int:
    import math

    import torch
    from diffusers.utils import make_image_grid

    from model.pipeline import guidance_rescale, load_pipeline

    pipe = load_pipeline(args.checkpoint)
    if torch.cuda.is_available():
        pipe = pipe.to("cuda")
    images = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                  height=args.height, width=args.width, generator=torch.Generator().manual_seed(args.seed),
                  guidance_rescale=guidance_rescale(pipe)).images
    cols = math.ceil(math.sqrt(len(images)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    make_image_grid(images, rows=math.ceil(len(images) / cols), cols=cols).save(args.out)
    print(f"wrote {args.out} ({len(images)} images, {images[0].width}x{images[0].height})")
    return 0


def _add_evaluation_parsers(sub) -> None:
    g = sub.add_parser("generate", help="images of a prompt set from several checkpoints (same prompts and seeds)")
    g.add_argument("--checkpoint", action="append", required=True, metavar="[NAME=]PATH",
                   help="a pipeline folder, labelled NAME (default: its folder name); repeat for each checkpoint, baseline first")
    g.add_argument("--prompts", required=True, help="parti | drawbench | a .tsv/.csv/.txt/.parquet/.jsonl file")
    g.add_argument("--n", type=int, help="prompts in all, spread equally over the categories")
    g.add_argument("--per-category", type=int, help="at most this many prompts per category")
    g.add_argument("--category", action="append", dest="categories", help="only this category (repeatable)")
    g.add_argument("--prompt-seed", type=int, default=0, help="seed of the prompt sampling")
    g.add_argument("--seeds", type=int, default=1, help="images per prompt and checkpoint (seeds 0..K-1)")
    g.add_argument("--out", required=True, type=Path, help="RUN/generate")
    _add_sampling_args(g)
    g.add_argument("--batch-size", type=int, default=8)
    j = sub.add_parser("judge", help="automatic judges of RUN/generate's images -> RUN/judges")
    j.add_argument("--run", required=True, type=Path, help="the evaluation run folder (holds generate/)")
    j.add_argument("--reference", type=Path, help="reference images for KID/FD/CMMD: image folder, imagefolder or pool/curated Parquet")
    j.add_argument("--reference-limit", type=int, default=5000, help="use a seeded sample of this many reference images")
    j.add_argument("--clip-model", default="ViT-L-14", help="open_clip architecture (the pipeline's default)")
    j.add_argument("--clip-pretrained", default="openai", help="open_clip pretrained tag, staged by `make weights`")
    j.add_argument("--clip-checkpoint", help="a local open_clip checkpoint file instead of --clip-pretrained")
    j.add_argument("--aesthetic-head", help="LAION aesthetic head: a known name or a .pth path (default: the pipeline's)")
    j.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    j.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and of the KID subsets")


def _generate(args: argparse.Namespace) -> int:
    from model.evaluation import load_prompts
    from model.evaluation.generate import checkpoint_labels, generate
    from model.evaluation.prompts import selection_prompts

    checkpoints = checkpoint_labels(args.checkpoint)
    chose = selection_prompts(checkpoints.values())
    exclude = {p for used in chose.values() for p in used}
    prompts = load_prompts(args.prompts, n=args.n, per_category=args.per_category, categories=args.categories,
                           seed=args.prompt_seed, exclude=exclude)
    for path, used in chose.items():
        print(f"left out the {len(used)} prompts that chose {path} during training")
    manifest = generate(checkpoints, prompts, args.seeds, args.out, steps=args.steps, guidance_scale=args.guidance_scale,
                        height=args.height, width=args.width, batch_size=args.batch_size)
    print(f"{prompts.num_rows} prompts x {args.seeds} seeds x {len(checkpoints)} checkpoints "
          f"({', '.join(f'{k}={v}' for k, v in checkpoints.items())})")
    print(f"manifest: {manifest}")
    return 0


def _judge(args: argparse.Namespace) -> int:
    from model.evaluation import EvalLayout
    from model.evaluation.judges import judge

    layout = EvalLayout(args.run)
    clip = {"model": args.clip_model, "device": args.device,
            **({"checkpoint": args.clip_checkpoint, "pretrained": None} if args.clip_checkpoint else {"pretrained": args.clip_pretrained})}
    summary = judge(layout.generate, layout.judges, args.reference, clip=clip,
                    aesthetic={"head": args.aesthetic_head} if args.aesthetic_head else None,
                    ocr={"device": args.device}, reference_limit=args.reference_limit, seed=args.seed)
    for label, metrics in summary["per_checkpoint"].items():
        print(f"{label}: " + "; ".join(f"{m} {_stat(s)}" for m, s in metrics.items()))
    for label, value in summary.get("distribution", {}).get("kid", {}).items():
        print(f"{label}: KID {value['mean']:.4f} ± {value['std']:.4f} (subsets of {value['subset_size']})")
    for name, reason in summary["skipped"].items():
        print(f"skipped {name}: {reason}")
    print(f"judges: {layout.judges_table}\nsummary: {layout.judges_summary}")
    return 0


def _stat(stat: dict) -> str:
    if stat["mean"] is None:
        return "n/a"
    ci = f" [{stat['ci'][0]:.3g}, {stat['ci'][1]:.3g}]" if stat["ci"] else ""
    return f"{stat['mean']:.3g}{ci}"


if __name__ == "__main__":
    sys.exit(main())
