"""The small-scale quality-tuning experiment: a mini Emu Table 3 (quality vs quantity of the fine-tuning
set) and the pixel-space loss ablation (seed 004 Table 5), on the synthetic haystack whose quality is
known.

    haystack ─> curate (pipeline + simulated rounds, experiment/rounds.py) ─> curated set
       │                                                                        │ held-out part: KID reference
       └─> pretrain a base on the whole haystack (model/train.py: ensure_autoencoder, pretrain)
                └─> quality-tune arms (model/train.py: run_stage of quality_tune, overrides per arm)
                        └─> generate (model/evaluation/generate.py) ─> judges ─> report

Arms: ``base`` (no QT); ``qt-100`` / ``qt-1k`` / ``qt-2k`` (seeded subsets of the curated set, latent loss
only, as Emu); ``random-2k`` (as many random pool images as qt-2k: quality against quantity);
``qt-2k-pixel`` (+ the pixel-space loss, PS eq. 3); ``pixel-only`` (the latent term off:
``quality_tune.latent_loss_weight=0``, seed 004 Table 5). A profile scales the counts: the arms keep their
paper names and the report says how many images each had.

Judges, per generated image: the q-estimator (experiment/quality.py) and the caption checks; per arm:
KID of the evaluation stage's features (model/evaluation/distribution.py) against the held-out curated
images. Comparisons: per (replicate, prompt, seed) the arm's q against the reference arm's (a tie within
``tie_margin``), aggregated as Emu's win / tie / lose with the cluster bootstrap over prompts
(annotation/abstats.py: comparison_summary). Replicates: everything from the autoencoder on, trained
again with ``seed`` = the replicate (the haystack and the curation are shared).

Every step writes its outputs before the next starts and is skipped when they exist, so a run killed at
any point resumes (``python -m experiment run --profile gpu --step ...`` runs one step at a time).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from experiment.haystack import make_haystack, read_truth
from experiment.quality import alignment, estimate, parse_caption
from pipeline.errors import UserError

log = logging.getLogger(__name__)


class ExperimentError(UserError, RuntimeError):
    """The experiment cannot run as asked (an unknown profile or step, a missing earlier step)."""


@dataclass(frozen=True)
class Profile:
    name: str
    size: int  # render and training resolution
    haystack: int
    generalist_target: int
    specialist_target: int
    heldout: int  # curated images kept out of training: the KID reference
    qt_sizes: tuple[int, int, int]  # the "100 / 1K / 2K" of Emu Table 3 at this scale
    pretrain_steps: int
    qt_steps: int
    autoencoder_steps: int
    batch_size: int
    n_prompts: int
    gen_seeds: int
    gen_steps: int
    replicates: int
    eval_every: int
    # λ of the pixel arms: "auto" = measured at the start of the stage to balance the two terms (PS §4)
    pixel_loss_weight: float | str = "auto"
    extra: dict = field(default_factory=dict)


PROFILES = {
    # the test suite's end-to-end run (< 2 min on 2 cores): proves the machinery, says nothing
    "smoke": Profile("smoke", 64, 320, 100, 36, 8, (4, 12, 24), 6, 4, 10, 4, 4, 1, 3, 1, 4),
    # `make experiment`: <= 15 min on 2 cores
    "cpu": Profile("cpu", 64, 2000, 600, 200, 40, (16, 80, 160), 400, 60, 200, 8, 24, 2, 12, 2, 20),
    # benchmarks/device/experiment.sh: 128 px, ~50K haystack, the paper's counts, resumable 10-min calls
    # (sizes estimated to fit one replicate in one call; not yet measured on a device)
    "gpu": Profile("gpu", 128, 50_000, 8_000, 2_400, 400, (100, 1000, 2000), 6_000, 600, 2_000, 64, 64, 4,
                   25, 3, 100),
}
STEPS = ("haystack", "curate", "data", "train", "generate", "judge", "report")
TIE_MARGIN = 0.02  # |Δq| below this is a tie: the estimator's own jitter between re-renders


@dataclass(frozen=True)
class Arm:
    name: str
    data: str | None  # the imagefolder under OUT/data, None for the base
    overrides: tuple[str, ...] = ()
    paper: str = ""  # what it stands for in the papers' tables


def arms(profile: Profile) -> list[Arm]:
    latent = ("quality_tune.pixel_loss_weight=0",)
    pixel = (f"quality_tune.pixel_loss_weight={profile.pixel_loss_weight}",)
    small, mid, large = profile.qt_sizes
    return [
        Arm("base", None, (), "pre-trained (Emu Table 3: the baseline)"),
        Arm("qt-100", "qt-100", latent, f"QT on {small} curated (Emu: 100)"),
        Arm("qt-1k", "qt-1k", latent, f"QT on {mid} curated (Emu: 1K)"),
        Arm("qt-2k", "qt-2k", latent, f"QT on {large} curated (Emu: 2K)"),
        Arm("random-2k", "random-2k", latent, f"QT on {large} random pool images (quality vs quantity)"),
        Arm("qt-2k-pixel", "qt-2k", pixel, f"QT on {large} curated + pixel loss λ={profile.pixel_loss_weight} (PS eq. 3)"),
        Arm("pixel-only", "qt-2k", (*pixel, "quality_tune.latent_loss_weight=0"),
            f"QT on {large} curated, pixel loss only (seed 004 Table 5)"),
    ]


def base_overrides(profile: Profile, seed: int) -> list[str]:
    """The ``tiny`` preset at the experiment's scale: one pre-training stage at ``size``, fixed-length
    quality-tuning (early stopping on the held-out loss), no sample grids during training."""
    p = profile
    stage = (f"{{name: pretrain-{p.size}, resolution: {p.size}, max_steps: {p.pretrain_steps}, batch_size: "
             f"{p.batch_size}, learning_rate: 1.0e-3, ema_decay: null, val_fraction: 0.05, eval_every: "
             f"{max(p.pretrain_steps, 1)}, sample_every: 1000000, checkpoint_every: {max(p.pretrain_steps // 2, 1)}, "
             f"min_images: 4, caption_dropout: 0.1}}")
    return [f"seed={seed}", f"pretrain=[{stage}]", f"autoencoder.train_steps={p.autoencoder_steps}",
            f"autoencoder.train_resolution={p.size}", "data.bucket_aspect_ratios=[1.0]",
            f"quality_tune.resolution={p.size}", f"quality_tune.max_steps={p.qt_steps}",
            f"quality_tune.batch_size={p.batch_size}", f"quality_tune.eval_every={p.eval_every}",
            "quality_tune.sample_every=1000000", f"quality_tune.checkpoint_every={p.qt_steps}",
            "quality_tune.early_stopping_patience=null", "quality_tune.val_fraction=0.1",
            f"sample.num_inference_steps={p.gen_steps}"]


# --- steps ----------------------------------------------------------------------------------------


def _done(path: Path) -> bool:
    return path.is_file()


def _write_json(path: Path, value) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1, default=str))
    os.replace(tmp, path)


def step_haystack(out: Path, profile: Profile, seed: int) -> Path:
    hay = out / "haystack"
    if not (hay / "truth.parquet").is_file():
        shutil.rmtree(hay, ignore_errors=True)
        make_haystack(hay, profile.haystack, seed, profile.size, workers=min(os.cpu_count() or 1, 16))
    return hay


def step_curate(out: Path, profile: Profile, seed: int) -> dict:
    marker = out / "curation.json"
    if _done(marker):
        return json.loads(marker.read_text())
    from experiment.rounds import RoundsConfig, curate  # the rounds import annotation's server client

    shutil.rmtree(out / "curation", ignore_errors=True)
    cfg = RoundsConfig(generalist_target=profile.generalist_target, specialist_target=profile.specialist_target,
                       seed=seed)
    result = curate(out / "haystack", out / "curation", cfg, profile.size)
    _write_json(marker, result)
    return result


def imagefolder(folder: Path, files: list[str], haystack: Path) -> Path:
    """An imagefolder (metadata.jsonl: file_name, text) of haystack files, hard-linked (copied where
    links are refused), the shape model/data.py reads."""
    folder.mkdir(parents=True, exist_ok=True)
    captions = {r["file_name"]: r["caption"] for r in read_truth(haystack).select(["file_name", "caption"]).to_pylist()}
    for name in files:
        target = folder / name
        if not target.exists():
            try:
                os.link(haystack / name, target)
            except OSError:
                shutil.copyfile(haystack / name, target)
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": captions[n]}) + "\n"
                                                   for n in files))
    return folder


def step_data(out: Path, profile: Profile, seed: int, curation: dict) -> dict:
    """The training and reference sets: the whole haystack (pre-training), the curated set split into a
    held-out KID reference and the QT subsets (nested, seeded), and random pool images."""
    marker = out / "data.json"
    hay = out / "haystack"
    if _done(marker):  # on a fresh machine (the GPU version's later calls) the folders are made again
        result = json.loads(marker.read_text())
        for name, files in result.get("files", {}).items():
            if not (Path(result["folders"][name]) / "metadata.jsonl").is_file():
                imagefolder(Path(result["folders"][name]), files, hay)
        return result
    rng = np.random.default_rng([seed, 3])
    curated = list(rng.permutation(sorted(curation["curated_files"])))
    heldout, train = curated[:profile.heldout], curated[profile.heldout:]
    small, mid, large = profile.qt_sizes
    if len(train) < large:
        log.warning("the curated set has %d training images, fewer than qt-2k's %d at this profile: qt-2k takes all",
                    len(train), large)
    from annotation.images import read_columns
    from pipeline.schema import SOURCE_KEY

    pool = sorted(Path(k).name for k in read_columns(Path(curation["pool"]), [SOURCE_KEY])[SOURCE_KEY].to_pylist())
    random_pool = [str(x) for x in rng.choice(pool, min(len(pool), min(large, len(train))), replace=False)]
    all_files = sorted(read_truth(hay).column("file_name").to_pylist())
    sets = {"haystack": all_files, "heldout": heldout, "qt-100": train[:small], "qt-1k": train[:mid],
            "qt-2k": train[:large], "random-2k": random_pool}
    folders = {name: str(imagefolder(out / "data" / name, files, hay)) for name, files in sets.items()}
    truth = {r["file_name"]: r["q"] for r in read_truth(hay).select(["file_name", "q"]).to_pylist()}
    result = {"folders": folders, "files": sets, "counts": {k: len(v) for k, v in sets.items()},
              "mean_true_q": {k: float(np.mean([truth[f] for f in v])) if v else None for k, v in sets.items()}}
    _write_json(marker, result)
    return result


def _stage_done(folder: Path) -> bool:
    return (folder / "report.json").is_file() and (folder / "final" / "model_index.json").is_file()


def step_train(out: Path, profile: Profile, replicate: int, data: dict, progress: bool = False) -> dict:
    """Pre-train the replicate's base on the haystack, then quality-tune every arm from it. An arm whose
    overrides the config does not accept (a field another change has not landed yet) is recorded as
    skipped with the reason, not silently dropped."""
    from model.bases import load_frozen
    from model.config import ConfigError, load_config
    from model.train import ensure_autoencoder, pretrain, pretrained_base, run_stage

    rep = out / "models" / f"seed-{replicate}"
    marker = rep / "checkpoints.json"
    if _done(marker):
        return json.loads(marker.read_text())
    rep.mkdir(parents=True, exist_ok=True)
    overrides = base_overrides(profile, replicate)
    cfg = load_config("tiny", overrides)
    haystack_dir = Path(data["folders"]["haystack"])
    t0 = time.perf_counter()
    ensure_autoencoder(cfg, haystack_dir, rep, progress)
    frozen = load_frozen(cfg, rep / "autoencoder")
    if pretrained_base(cfg, rep) is None:
        pretrain(cfg, haystack_dir, rep, frozen, progress)
    base = pretrained_base(cfg, rep)
    result = {"checkpoints": {"base": str(base)}, "skipped": {}, "seconds": {"pretrain": time.perf_counter() - t0},
              "stopped": {}}
    for arm in arms(profile)[1:]:
        try:
            arm_cfg = load_config("tiny", overrides + list(arm.overrides))
        except ConfigError as error:
            result["skipped"][arm.name] = f"config refused the arm's overrides {list(arm.overrides)}: {error}"
            log.warning("arm %s skipped: %s", arm.name, error)
            continue
        folder = rep / "arms" / arm.name
        t0 = time.perf_counter()
        if not _stage_done(folder):
            stage = run_stage(arm_cfg, arm_cfg.quality_tune, Path(data["folders"][arm.data]), folder, frozen,
                              init_from=base, progress=progress)
            result["stopped"][arm.name] = stage.stopped
        stage_report = json.loads((folder / "report.json").read_text())
        result["pixel_loss_weight"] = result.get("pixel_loss_weight", {}) | {
            arm.name: stage_report.get("pixel_loss_weight")}
        result["checkpoints"][arm.name] = str(folder / "best" if (folder / "best").is_dir() else folder / "final")
        result["seconds"][arm.name] = time.perf_counter() - t0
    _write_json(marker, result)
    return result


def eval_prompts(profile: Profile, seed: int):
    """Prompts of the caption grammar, balanced over the four positions (the category), seeded; drawn
    from the grammar, not from the training captions."""
    import pyarrow as pa

    from experiment.haystack import draw_scene
    from model.evaluation import schema

    rng = np.random.default_rng([seed, 4])
    rows, seen = [], set()
    while len(rows) < profile.n_prompts:
        scene = draw_scene(rng)
        if scene.caption in seen:
            continue
        seen.add(scene.caption)
        rows.append({schema.PROMPT_ID: f"grammar-{len(rows):03d}", schema.PROMPT: scene.caption,
                     schema.CATEGORY: scene.position})
    return pa.Table.from_pylist(rows, schema=schema.PROMPTS_SCHEMA)


def step_generate(out: Path, profile: Profile, replicate: int, seed: int, trained: dict) -> Path:
    from model.evaluation.generate import generate

    rep = out / "models" / f"seed-{replicate}"
    return generate(trained["checkpoints"], eval_prompts(profile, seed), profile.gen_seeds, rep / "generate",
                    steps=profile.gen_steps, guidance_scale=3.0, batch_size=16)


def _features():
    """The evaluation stage's ImageNet features, or (None, reason) when its weights are not staged."""
    from model.evaluation.distribution import ImageNetFeatures
    from pipeline.weights import WeightsError

    try:
        return ImageNetFeatures(device="cpu"), None
    except WeightsError as error:
        return None, f"KID skipped: {error}"


