"""Images of one prompt set from several checkpoints, for side-by-side judging (issue 10, item 1).

Every checkpoint samples exactly the same (prompt, seed) set, and a (prompt, seed) starts from the same
initial noise in every checkpoint: one CPU ``torch.Generator`` per image seeded with the seed (diffusers
draws the latents on the generator's device and moves them, so CPU and CUDA runs start alike). That
needs the same latent shape everywhere, checked before anything is generated. Images land in
RUN/generate/images/<label>/<prompt_id>-s<seed>.png, one manifest row each (schema.MANIFEST_SCHEMA);
a rerun skips the images already on disk and rewrites the manifest complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from model.evaluation import schema
from model.evaluation.errors import EvaluationError
from model.evaluation.layout import IMAGES_DIR, MANIFEST_FILE, SETTINGS_FILE, image_relpath

log = logging.getLogger(__name__)

LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class LatentShape:
    """What decides a checkpoint's initial noise: latent channels, the UNet's native latent size and the
    autoencoder's downsampling (native image size = sample_size * vae_scale_factor)."""

    in_channels: int
    sample_size: int
    vae_scale_factor: int

    def __str__(self) -> str:
        side = self.sample_size * self.vae_scale_factor
        return (f"{self.in_channels}x{self.sample_size}x{self.sample_size} latents, "
                f"/{self.vae_scale_factor} autoencoder ({side}x{side} px)")


def latent_shape(checkpoint: str | Path) -> LatentShape:
    """Read from the pipeline folder's unet/ and vae/ configs, without loading any weights. The scale
    factor is diffusers' own: 2 ** (len(vae.config.block_out_channels) - 1)."""
    from model.pipeline import weights_folder

    checkpoint = weights_folder(checkpoint)  # a LoRA folder samples at its base's shape
    configs = {}
    for part in ("unet", "vae"):
        file = checkpoint / part / "config.json"
        if not file.is_file():
            raise EvaluationError(f"checkpoint {checkpoint} is not a diffusers pipeline folder: {file} is missing")
        configs[part] = json.loads(file.read_text())
    return LatentShape(configs["unet"]["in_channels"], configs["unet"]["sample_size"],
                       2 ** (len(configs["vae"]["block_out_channels"]) - 1))


def check_latent_shapes(checkpoints: Mapping[str, Path]) -> LatentShape:
    """The shape every checkpoint shares; a checkpoint whose shape differs from the first one's is an
    EvaluationError naming both (their seeds would start from different noise, at different sizes)."""
    shapes = {label: latent_shape(path) for label, path in checkpoints.items()}
    (first, shape), *others = shapes.items()
    for label, other in others:
        if other != shape:
            raise EvaluationError(
                f"checkpoints differ in latent shape: {first!r} ({checkpoints[first]}) has {shape}, "
                f"{label!r} ({checkpoints[label]}) has {other}; compare checkpoints of one resolution and autoencoder")
    return shape


