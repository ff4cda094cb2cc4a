"""Preference pairs for preference tuning (issue 15; pixel-space post-training §4: "5 images per prompt,
annotators select a positive and a negative; where flaws and appeal conflict, the image with the fewest
flaws is the positive").

A pairs Parquet (PAIRS_SCHEMA) holds one row per prompt: the winner's and the loser's image bytes, the
prompt, where the pair came from (``feedback``) and the votes behind it. Three sources, never mixed
silently (model/train_pref.py trains only on the sources its config lists):

- ``human``: the preference round in Label Studio (push_preference / pull_preference / export_pairs);
- ``ab_round``: the evaluation stage's A/B votes (ab_pairs: the checkpoint that won the pair by the
  plurality of valid votes is the winner);
- ``ai``: an automatic judge over the candidates of each prompt (judge_pairs; the pipeline's sharpness, the
  flaw proxy the evaluation stage reports), labelled AI feedback.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

from annotation.client import POOL_ID_KEY, LabelStudioClient, LabelStudioSettings
from annotation.rounds import AnnotationError, Control, RoundFiles, answers_from_result, read_controls, result_from_answers
from pipeline.schema import DETAIL, ID, QUARANTINE_SCHEMA, REASON, SOURCE, SOURCE_KEY

log = logging.getLogger(__name__)

Feedback = Literal["human", "ab_round", "ai"]
FEEDBACK: tuple[str, ...] = ("human", "ab_round", "ai")

PAIR_ID, PROMPT_ID, PROMPT = "pair_id", "prompt_id", "prompt"
WINNER_IMAGE, LOSER_IMAGE = "winner_image", "loser_image"  # encoded image bytes (PNG or JPEG)
WINNER_REF, LOSER_REF = "winner_ref", "loser_ref"  # where each image came from (a file path)
FEEDBACK_COL, JUDGE = "feedback", "judge"  # the source, and who judged (campaign, A/B criterion, judge name)
VOTES, WINNER_VOTES, LOSER_VOTES = "votes", "winner_votes", "loser_votes"
WINNER_SCORE, LOSER_SCORE = "winner_score", "loser_score"  # the automatic judge's scores (ai only)

PAIRS_SCHEMA = pa.schema([
    pa.field(PAIR_ID, pa.string(), nullable=False),
    pa.field(PROMPT_ID, pa.string(), nullable=False),
    pa.field(PROMPT, pa.string(), nullable=False),
    pa.field(WINNER_IMAGE, pa.binary(), nullable=False),
    pa.field(LOSER_IMAGE, pa.binary(), nullable=False),
    pa.field(WINNER_REF, pa.string()),
    pa.field(LOSER_REF, pa.string()),
    pa.field(FEEDBACK_COL, pa.string(), nullable=False),
    pa.field(JUDGE, pa.string(), nullable=False),
    pa.field(VOTES, pa.int32(), nullable=False),  # valid votes on the prompt's task (1 for a judge)
    pa.field(WINNER_VOTES, pa.int32(), nullable=False),  # of them, how many chose the winner as best
    pa.field(LOSER_VOTES, pa.int32(), nullable=False),  # and the loser as worst
    pa.field(WINNER_SCORE, pa.float32()),
    pa.field(LOSER_SCORE, pa.float32()),
])


def pair_id(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:16]


def write_pairs(rows: list[dict], out: Path) -> Path:
    """The pairs table at ``out`` (written whole, then renamed into place)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    pq.write_table(pa.Table.from_pylist(rows, schema=PAIRS_SCHEMA), tmp)
    tmp.replace(out)
    return out