def step_judge(out: Path, profile: Profile, replicate: int, data: dict) -> dict:
    """Per image: q-estimate, its parts, the caption checks; per arm: KID against the held-out curated."""
    import pyarrow.parquet as pq
    from PIL import Image

    from model.evaluation.distribution import kid
    from model.evaluation.schema import read_manifest

    rep = out / "models" / f"seed-{replicate}"
    marker = rep / "judges.json"
    if _done(marker):
        return json.loads(marker.read_text())
    manifest = read_manifest(rep / "generate").to_pylist()
    rows = []
    images: dict[str, list] = {}
    for m in manifest:
        image = Image.open(m["image_path"]).convert("RGB")
        est = estimate(image)
        attrs = parse_caption(m["prompt"])
        checks = alignment(est, attrs["colour"], attrs["position"], attrs["count"])
        rows.append({"replicate": replicate, "arm": m["checkpoint"], "prompt_id": m["prompt_id"], "seed": m["seed"],
                     "prompt": m["prompt"], "image_path": str(Path(m["image_path"]).resolve().relative_to(out.resolve())),
                     **est.to_dict(),
                     **{f"align_{k}": v for k, v in checks.items()}})
        images.setdefault(m["checkpoint"], []).append(image)
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows), rep / "judges.parquet")
    features, skipped = _features()
    kids = {}
    if features is not None:
        ref_dir = Path(data["folders"]["heldout"])
        reference = features([Image.open(ref_dir / f).convert("RGB") for f in sorted(os.listdir(ref_dir))
                              if f.endswith(".png")])
        for arm, ims in images.items():
            kids[arm] = kid(features(ims), reference, subsets=50, subset_size=1000, seed=replicate).to_dict()
    result = {"kid": kids, "kid_skipped": skipped, "judges": str(rep / "judges.parquet")}
    _write_json(marker, result)
    return result