def checkpoint_labels(specs: list[str]) -> dict[str, Path]:
    """``NAME=PATH`` or ``PATH`` (label = the folder's name; a repeated name gets "-2", "-3", ...)."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if sep and LABEL.fullmatch(name) and not Path(spec).exists():
            if name in out:
                raise EvaluationError(f"checkpoint label {name!r} is given twice")
            out[name] = Path(rest)
            continue
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(spec).resolve().name).lstrip("-.") or "checkpoint"
        label, n = base, 1
        while label in out:
            n += 1
            label = f"{base}-{n}"
        out[label] = Path(spec)
    return out


def generate(checkpoints: Mapping[str, str | Path], prompts: pa.Table, seeds: list[int] | int, out: str | Path,
             steps: int = 25, guidance_scale: float = 5.0, height: int | None = None, width: int | None = None,
             batch_size: int = 8) -> Path:
    """Generate every (prompt, seed) of ``prompts`` x ``seeds`` (a list, or K for seeds 0..K-1) with every
    checkpoint ({label: pipeline folder}) into ``out`` (RUN/generate); returns the manifest's path.
    Each checkpoint loads with model.pipeline.load_pipeline, on CUDA when there is one."""
    out = Path(out)
    checkpoints = {label: Path(path) for label, path in checkpoints.items()}
    seeds = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    _check_inputs(checkpoints, prompts, seeds)
    _check_not_selected_on(checkpoints, prompts)
    shape = check_latent_shapes(checkpoints)
    settings = {"num_inference_steps": steps, "guidance_scale": guidance_scale,
                "height": height or shape.sample_size * shape.vae_scale_factor,
                "width": width or shape.sample_size * shape.vae_scale_factor}
    _record_settings(out, settings, checkpoints, shape)

    keys = [(row[schema.PROMPT_ID], row[schema.PROMPT], seed) for row in prompts.to_pylist() for seed in seeds]
    for label, path in checkpoints.items():
        todo = [k for k in keys if not (out / image_relpath(label, k[0], k[2])).is_file()]
        log.info("%s: %d of %d images to generate (%s)", label, len(todo), len(keys), path)
        if todo:
            _generate_images(path, todo, out, label, settings, batch_size)
    manifest = out / MANIFEST_FILE
    _write_parquet_atomic(_manifest(prompts, seeds, checkpoints, out, settings), manifest)
    return manifest


def _check_inputs(checkpoints: dict[str, Path], prompts: pa.Table, seeds: list[int]) -> None:
    if not checkpoints:
        raise EvaluationError("no checkpoint given")
    bad = [label for label in checkpoints if not LABEL.fullmatch(label)]
    if bad:
        raise EvaluationError(f"checkpoint labels {bad} are not usable as folder names (letters, digits, . _ -)")
    missing = [c for c in schema.PROMPTS_SCHEMA.names if c not in prompts.column_names]
    if missing:
        raise EvaluationError(f"the prompt table lacks columns {missing} (make it with load_prompts)")
    ids = prompts.column(schema.PROMPT_ID).to_pylist()
    if not ids:
        raise EvaluationError("no prompts to generate")
    if len(set(ids)) < len(ids):
        raise EvaluationError("the prompt table repeats prompt ids: each prompt must appear once")
    if not seeds or len(set(seeds)) < len(seeds):
        raise EvaluationError(f"seeds must be distinct and at least one, got {seeds}")


def _check_not_selected_on(checkpoints: dict[str, Path], prompts: pa.Table) -> None:
    """No reported prompt may be one that chose a checkpoint during training (issue 10, item 6)."""
    from model.evaluation.prompts import selection_prompts

    texts = set(prompts.column(schema.PROMPT).to_pylist())
    for path, used in selection_prompts(checkpoints.values()).items():
        both = sorted(texts & set(used))
        if both:
            raise EvaluationError(f"{len(both)} of these prompts chose checkpoint {path} during training (e.g. "
                                  f"{both[0]!r}): results on them would flatter it. Load the prompts with "
                                  f"exclude= the texts of selection_prompts() (the CLI and the evaluate flow do)")


def _record_settings(out: Path, settings: dict, checkpoints: dict[str, Path], shape: LatentShape) -> None:
    """settings.json holds what every image in ``out`` was sampled with. A rerun with other settings, or
    a label that now names another checkpoint, would mix images of two kinds: refused."""
    file = out / SETTINGS_FILE
    recorded = {"checkpoints": {}, **settings, "latent_shape": asdict(shape)}
    if file.is_file():
        recorded = json.loads(file.read_text())
        old = {k: recorded.get(k) for k in settings}
        if old != settings:
            raise EvaluationError(f"{out} holds images sampled with {old}; these settings are {settings}: "
                                  f"use another --out, or delete {out} to start over")
    for label, path in checkpoints.items():
        before = recorded["checkpoints"].get(label)
        if before is not None and before != str(path.resolve()):
            raise EvaluationError(f"{out}: label {label!r} holds images of {before}, not {path.resolve()}: "
                                  f"give this checkpoint another label or use another --out")
        recorded["checkpoints"][label] = str(path.resolve())
    out.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(recorded, indent=2) + "\n")


def _generate_images(path: Path, todo: list[tuple[str, str, int]], out: Path, label: str, settings: dict,
                     batch_size: int) -> None:
    import torch

    from model.pipeline import guidance_rescale, load_pipeline

    pipe = load_pipeline(path)
    if torch.cuda.is_available():
        pipe = pipe.to("cuda")
    rescale = guidance_rescale(pipe)  # 0.7 on zero-terminal-SNR schedules, as training's sample grids
    (out / IMAGES_DIR / label).mkdir(parents=True, exist_ok=True)
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        images = pipe([prompt for _, prompt, _ in batch], num_inference_steps=settings["num_inference_steps"],
                      guidance_scale=settings["guidance_scale"], height=settings["height"], width=settings["width"],
                      generator=[torch.Generator().manual_seed(seed) for _, _, seed in batch],
                      guidance_rescale=rescale).images
        for (prompt_id, _, seed), image in zip(batch, images):
            target = out / image_relpath(label, prompt_id, seed)
            tmp = target.with_name(f".tmp-{target.name}")
            image.save(tmp, format="PNG")
            os.replace(tmp, target)  # whole files only: a rerun after a crash never keeps half an image
    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _manifest(prompts: pa.Table, seeds: list[int], checkpoints: dict[str, Path], out: Path, settings: dict) -> pa.Table:
    from PIL import Image

    rows = []
    for label, path in checkpoints.items():
        for prompt in prompts.to_pylist():
            for seed in seeds:
                relative = image_relpath(label, prompt[schema.PROMPT_ID], seed)
                with Image.open(out / relative) as image:  # header only: the size as written
                    width, height = image.size
                rows.append({**prompt, schema.SEED: seed, schema.CHECKPOINT: label,
                             schema.CHECKPOINT_PATH: str(path.resolve()), schema.IMAGE_PATH: relative,
                             schema.HEIGHT: height, schema.WIDTH: width,
                             schema.NUM_INFERENCE_STEPS: settings["num_inference_steps"],
                             schema.GUIDANCE_SCALE: settings["guidance_scale"]})
    return pa.Table.from_pylist(rows, schema=schema.MANIFEST_SCHEMA)


def _write_parquet_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
