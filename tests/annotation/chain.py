"""A small curation chain built with the real stages, no server: a folder source -> pipeline ingest,
score (size + technical, local backend), select -> rounds whose annotations are written as pull_round
writes them (scripted votes) and decided by decide_round -> the curated set (export_curated)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from annotation import schema as S
from annotation.curation import decide_round
from annotation.export import export_curated
from annotation.images import iter_rows
from annotation.layout import RoundLayout, curated_dir
from annotation.rounds import get_round
from pipeline.config import load_config
from pipeline.engine import score_run
from pipeline.ingest import ingest
from pipeline.layout import RunLayout
from pipeline.schema import ID, SHARPNESS
from pipeline.scorers import build_chain
from pipeline.select import run_select
from tests.builders import random_photo

#: the few filters the chain applies: sizes let the small test photos through, sharpness cuts the flattest
CONFIG = {"filters": {"min_side": 32, "min_sharpness": 0.25, "max_aspect_ratio": 4.0}, "balance": {"target_size": None}}


def photo_folder(folder: Path, n: int, seed: int) -> Path:
    """``n`` smooth random photos of varied sharpness (some blurred by a coarser noise grid) + captions.jsonl."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        size = int(rng.integers(64, 128))
        (folder / f"{i:04d}.jpg").write_bytes(random_photo(rng, size, size * int(rng.integers(2, 4)) // 3))
        lines.append(json.dumps({"file_name": f"{i:04d}.jpg", "text": f"a test photo number {i}"}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def pipeline_run(tmp: Path, n: int = 80, seed: int = 0) -> RunLayout:
    source = photo_folder(tmp / "source", n, seed)
    config = tmp / "pipeline.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    run = tmp / "run"
    ingest([source], run, shard_rows=50)
    score_run(run, build_chain({"size": {}, "technical": {}}), backend="local")
    run_select(run, load_config(config))
    return RunLayout(run)


#: (pool row, annotator index) -> keep?  for one round
Rule = Callable[[dict, int], bool]


def scripted_round(work: Path, round_name: str, pool: Path, rule: Rule, annotators: int = 2, target: int = 1000,
                   ) -> Path:
    """The annotations table of a round as pull_round writes it (``annotators`` votes per pool row by
    ``rule``; the specialist's with every rating and a caption), then decide_round; returns the next pool."""
    round_ = get_round(round_name, target_size=target)
    rows = []
    for index, row in enumerate(iter_rows(pool, [ID, SHARPNESS])):
        for who in range(annotators):
            keep = rule(row, who)
            answers = {round_.decision_field: round_.positive_value if keep else _negative(round_)}
            answers |= {f: 4 for f in round_.rank_fields}
            if round_.caption_field and keep:
                answers[round_.caption_field] = f"a careful caption of photo {row[ID][:8]}"
            rows.append({ID: row[ID], S.TASK_ID: index, S.PROJECT_ID: 1, S.ANNOTATION_ID: index * annotators + who,
                         S.ANNOTATOR: f"annotator-{who}@needles.test", S.ANSWERS: json.dumps(answers, sort_keys=True),
                         S.DECISION: answers[round_.decision_field], S.LEAD_TIME: 2.0, S.CREATED_AT: None,
                         S.IS_GOLD: False, S.GOLD_CORRECT: None, S.EXCLUSION_REASON: None})
    layout = RoundLayout(work, round_name)
    layout.root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=S.ANNOTATIONS_SCHEMA), layout.annotations)
    return decide_round(round_, pool, work)


def _negative(round_) -> str:
    return next(c for c in round_.controls[round_.decision_field].choices if c != round_.positive_value)


def sharp_rule(run: RunLayout) -> Rule:
    """Annotators keep the sharper photos: above the pool's median sharpness, the second annotator also
    one in five of the rest (by id), so votes disagree a little."""
    sharpness = [r[SHARPNESS] for r in iter_rows(run.pool, [ID, SHARPNESS])]
    median = float(np.median(sharpness))
    return lambda row, who: row[SHARPNESS] > median or (who == 1 and int(row[ID][:2], 16) % 5 == 0)


def curated_chain(tmp: Path, n: int = 80, seed: int = 0) -> tuple[RunLayout, Path]:
    """pipeline run -> generalist (sharper photos) -> specialist (all selected) -> curated set."""
    run = pipeline_run(tmp, n, seed)
    work = run.annotation
    generalist_pool = scripted_round(work, "generalist", run.pool, sharp_rule(run))
    specialist_pool = scripted_round(work, "specialist", generalist_pool, lambda row, who: True)
    return run, export_curated(specialist_pool, curated_dir(work))