def read_pairs(path: Path, feedback: list[str] | tuple[str, ...] = FEEDBACK, images: bool = True) -> pa.Table:
    """A pairs table, checked: its columns, and only the ``feedback`` sources in it; a pair of another
    source is an error naming the counts (AI feedback never trains a run that asked for human votes).
    ``images=False`` leaves the two image columns on disk (a million pairs' images do not fit in memory;
    model/train_pref.py streams them)."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"no preference pairs at {path} (python -m annotation pref-export, or judge_pairs)")
    names = pq.read_schema(path).names
    missing = [f.name for f in PAIRS_SCHEMA if f.name not in names]
    if missing:
        raise AnnotationError(f"{path} is not a preference pairs table: it lacks {missing}")
    table = pq.read_table(path, columns=None if images else [n for n in names if n not in (WINNER_IMAGE, LOSER_IMAGE)])
    counts = Counter(table.column(FEEDBACK_COL).to_pylist())
    other = {k: v for k, v in counts.items() if k not in feedback}
    if other:
        raise AnnotationError(f"{path} holds pairs of feedback {other} but this run takes only {list(feedback)}: "
                              f"list every source to mix them (preference.feedback)")
    if not table.num_rows:
        raise AnnotationError(f"{path} holds no pairs")
    return table


# -- AI feedback: an automatic judge over each prompt's candidates ------------------------------------------
def sharpness(image_bytes: bytes) -> float:
    """The pipeline's sharpness (variance of the Laplacian at the technical scorer's analysis size)."""
    from pipeline.scorers.technical import TechnicalOptions, sharpness_and_contrast

    return sharpness_and_contrast(image_bytes, TechnicalOptions().analysis_size)[0]


JUDGES = {"sharpness": sharpness}


def judge_pairs(candidates: Path | pa.Table, out: Path, judge: str = "sharpness") -> Path:
    """AI feedback: for each prompt of ``candidates`` (a generation manifest, RUN/generate, or any table
    with prompt_id, prompt, image_path), the candidate the judge scores highest is the winner and the
    lowest the loser. Prompts with fewer than two readable candidates, or whose candidates all score
    alike, go to ``out``'s sibling pairs-quarantine.parquet with the reason."""
    if judge not in JUDGES:
        raise AnnotationError(f"unknown judge {judge!r}; known: {sorted(JUDGES)}")
    table = candidates if isinstance(candidates, pa.Table) else _manifest(Path(candidates))
    missing = [c for c in (PROMPT_ID, PROMPT, "image_path") if c not in table.column_names]
    if missing:
        raise AnnotationError(f"the candidate table lacks the columns {missing}")
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for row in table.to_pylist():
        by_prompt[row[PROMPT_ID]].append(row)
    rows, quarantine = [], []
    for prompt_id, group in sorted(by_prompt.items()):
        scored = []
        for row in group:
            try:
                data = Path(row["image_path"]).read_bytes()
                scored.append((JUDGES[judge](data), row["image_path"], data))
            except Exception as error:  # a missing or undecodable image is quarantined with its reason
                quarantine.append({SOURCE: str(row["image_path"]), SOURCE_KEY: prompt_id, ID: None,
                                   REASON: "unreadable_image", DETAIL: str(error)})
        scored.sort(key=lambda s: s[0])
        if len(scored) < 2 or scored[0][0] == scored[-1][0]:
            quarantine.append({SOURCE: "candidates", SOURCE_KEY: prompt_id, ID: None, REASON: "no_preference",
                               DETAIL: f"{len(scored)} readable candidates, the judge cannot tell them apart"})
            continue
        (lo, lo_path, lo_data), (hi, hi_path, hi_data) = scored[0], scored[-1]
        rows.append({PAIR_ID: pair_id("ai", judge, prompt_id, hi_path, lo_path), PROMPT_ID: prompt_id,
                     PROMPT: group[0][PROMPT], WINNER_IMAGE: hi_data, LOSER_IMAGE: lo_data, WINNER_REF: str(hi_path),
                     LOSER_REF: str(lo_path), FEEDBACK_COL: "ai", JUDGE: judge, VOTES: 1, WINNER_VOTES: 1,
                     LOSER_VOTES: 1, WINNER_SCORE: hi, LOSER_SCORE: lo})
    _write_quarantine(quarantine, out)
    if not rows:
        raise AnnotationError(f"the judge {judge!r} made no pair from {table.num_rows} candidates")
    return write_pairs(rows, out)


def _manifest(generate_dir: Path) -> pa.Table:
    from model.evaluation.schema import read_manifest  # annotation/ reads the manifest only here and in abtest

    return read_manifest(generate_dir)


def _write_quarantine(rows: list[dict], out: Path) -> None:
    path = Path(out).with_name("pairs-quarantine.parquet")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA), path)
    if rows:
        log.warning("%d prompts or images made no pair: see %s", len(rows), path)


