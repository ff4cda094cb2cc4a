"""The curation system on the haystack, without a server: ingest -> automatic filters -> a simulated
generalist round -> a simulated specialist round -> the curated set.

The automatic part is the pipeline itself (pipeline.ingest, pipeline.engine.score_run with the cheap
scorers, pipeline.select.run_select). The two human rounds are simulated OFFLINE: no Label Studio, but
the annotations tables the real rounds pull (annotation.schema.ANNOTATIONS_SCHEMA, one row per annotator
and task, answers as the round's label config names them) are written to WORK/<round>/annotations.parquet
and decided by the project's own code: annotation.curation.decide_round (consensus.decide: keep-if-any for
the generalist, keep-if-all and rank by the mean rating for the specialist, round definitions from
annotation.rounds.get_round) and annotation.export.export_curated. The server path of the same rounds is
tested in tests/annotation.

The simulated annotators know the truth only through noise: a generalist keeps an image when its q plus
Gaussian noise (sd ``generalist_noise``) clears the threshold that would keep ``generalist_keep`` x the
round's target; a specialist rates composition / lighting / colour-contrast / subject-background from the matching
parts of q plus noise (sd ``specialist_noise``), says whether it could be better from the flaws part, and
selects when its noisy q clears the threshold that would select ``specialist_select`` x the target of what
reaches it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from annotation import schema as S
from annotation.curation import decide_round
from annotation.export import export_curated
from annotation.images import read_columns
from annotation.layout import RoundLayout, curated_dir
from annotation.rounds import Round, get_round
from experiment.haystack import PARTS, read_truth
from pipeline.schema import ID, SOURCE_KEY

#: specialist rating field -> the part of q it rates (annotation/rounds/specialist.xml)
RATED_PART = {"composition": "composition", "lighting": "exposure", "color_contrast": "colour_contrast",
              "subject_background": "subject_background"}


@dataclass(frozen=True)
class RoundsConfig:
    generalist_target: int
    specialist_target: int
    annotators: int = 2  # overlap of each round
    # each generalist alone would keep this times the target (keep-if-any of two then keeps ~the target)
    generalist_keep: float = 0.75
    # each specialist alone would select this times the target (keep-if-all of two then passes more than
    # the target, and the rank by the mean rating cuts to it)
    specialist_select: float = 2.0
    generalist_noise: float = 0.08
    specialist_noise: float = 0.05
    seed: int = 0


def automatic_filters(haystack: Path, run_dir: Path, size: int) -> Path:
    """Ingest, score (size, pHash, technical) and select: returns the pool folder. The thresholds are
    the defaults' intent at the haystack's scale: min side = the render size; contrast and sharpness
    drop only the worst washed-out and blurred renders (the rounds must find the rest)."""
    from pipeline.config import parse_config
    from pipeline.engine import score_run
    from pipeline.ingest import ingest
    from pipeline.layout import RunLayout
    from pipeline.scorers import build_chain
    from pipeline.select import run_select

    cfg = parse_config({
        "ingest": {"shard_rows": 2_000},
        "scorers": {"size": {}, "phash": {}, "technical": {"analysis_size": size}},
        "filters": {"min_side": size, "min_contrast": 0.03, "min_sharpness": 0.3, "near_duplicates": True,
                    # renders of one shape, colour and background are pHash neighbours without being copies
                    "near_duplicate_max_distance": 2},
        "balance": {"target_size": None},
    }, "experiment")
    ingest([str(haystack)], run_dir, shard_rows=cfg.ingest.shard_rows, thumbnail_size=cfg.ingest.thumbnail_size)
    score_run(run_dir, build_chain(dict(cfg.scorers)), backend="local")
    stats = run_select(run_dir, cfg)
    (run_dir / "select-stats.json").write_text(json.dumps(asdict(stats), indent=1, default=str))
    return RunLayout(run_dir).pool


def _truth_of_pool(pool: Path, haystack: Path) -> tuple[list[str], dict[str, dict]]:
    """Pool ids and, per id, its truth row (matched by the file name ingest keeps as source_key)."""
    table = read_columns(pool, [ID, SOURCE_KEY])
    truth = {r["file_name"]: r for r in read_truth(haystack).to_pylist()}
    ids = table[ID].to_pylist()
    return ids, {i: truth[Path(k).name] for i, k in zip(ids, table[SOURCE_KEY].to_pylist())}


def _rows(round_: Round, answers: list[tuple[str, str, dict]]) -> pa.Table:
    """ANNOTATIONS_SCHEMA rows of (pool id, annotator, answers), as pull_round writes them."""
    rows = [{ID: pid, S.TASK_ID: t, S.PROJECT_ID: 1, S.ANNOTATION_ID: n, S.ANNOTATOR: who,
             S.ANSWERS: json.dumps(a, sort_keys=True), S.DECISION: a.get(round_.decision_field), S.LEAD_TIME: None,
             S.CREATED_AT: None, S.IS_GOLD: False, S.GOLD_CORRECT: None, S.EXCLUSION_REASON: None}
            for n, (pid, who, a) in enumerate(answers) for t in [n // max(round_.overlap, 1)]]
    return pa.Table.from_pylist(rows, schema=S.ANNOTATIONS_SCHEMA)


def _noisy(rng: np.random.Generator, value: float, sd: float) -> float:
    return float(value + rng.normal(0.0, sd))


def generalist_answers(round_: Round, ids: list[str], truth: dict[str, dict], cfg: RoundsConfig) -> list:
    qs = np.sort([truth[i]["q"] for i in ids])[::-1]
    threshold = float(qs[min(len(qs) - 1, int(cfg.generalist_keep * cfg.generalist_target))])
    out = []
    for a in range(cfg.annotators):
        rng = np.random.default_rng([cfg.seed, 1, a])
        for i in ids:
            keep = _noisy(rng, truth[i]["q"], cfg.generalist_noise) >= threshold
            out.append((i, f"generalist-{a}@sim", {round_.decision_field: "keep" if keep else "reject"}))
    return out


def specialist_answers(round_: Round, ids: list[str], truth: dict[str, dict], cfg: RoundsConfig) -> list:
    qs = np.sort([truth[i]["q"] for i in ids])[::-1]
    threshold = float(qs[min(len(qs) - 1, int(cfg.specialist_select * cfg.specialist_target))])
    out = []
    for a in range(cfg.annotators):
        rng = np.random.default_rng([cfg.seed, 2, a])
        for i in ids:
            t = truth[i]
            noisy = {p: _noisy(rng, t[p], cfg.specialist_noise) for p in PARTS}
            select = float(np.mean(list(noisy.values()))) >= threshold  # unclipped: clipping would bias it down
            seen = {p: float(np.clip(v, 0, 1)) for p, v in noisy.items()}
            answers = {field: 1 + int(round(4 * seen[part])) for field, part in RATED_PART.items()}
            answers |= {"compelling_story": "yes" if seen["composition"] > 0.6 else "no",
                        "could_be_better": "yes" if seen["flaws"] < 0.8 or min(seen.values()) < 0.5 else "no",
                        "among_best": "yes" if select and min(seen.values()) > 0.7 else "no",
                        round_.decision_field: "select" if select else "reject"}
            if select:  # the specialist writes what is in the photo: the grammar's caption
                answers[round_.caption_field] = t["caption"]
            out.append((i, f"specialist-{a}@sim", answers))
    return out


def run_round(round_: Round, pool: Path, work: Path, answers: list) -> Path:
    layout = RoundLayout(work, round_.name)
    layout.root.mkdir(parents=True, exist_ok=True)
    pq.write_table(_rows(round_, answers), layout.annotations)
    return decide_round(round_, pool, work)


def curate(haystack: Path, work: Path, cfg: RoundsConfig, size: int) -> dict:
    """The whole curation: returns the stages' pools, the curated folder and mean true q per stage."""
    work = Path(work)
    pool = automatic_filters(Path(haystack), work / "pipeline", size)
    ids, truth = _truth_of_pool(pool, haystack)
    generalist = get_round("generalist", target_size=cfg.generalist_target, overlap=cfg.annotators)
    after_g = run_round(generalist, pool, work / "annotation", generalist_answers(generalist, ids, truth, cfg))
    g_ids, g_truth = _truth_of_pool(after_g, haystack)
    specialist = get_round("specialist", target_size=cfg.specialist_target, overlap=cfg.annotators)
    after_s = run_round(specialist, after_g, work / "annotation", specialist_answers(specialist, g_ids, g_truth, cfg))
    curated = export_curated(after_s, curated_dir(work / "annotation"))
    s_ids, s_truth = _truth_of_pool(after_s, haystack)
    all_q = read_truth(haystack).column("q").to_numpy()

    def mean_q(t: dict) -> float:
        return float(np.mean([r["q"] for r in t.values()])) if t else float("nan")

    return {"pool": str(pool), "generalist_pool": str(after_g), "specialist_pool": str(after_s),
            "curated": str(curated), "curated_files": [s_truth[i]["file_name"] for i in s_ids],
            "funnel": {"haystack": len(all_q), "automatic_filters": len(ids), "generalist": len(g_ids),
                       "specialist": len(s_ids)},
            "mean_q": {"haystack": float(all_q.mean()), "automatic_filters": mean_q(truth),
                       "generalist": mean_q(g_truth), "specialist": mean_q(s_truth)}}