def run(out: Path, profile_name: str = "cpu", seed: int = 0, steps: tuple[str, ...] = STEPS,
        progress: bool = False, threads: int | None = 1, replicates: list[int] | None = None) -> Path | None:
    """Run the ``steps`` (all by default, in order; each skipped when its outputs exist) of the profile
    into ``out``; returns the report's folder once the report step ran. ``threads``: torch's CPU threads
    (None: torch's default). One is the default: the tiny models gain nothing from a second thread, and on a
    machine shared with other jobs two threads of tiny kernels spin against each other (measured: a
    quality-tuning step took 8 s with two threads at load 12 on 2 cores, 0.18 s with one). ``replicates``:
    train, generate and judge only these (default: all of the profile's), e.g. one per device call."""
    import torch

    previous = torch.get_num_threads()
    if threads and not torch.cuda.is_available():
        torch.set_num_threads(threads)
    try:
        return _run(Path(out), profile_name, seed, steps, progress, replicates)
    finally:  # the caller's process (a test session) keeps its own setting
        torch.set_num_threads(previous)


def _run(out: Path, profile_name: str, seed: int, steps: tuple[str, ...], progress: bool,
         replicates: list[int] | None) -> Path | None:
    if profile_name not in PROFILES:
        raise ExperimentError(f"unknown profile {profile_name!r}; known: {sorted(PROFILES)}")
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise ExperimentError(f"unknown steps {unknown}; the steps are {list(STEPS)}")
    profile = PROFILES[profile_name]
    out.mkdir(parents=True, exist_ok=True)
    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").is_file() else {}

    def timed(name, fn, *args):
        t0 = time.perf_counter()
        value = fn(*args)
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
        _write_json(out / "timings.json", timings)
        return value

    _write_json(out / "profile.json", asdict(profile) | {"seed": seed})
    curation = data = None
    if "haystack" in steps:
        timed("haystack", step_haystack, out, profile, seed)
    if any(s in steps for s in STEPS[1:]):
        curation = timed("curate", step_curate, out, profile, seed) if "curate" in steps else _need(out / "curation.json")
    if any(s in steps for s in STEPS[2:]):
        data = timed("data", step_data, out, profile, seed, curation) if "data" in steps else _need(out / "data.json")
    for r in (range(profile.replicates) if replicates is None else replicates):
        rep = out / "models" / f"seed-{r}"
        trained = (timed(f"train-{r}", step_train, out, profile, r, data, progress) if "train" in steps
                   else _need(rep / "checkpoints.json") if any(s in steps for s in STEPS[4:6]) else None)
        if "generate" in steps:
            timed(f"generate-{r}", step_generate, out, profile, r, seed, trained)
        if "judge" in steps:
            timed(f"judge-{r}", step_judge, out, profile, r, data)
    if "report" in steps:
        from experiment.report import build_report  # matplotlib and annotation's statistics: here, not on a device

        return timed("report", build_report, out)
    return None


def _need(path: Path) -> dict:
    if not path.is_file():
        raise ExperimentError(f"{path} is missing: run the earlier steps first")
    return json.loads(path.read_text())