# -- the evaluation stage's A/B votes -----------------------------------------------------------------------
def ab_pairs(work: Path, criterion: str, out: Path) -> Path:
    """Pairs from an A/B round (RUN/ab, python -m annotation ab-pull): each comparison pair that one
    checkpoint won by the plurality of valid votes (annotation.abstats) becomes (winner, loser); ties and
    pairs without a valid vote make none."""
    from annotation import schema as S
    from annotation.abstats import pair_outcomes
    from annotation.abtest import get_criterion, read_pairs as read_ab_pairs
    from annotation.layout import ABLayout

    crit = get_criterion(criterion)
    layout = ABLayout(work, crit.name)
    if not layout.votes.exists():
        raise AnnotationError(f"no votes at {layout.votes}: pull the A/B round first (python -m annotation ab-pull)")
    shown = {p[S.PAIR_ID]: p for p in read_ab_pairs(work, crit).to_pylist() if p[S.KIND] == "comparison"}
    votes = [(r[S.PAIR_ID], r[S.ANNOTATOR], r[S.VOTE]) for r in pq.read_table(layout.votes).to_pylist()
             if r[S.EXCLUSION_REASON] is None and r[S.PAIR_ID] in shown]
    counts: dict[str, Counter] = defaultdict(Counter)
    for pid, _, vote in votes:
        counts[pid][vote] += 1
    rows = []
    for pid, outcome in sorted(pair_outcomes(votes, "plurality").items()):
        if outcome == "tie":
            continue
        p, other = shown[pid], "b" if outcome == "a" else "a"
        win, lose = p[S.IMAGE_A if outcome == "a" else S.IMAGE_B], p[S.IMAGE_A if other == "a" else S.IMAGE_B]
        rows.append({PAIR_ID: pair_id("ab", crit.name, pid), PROMPT_ID: p[S.PROMPT_ID], PROMPT: p[S.PROMPT],
                     WINNER_IMAGE: Path(win).read_bytes(), LOSER_IMAGE: Path(lose).read_bytes(), WINNER_REF: win,
                     LOSER_REF: lose, FEEDBACK_COL: "ab_round", JUDGE: f"ab-{crit.name}",
                     VOTES: sum(counts[pid].values()), WINNER_VOTES: counts[pid][outcome],
                     LOSER_VOTES: counts[pid][other], WINNER_SCORE: None, LOSER_SCORE: None})
    if not rows:
        raise AnnotationError(f"the A/B round {crit.name!r} in {work} has no pair won by either side")
    return write_pairs(rows, out)


# -- the preference round in Label Studio -------------------------------------------------------------------
class PreferenceRound(RoundFiles, BaseModel):
    """The best-and-worst-of-N round as data: what Label Studio shows (annotation/rounds/preference.xml and
    .html), the candidates per task, votes per task, and the gold threshold. Gold tasks hold a damaged copy
    of one candidate: its known answer is the worst."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "preference"
    label_config_file: str = "preference.xml"
    guideline_file: str = "preference.html"
    candidates: int = Field(5, ge=2)
    votes_per_task: int = Field(3, ge=1)
    min_gold_accuracy: float = Field(0.5, ge=0.0, le=1.0)
    decision_field: str = "best"  # curation's annotation rows record it as the decision
    worst_field: str = "worst"

    @cached_property
    def controls(self) -> dict[str, Control]:
        return read_controls(self.label_config)

    @model_validator(mode="after")
    def _config_matches(self) -> PreferenceRound:
        positions = tuple(str(i) for i in range(1, self.candidates + 1))
        for name in (self.decision_field, self.worst_field):
            control = self.controls.get(name)
            if control is None or control.choices != positions:
                raise ValueError(f"round {self.name!r}: {self.label_config_file} needs a Choices {name!r} of {positions}")
        for i in positions:
            if f"$image_{i}" not in self.label_config:
                raise ValueError(f"round {self.name!r}: {self.label_config_file} does not show $image_{i}")
        return self

    def answers_from_result(self, result: list[dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
        return answers_from_result(self.controls, result)

    def result_for(self, best: int, worst: int) -> list[dict[str, Any]]:
        """A Label Studio result choosing ``best`` and ``worst`` (1-based screen positions)."""
        answers = {self.decision_field: str(best), self.worst_field: str(worst)}
        return result_from_answers(self.controls, answers, f"round {self.name!r}")


PREFERENCE = PreferenceRound()

TASK_ID, KIND, GOLD_WORST = "task_id", "kind", "gold_worst"
BEST, WORST = "best", "worst"


def _image_columns(round_: PreferenceRound) -> list[str]:
    return [f"image_{i}" for i in range(1, round_.candidates + 1)]


def candidates_schema(round_: PreferenceRound) -> pa.Schema:
    return pa.schema([pa.field(TASK_ID, pa.string(), nullable=False), pa.field(KIND, pa.string(), nullable=False),
                      pa.field(PROMPT_ID, pa.string(), nullable=False), pa.field(PROMPT, pa.string(), nullable=False),
                      *[pa.field(c, pa.string(), nullable=False) for c in _image_columns(round_)],
                      pa.field(GOLD_WORST, pa.string())])


PREF_VOTES_SCHEMA = pa.schema([
    pa.field(TASK_ID, pa.string()), pa.field(KIND, pa.string()), pa.field(PROMPT_ID, pa.string()),
    pa.field("annotator", pa.string()), pa.field(BEST, pa.string()), pa.field(WORST, pa.string()),
    pa.field("ls_task_id", pa.int64()), pa.field("project_id", pa.int64()), pa.field("annotation_id", pa.int64()),
    pa.field("lead_time", pa.float64()), pa.field("exclusion_reason", pa.string()),
])


@dataclass(frozen=True)
class PreferenceLayout:
    """Where a preference round writes, ``work`` being RUN/preference-round:

        WORK/candidates.parquet             one task per prompt: the candidates in screen order, gold tasks
        WORK/candidates-quarantine.parquet  manifest rows or prompts that could not make a task, with a reason
        WORK/gold/                          the damaged copies gold tasks show
        WORK/votes.parquet                  every annotation pulled (PREF_VOTES_SCHEMA), kept or excluded
        WORK/summary.json                   counts, gold accuracy, agreement on best and on worst
        WORK/pairs.parquet                  the export: PAIRS_SCHEMA, feedback "human"
        WORK/pairs-quarantine.parquet       tasks that made no pair (tied votes, no valid vote), with a reason
    """

    work: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "work", Path(self.work))

    candidates = property(lambda self: self.work / "candidates.parquet")
    candidates_quarantine = property(lambda self: self.work / "candidates-quarantine.parquet")
    gold = property(lambda self: self.work / "gold")
    votes = property(lambda self: self.work / "votes.parquet")
    summary = property(lambda self: self.work / "summary.json")
    pairs = property(lambda self: self.work / "pairs.parquet")


def build_candidates(manifest: Path | pa.Table, work: Path, checkpoint: str | None = None,
                     round_: PreferenceRound = PREFERENCE, seed: int = 0, gold_fraction: float = 0.05,
                     damages: tuple[str, ...] = ("blur", "jpeg", "text")) -> Path:
    """A generation manifest (``python -m model generate --seeds 5`` of the current checkpoint) ->
    WORK/candidates.parquet: per prompt, ``round_.candidates`` images (the lowest seeds) in a seeded
    shuffled order; then gold tasks (``gold_fraction`` of them, at least one when > 0): a task's candidates
    with one replaced by a damaged copy of another, whose position is the known worst. Unusable images and
    prompts with too few candidates are quarantined with the reason."""
    import numpy as np
    from PIL import Image

    from annotation.abtest import CHECKPOINT, IMAGE, _count, _image_problem, _manifest_table, damage

    table = _manifest_table(manifest)
    labels = sorted(set(table.column(CHECKPOINT).to_pylist()))
    if checkpoint is None and len(labels) > 1:
        raise AnnotationError(f"the manifest holds checkpoints {labels}: name the one whose candidates to rank")
    checkpoint = checkpoint or labels[0]
    if checkpoint not in labels:
        raise AnnotationError(f"checkpoint {checkpoint!r} is not in the manifest; it holds {labels}")
    layout = PreferenceLayout(work)
    layout.work.mkdir(parents=True, exist_ok=True)
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    quarantine = []
    for row in sorted(table.to_pylist(), key=lambda r: (r[PROMPT_ID], r["seed"])):
        if row[CHECKPOINT] != checkpoint:
            continue
        problem = _image_problem(row[IMAGE])
        if problem:
            quarantine.append({SOURCE: str(row[IMAGE]), SOURCE_KEY: f"{row[PROMPT_ID]}/s{row['seed']}", ID: None,
                               REASON: problem[0], DETAIL: problem[1]})
        else:
            by_prompt[row[PROMPT_ID]].append(row)
    tasks = []
    for prompt_id, rows in sorted(by_prompt.items()):
        if len(rows) < round_.candidates:
            quarantine.append({SOURCE: "manifest", SOURCE_KEY: prompt_id, ID: None, REASON: "too_few_candidates",
                               DETAIL: f"{len(rows)} usable images, the round shows {round_.candidates}"})
            continue
        task_id = pair_id(round_.name, "candidates", checkpoint, prompt_id)
        order = np.random.default_rng(int(pair_id(seed, task_id)[:8], 16)).permutation(round_.candidates)
        images = [rows[i][IMAGE] for i in order]
        tasks.append({TASK_ID: task_id, KIND: "candidates", PROMPT_ID: prompt_id, PROMPT: rows[0][PROMPT],
                      **dict(zip(_image_columns(round_), images)), GOLD_WORST: None})
    pq.write_table(pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA), layout.candidates_quarantine)
    if not tasks:
        raise AnnotationError(f"no prompt has {round_.candidates} usable images of {checkpoint!r} "
                              f"(see {layout.candidates_quarantine})")
    rng = np.random.default_rng(seed)
    gold = []
    for i, index in enumerate(sorted(rng.choice(len(tasks), _count(gold_fraction, len(tasks)), replace=False))):
        shown = dict(tasks[index])
        columns = _image_columns(round_)
        target, source = rng.choice(len(columns), 2, replace=False)
        kind = damages[i % len(damages)]
        task_id = pair_id(round_.name, "gold", i, shown[PROMPT_ID], seed)
        wrong = layout.gold / f"{task_id}-{kind}.png"
        wrong.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(shown[columns[source]]) as image:
            damage(image.convert("RGB"), kind).save(wrong)
        gold.append({**shown, TASK_ID: task_id, KIND: "gold", columns[target]: str(wrong), GOLD_WORST: str(target + 1)})
    pq.write_table(pa.Table.from_pylist(tasks + gold, schema=candidates_schema(round_)), layout.candidates)
    log.info("%s: %d tasks, %d gold, %d quarantined", layout.candidates, len(tasks), len(gold), len(quarantine))
    return layout.candidates


def read_candidates(work: Path) -> pa.Table:
    path = PreferenceLayout(work).candidates
    if not path.exists():
        raise AnnotationError(f"no candidates at {path}: run build_candidates (python -m annotation pref-candidates) first")
    return pq.read_table(path)


def project_prefix(campaign: str, round_: PreferenceRound = PREFERENCE) -> str:
    return f"{campaign} · {round_.name} · "


def preference_projects(client: LabelStudioClient, campaign: str, round_: PreferenceRound = PREFERENCE) -> dict[str, int]:
    return dict(sorted(client.projects_titled(project_prefix(campaign, round_)).items(), key=lambda kv: kv[1]))


def push_preference(campaign: str, work: Path, settings: LabelStudioSettings,
                    round_: PreferenceRound = PREFERENCE) -> dict:
    """WORK/candidates.parquet -> one task per row in the project "<campaign> · preference · 1", each seen
    by ``round_.votes_per_task`` people. Images are copied into Label Studio's document root under
    content-hash names. Idempotent: a task id already on the server is not imported again."""
    import hashlib as _hashlib

    from annotation.curation import _check_campaign
    from annotation.images import original_image, write_once

    _check_campaign(campaign)
    rows = read_candidates(work).to_pylist()
    storage = settings.document_root / "needles" / campaign / round_.name
    with LabelStudioClient(settings) as client:
        client.wait_until_up()
        tasks = []
        for row in sorted(rows, key=lambda r: r[TASK_ID]):  # a hash order: gold tasks sit anywhere in the queue
            data = {POOL_ID_KEY: row[TASK_ID], PROMPT: row[PROMPT]}
            for column in _image_columns(round_):
                content, ext = original_image({"image_path": row[column]})
                digest = _hashlib.sha256(content).hexdigest()
                file = storage / digest[:2] / f"{digest}{ext}"
                write_once(file, content)
                data[column] = f"/data/local-files/?d={file.relative_to(settings.document_root).as_posix()}"
            tasks.append({"data": data})
        title = f"{project_prefix(campaign, round_)}1"
        project_id = client.ensure_project(title, round_.label_config, round_.guideline, round_.votes_per_task,
                                           f"needles: preference round of campaign {campaign}")
        client.ensure_local_storage(project_id, storage)
        known = set(client.pool_ids(project_id))
        created = client.import_new_tasks(project_id, tasks, known)
    return {"project_ids": [project_id], "tasks": len(tasks), "created": created, "already_present": len(known)}


def preference_status(campaign: str, settings: LabelStudioSettings, round_: PreferenceRound = PREFERENCE):
    """The round's progress from Label Studio's counters (curation.RoundStatus)."""
    from annotation.curation import counted_status

    with LabelStudioClient(settings) as client:
        return counted_status(client, round_.name, campaign, preference_projects(client, campaign, round_))


def pull_preference(campaign: str, work: Path, settings: LabelStudioSettings,
                    round_: PreferenceRound = PREFERENCE) -> Path:
    """Every annotation -> WORK/votes.parquet (curation's annotation rows: skipped, superseded and
    incomplete ones kept with their reason), plus ``best_is_worst`` for an answer naming one image twice
    and ``annotator_failed_gold`` for the other votes of an annotator whose accuracy on gold (the damaged
    image picked as worst) is below ``round_.min_gold_accuracy``; then WORK/summary.json."""
    from annotation import schema as S
    from annotation.agreement import gold_accuracy, round_agreement
    from annotation.curation import _annotation_rows

    candidates = {r[TASK_ID]: r for r in read_candidates(work).to_pylist()}
    with LabelStudioClient(settings) as client:
        projects = preference_projects(client, campaign, round_)
        if not projects:
            raise AnnotationError(f"no Label Studio project for the preference round of campaign {campaign!r}")
        annotations = _annotation_rows(client, round_, projects.values(), {})
    rows = []
    for a in annotations:
        answers = json.loads(a[S.ANSWERS])
        task = candidates.get(a[ID])
        reason = a[S.EXCLUSION_REASON]
        if reason is None and task is None:
            reason = "task_not_in_candidates"
        elif reason is None and answers.get(BEST) == answers.get(WORST):
            reason = "best_is_worst"
        rows.append({TASK_ID: a[ID], KIND: task[KIND] if task else None, PROMPT_ID: task[PROMPT_ID] if task else None,
                     "annotator": a[S.ANNOTATOR], BEST: answers.get(BEST), WORST: answers.get(WORST),
                     "ls_task_id": a[S.TASK_ID], "project_id": a[S.PROJECT_ID], "annotation_id": a[S.ANNOTATION_ID],
                     "lead_time": a[S.LEAD_TIME], "exclusion_reason": reason})
    gold = {t: r[GOLD_WORST] for t, r in candidates.items() if r[KIND] == "gold"}
    valid = [r for r in rows if r["exclusion_reason"] is None]
    accuracy = gold_accuracy([(r[TASK_ID], r["annotator"], r[WORST]) for r in valid if r[KIND] == "gold"], gold,
                             round_.min_gold_accuracy)
    flagged = {name for name, acc in accuracy.items() if acc.flagged}
    for r in rows:
        if r["exclusion_reason"] is None and r["annotator"] in flagged and r[KIND] != "gold":
            r["exclusion_reason"] = "annotator_failed_gold"
    layout = PreferenceLayout(work)
    pq.write_table(pa.Table.from_pylist(rows, schema=PREF_VOTES_SCHEMA), layout.votes)
    counted = [r for r in rows if r["exclusion_reason"] is None and r[KIND] == "candidates"]
    positions = [str(i) for i in range(1, round_.candidates + 1)]
    summary = {
        "round": round_.name, "campaign": campaign, "votes_per_task": round_.votes_per_task,
        "tasks": dict(Counter(r[KIND] for r in candidates.values())), "annotations": len(rows),
        "valid": len(counted), "excluded_by_reason": dict(Counter(r["exclusion_reason"] for r in rows
                                                                  if r["exclusion_reason"])),
        "gold_accuracy": {name: asdict(acc) for name, acc in accuracy.items()},
        "flagged_annotators": sorted(flagged),
        "agreement": {field: round_agreement([(r[TASK_ID], r["annotator"], r[field]) for r in counted],
                                             positions).to_dict() for field in (BEST, WORST)},
    }
    layout.summary.write_text(json.dumps(summary, indent=2, sort_keys=True))
    log.info("%s: %d annotations, %d valid, flagged %s", layout.votes, len(rows), len(counted), sorted(flagged))
    return layout.votes


def export_pairs(work: Path, campaign: str, out: Path | None = None) -> Path:
    """WORK/votes.parquet -> the pairs table (WORK/pairs.parquet or ``out``): per candidates task, the
    plurality's best is the winner and the plurality's worst the loser (feedback "human"). A task whose top
    count is shared, whose best and worst pluralities name one image, or without a valid vote makes no pair:
    WORK/pairs-quarantine.parquet says which and why."""
    layout = PreferenceLayout(work)
    if not layout.votes.exists():
        raise AnnotationError(f"no votes at {layout.votes}: run pull_preference (python -m annotation pref-pull) first")
    votes = [r for r in pq.read_table(layout.votes).to_pylist() if r["exclusion_reason"] is None]
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in votes:
        by_task[r[TASK_ID]].append(r)
    rows, quarantine = [], []
    for task in read_candidates(work).to_pylist():
        if task[KIND] != "candidates":
            continue
        mine = by_task.get(task[TASK_ID], [])
        best, worst = Counter(r[BEST] for r in mine).most_common(), Counter(r[WORST] for r in mine).most_common()
        problem = ("no_valid_vote" if not mine else
                   "tied_votes" if (len(best) > 1 and best[0][1] == best[1][1]) or
                                   (len(worst) > 1 and worst[0][1] == worst[1][1]) else
                   "best_is_worst" if best[0][0] == worst[0][0] else None)
        if problem:
            quarantine.append({SOURCE: str(layout.votes), SOURCE_KEY: task[PROMPT_ID], ID: task[TASK_ID],
                               REASON: problem, DETAIL: f"best votes {dict(best)}, worst votes {dict(worst)}"})
            continue
        win, lose = task[f"image_{best[0][0]}"], task[f"image_{worst[0][0]}"]
        rows.append({PAIR_ID: pair_id("human", campaign, task[TASK_ID]), PROMPT_ID: task[PROMPT_ID],
                     PROMPT: task[PROMPT], WINNER_IMAGE: Path(win).read_bytes(), LOSER_IMAGE: Path(lose).read_bytes(),
                     WINNER_REF: win, LOSER_REF: lose, FEEDBACK_COL: "human", JUDGE: f"preference:{campaign}",
                     VOTES: len(mine), WINNER_VOTES: best[0][1], LOSER_VOTES: worst[0][1],
                     WINNER_SCORE: None, LOSER_SCORE: None})
    out = Path(out) if out else layout.pairs
    _write_quarantine(quarantine, out)
    if not rows:
        raise AnnotationError(f"no task of {work} made a pair (see {out.with_name('pairs-quarantine.parquet')})")
    return write_pairs(rows, out)


# -- simulated rankers: FOR DEMOS AND TESTS ONLY, never for a real round ------------------------------------
@dataclass
class SharpnessRanker:
    """DEMO/TEST ONLY: a real Label Studio user (dev mode, annotation.simulated.scripted_user) that works
    through the round's labeling stream as the UI does, downloads the task's images through Label Studio
    and picks the sharpest as best and the blurriest as worst (``contrarian`` swaps them: it fails gold)."""

    email: str
    password: str = field(repr=False)
    contrarian: bool = False
    lead_time_s: float = 4.0

    def rank(self, admin: LabelStudioClient, campaign: str, round_: PreferenceRound = PREFERENCE) -> int:
        from annotation.abtest import _download
        from annotation.simulated import scripted_user

        done = 0
        with scripted_user(admin, self.email, self.password) as me:
            for project_id in preference_projects(admin, campaign, round_).values():
                while (task := me.next_task(project_id)) is not None:
                    scores = [sharpness(_download(me, task["data"][c])) for c in _image_columns(round_)]
                    order = sorted(range(len(scores)), key=scores.__getitem__)
                    best, worst = order[-1] + 1, order[0] + 1
                    if self.contrarian:
                        best, worst = worst, best
                    me.submit_annotation(task["id"], round_.result_for(best, worst), self.lead_time_s)
                    done += 1
        return done


def simulate_preference(admin: LabelStudioClient, campaign: str, rankers: int, contrarians: int = 0,
                        round_: PreferenceRound = PREFERENCE) -> dict[str, int]:
    """DEV MODE ONLY (NEEDLES_DEV=1): new scripted users (pref-ranker-N-<random tag>@needles.local, random
    passwords) rank every open task by sharpness; the last ``contrarians`` of them rank it backwards."""
    from annotation.client import require_dev_mode
    from annotation.simulated import one_time_password, run_tag

    require_dev_mode("annotator_mode=simulated (scripted rankers)")
    tag = run_tag()
    done = {}
    for i in range(rankers):
        ranker = SharpnessRanker(f"pref-ranker-{i + 1}-{tag}@needles.local", one_time_password(),
                                 contrarian=i >= rankers - contrarians)
        done[ranker.email] = ranker.rank(admin, campaign, round_)
    return done


# -- command line (python -m annotation pref-*) -------------------------------------------------------------
COMMANDS = {
    "pref-candidates": "generation manifest (5 seeds per prompt) -> WORK/candidates.parquet (shuffled, gold tasks)",
    "pref-push": "candidates -> tasks in '<campaign> · preference · 1' (idempotent)",
    "pref-status": "counts and remaining (JSON)",
    "pref-pull": "annotations -> WORK/votes.parquet and summary.json (gold accuracy, agreement on best and worst)",
    "pref-export": "votes -> the pairs Parquet (feedback human)",
    "pref-judge": "AI feedback: an automatic judge picks best and worst of each prompt's candidates -> pairs",
    "pref-from-ab": "an A/B round's votes (RUN/ab/<A>-vs-<B>) -> pairs (feedback ab_round)",
    "pref-simulate": "DEV MODE ONLY: scripted rankers pick the sharpest as best and the blurriest as worst",
}


def add_commands(sub) -> None:
    for name, help_ in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        p.add_argument("--work", type=Path, default=Path("runs/preference-round"), help="the round's work folder")
        p.add_argument("--campaign", default="needles", help="names the Label Studio project (1-30 chars)")
        p.add_argument("--votes-per-task", type=int, default=PREFERENCE.votes_per_task)
    sub.choices["pref-candidates"].add_argument("--generate", type=Path, required=True, help="RUN/generate")
    sub.choices["pref-candidates"].add_argument("--checkpoint", help="its label in the manifest (when several)")
    sub.choices["pref-candidates"].add_argument("--gold-fraction", type=float, default=0.05)
    sub.choices["pref-judge"].add_argument("--generate", type=Path, required=True, help="RUN/generate")
    sub.choices["pref-judge"].add_argument("--judge", choices=sorted(JUDGES), default="sharpness")
    sub.choices["pref-from-ab"].add_argument("--ab", type=Path, required=True, help="RUN/ab/<candidate>-vs-<baseline>")
    sub.choices["pref-from-ab"].add_argument("--criterion", default="flaws")
    for name in ("pref-export", "pref-judge", "pref-from-ab"):
        sub.choices[name].add_argument("--out", type=Path, help="the pairs Parquet (default: WORK/pairs.parquet)")
    sub.choices["pref-simulate"].add_argument("--rankers", type=int, default=3)


def run_command(args) -> int:
    """One pref-* command; a user error prints one line and returns 2."""
    import sys

    from pipeline.errors import UserError

    round_ = PreferenceRound(votes_per_task=args.votes_per_task)
    out = getattr(args, "out", None) or PreferenceLayout(args.work).pairs
    try:
        if args.command == "pref-candidates":
            print(build_candidates(args.generate, args.work, args.checkpoint, round_, gold_fraction=args.gold_fraction))
        elif args.command == "pref-judge":
            print(judge_pairs(args.generate, out, args.judge))
        elif args.command == "pref-from-ab":
            print(ab_pairs(args.ab, args.criterion, out))
        elif args.command == "pref-export":
            print(export_pairs(args.work, args.campaign, out))
        else:
            settings = LabelStudioSettings.from_env()
            if args.command == "pref-push":
                print(json.dumps(push_preference(args.campaign, args.work, settings, round_), indent=2))
            elif args.command == "pref-status":
                print(json.dumps(preference_status(args.campaign, settings, round_).to_dict(), indent=2))
            elif args.command == "pref-pull":
                pull_preference(args.campaign, args.work, settings, round_)
                print(PreferenceLayout(args.work).summary.read_text())
            else:
                with LabelStudioClient(settings) as admin:
                    print(json.dumps(simulate_preference(admin, args.campaign, args.rankers, round_=round_), indent=2))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
