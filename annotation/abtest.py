"""Human A/B rounds of the evaluation stage in Label Studio (issue 10): did quality-tuning help?

Images of two checkpoints for the same prompt and seed are shown side by side, and people choose. The
criteria, as data (like the curation rounds):

- ``appeal`` (Emu §4): prompt hidden; which image is more visually appealing: Left / Tie / Right; 5 votes.
- ``faithfulness`` (Emu §4): prompt shown; which image the prompt describes best: A / B / Both / Neither,
  where "Both" and "Neither" count as a tie; 3 votes.
- ``flaws`` (pixel-space post-training §4.1): prompt hidden; which image has fewer visual flaws; 5 votes.

The functions a CLI or a flow calls with paths (``work`` is RUN/ab; annotation.layout.ABLayout names the files):

    build_pairs(manifest, a, b, criterion, work)   -> pairs.parquet: comparisons, gold pairs, swapped repeats
    push_ab(criterion, campaign, work, settings)    -> ABPushResult (Label Studio project ids)
    ab_status(criterion, campaign, settings)        -> RoundStatus (counts, remaining, complete)
    wait_for_ab(criterion, campaign, settings, ...) -> RoundStatus once every pair has its votes
    pull_ab(criterion, campaign, work, settings)    -> votes.parquet: every annotation, kept or excluded
    summarise_ab(criterion, work)                   -> summary.json: both aggregation rules (annotation.abstats),
                                                       gold accuracy, repeat consistency, position bias, kappa

They reuse curation's machinery: one client, tasks keyed on the pair id through ``client.POOL_ID_KEY`` (so a
re-push imports only what is missing), images copied into Label Studio's document root under content-hash
names (they reveal no checkpoint), the project counters for status, and curation's annotation rows
(skipped and superseded annotations are rows with a reason, never dropped).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from pydantic import BaseModel, ConfigDict, Field, model_validator

from annotation import schema as S
from annotation.abstats import (
    OUTCOMES,
    comparison_summary,
    pair_outcomes,
    position_bias,
    repeat_consistency,
    to_vote,
)
from annotation.agreement import GoldAccuracy, gold_accuracy, round_agreement
from annotation.client import POOL_ID_KEY, LabelStudioClient, LabelStudioSettings, batched, require_dev_mode
from annotation.curation import (
    IMPORT_BATCH,
    MAX_TASKS_PER_PROJECT,
    RoundStatus,
    _annotation_rows,
    _check_campaign,
    add_per_annotator,
    counted_status,
)
from annotation.images import NoImage, original_image, write_once
from annotation.layout import ABLayout
from annotation.rounds import AnnotationError, Control, RoundFiles, answers_from_result, read_controls, result_from_answers
from annotation.simulated import one_time_password, run_tag, scripted_user
from pipeline.schema import DETAIL, ID, IMAGE_PATH, QUARANTINE_SCHEMA, REASON, SOURCE, SOURCE_KEY
from pipeline.scorers.technical import TechnicalOptions, sharpness_and_contrast

log = logging.getLogger(__name__)

Side = Literal["left", "right", "tie"]
#: Label Studio caps project titles at 50 characters.
MAX_TITLE = 50
#: the visual flaws a gold pair's damaged side gets, in turn (issue 10: blurred, JPEG-damaged, overlaid text)
DAMAGES = ("blur", "jpeg", "text")
CHECKPOINT, IMAGE = "checkpoint", "image_path"  # manifest columns (model/evaluation/schema.py)


# -- criteria as data ---------------------------------------------------------------------------------------
class Criterion(RoundFiles, BaseModel):
    """One A/B question: what Label Studio shows (label config and guideline under annotation/rounds/), how
    many people vote on each pair, what each choice means in screen terms, and how gold pairs are made."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    label_config_file: str
    guideline_file: str
    votes_per_pair: int = Field(ge=1)  # Label Studio's maximum_annotations
    show_prompt: bool
    #: Label Studio choice value -> side; Emu §4: "Both" and "Neither" count as a tie
    sides: dict[str, Side]
    #: gold pairs: "damaged" (a generated image vs a damaged copy of it) or "other_prompt" (the prompt's
    #: image vs the image of a different prompt); the answer is the undamaged / matching side
    gold: Literal["damaged", "other_prompt"]
    #: annotators whose accuracy on gold pairs is below this are flagged and their other votes excluded
    min_gold_accuracy: float = Field(default=0.5, ge=0.0, le=1.0)
    #: Playground v2.5: a pair is won only by a margin of at least this many votes (the "margin" rule)
    margin: int = Field(default=2, ge=1)
    decision_field: str = "choice"  # the Choices control of the label config

    @property
    def round_name(self) -> str:
        """Names the Label Studio projects ("<campaign> · ab-<criterion> · <part>") and the image folder."""
        return f"ab-{self.name}"

    @cached_property
    def controls(self) -> dict[str, Control]:
        controls = read_controls(self.label_config)
        decision = controls.get(self.decision_field)
        if decision is None or decision.tag != "Choices":
            raise ValueError(f"criterion {self.name!r}: no Choices {self.decision_field!r} in {self.label_config_file}")
        return controls

    @property
    def choices(self) -> tuple[str, ...]:
        return self.controls[self.decision_field].choices

    @model_validator(mode="after")
    def _config_matches(self) -> Criterion:
        if set(self.choices) != set(self.sides):
            raise ValueError(f"criterion {self.name!r}: sides {sorted(self.sides)} differ from the choices "
                             f"{sorted(self.choices)} of {self.label_config_file}")
        if ("$prompt" in self.label_config) != self.show_prompt:
            raise ValueError(f"criterion {self.name!r}: show_prompt={self.show_prompt} but "
                             f"{self.label_config_file} {'lacks' if self.show_prompt else 'shows'} $prompt")
        return self

    def choice_for(self, side: Side) -> str:
        """The first choice meaning ``side`` (faithfulness: a tie is "Both")."""
        return next(choice for choice in self.choices if self.sides[choice] == side)

    # The method curation's annotation rows read answers with (the same contract as rounds.Round).
    def answers_from_result(self, result: list[dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
        return answers_from_result(self.controls, result)

    def result_for(self, choice: str) -> list[dict[str, Any]]:
        """A Label Studio result list choosing ``choice``, as the labeling UI submits it."""
        return result_from_answers(self.controls, {self.decision_field: choice}, f"criterion {self.name!r}")


APPEAL = Criterion(
    name="appeal", label_config_file="ab_appeal.xml", guideline_file="ab_appeal.html", votes_per_pair=5,
    show_prompt=False, sides={"Left": "left", "Tie": "tie", "Right": "right"}, gold="damaged",
)
FAITHFULNESS = Criterion(
    name="faithfulness", label_config_file="ab_faithfulness.xml", guideline_file="ab_faithfulness.html",
    votes_per_pair=3, show_prompt=True, sides={"A": "left", "B": "right", "Both": "tie", "Neither": "tie"},
    gold="other_prompt",
)
FLAWS = Criterion(
    name="flaws", label_config_file="ab_flaws.xml", guideline_file="ab_flaws.html", votes_per_pair=5,
    show_prompt=False, sides={"Left": "left", "Tie": "tie", "Right": "right"}, gold="damaged",
)
CRITERIA: dict[str, Criterion] = {c.name: c for c in (APPEAL, FAITHFULNESS, FLAWS)}


def get_criterion(name: str, votes_per_pair: int | None = None) -> Criterion:
    """A criterion by name, with its votes per pair replaced when given."""
    if name not in CRITERIA:
        raise AnnotationError(f"unknown A/B criterion {name!r}; known: {sorted(CRITERIA)}")
    base = CRITERIA[name]
    return base if votes_per_pair is None else Criterion(**{**base.model_dump(), "votes_per_pair": votes_per_pair})


# -- pairs --------------------------------------------------------------------------------------------------
def _digest(*parts: Any) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()


def _left(seed: int, pair_id: str) -> str:
    """The seeded coin flip of one pair: which checkpoint is shown on the left."""
    return "a" if int(_digest(seed, pair_id)[:8], 16) % 2 == 0 else "b"


def damage(image: Image.Image, kind: str) -> Image.Image:
    """A copy of ``image`` with a flaw every careful annotator sees: the known answer of a gold pair."""
    side = max(image.size)
    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(side / 40))
    if kind == "jpeg":
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=5)  # 8x8 blocks and colour smears
        return Image.open(buffer).convert("RGB")
    if kind == "text":
        damaged = image.copy()
        draw = ImageDraw.Draw(damaged)
        font = ImageFont.load_default(size=max(side // 8, 10))
        for line in range(4):
            draw.text((side // 40, line * image.size[1] // 4), "SAMPLE TEXT", font=font, fill=(255, 255, 0),
                      stroke_width=max(side // 200, 1), stroke_fill=(0, 0, 0))
        return damaged
    raise AnnotationError(f"unknown damage {kind!r}; known: {DAMAGES}")


def _image_problem(path: str | None) -> tuple[str, str] | None:
    """(reason, detail) when the image cannot be shown, else None."""
    if not path or not Path(path).is_file():
        return "missing_image", f"no file at {path}"
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # PIL raises many kinds for a damaged file
        return "unreadable_image", f"{path}: {error}"
    return None


def _manifest_table(manifest: Path | pa.Table) -> pa.Table:
    if isinstance(manifest, pa.Table):
        table = manifest
    else:
        # Imported here: annotation/ reads the generation manifest only in this step.
        from model.evaluation.schema import read_manifest

        table = read_manifest(Path(manifest))
    needed = [S.PROMPT_ID, S.PROMPT, S.CATEGORY, S.SEED, CHECKPOINT, IMAGE]
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise AnnotationError(f"the generation manifest lacks the columns {missing}")
    return table


def build_pairs(
    manifest: Path | pa.Table,
    checkpoint_a: str,
    checkpoint_b: str,
    criterion: Criterion,
    work: Path,
    seed: int = 0,
    gold_fraction: float = 0.05,
    repeat_fraction: float = 0.05,
    damages: Sequence[str] = DAMAGES,
) -> Path:
    """The generation manifest (RUN/generate, or its table with absolute image paths) -> WORK/<criterion>/
    pairs.parquet: one comparison pair per (prompt_id, seed) both checkpoints have, A the candidate and B
    the baseline, the left side a seeded coin flip per pair; then gold pairs (``gold_fraction`` of the
    comparisons, at least one when > 0: a damaged copy against the original, or for faithfulness the
    prompt's image against another prompt's image) and repeats (``repeat_fraction``, at least one when > 0:
    a comparison shown again with the sides swapped). Manifest rows that cannot make a pair (image missing
    or unreadable, or its partner's) go to pairs-quarantine.parquet with the reason.
    """
    if checkpoint_a == checkpoint_b:
        raise AnnotationError(f"an A/B round needs two different checkpoints, got {checkpoint_a!r} twice")
    for name, fraction in (("gold_fraction", gold_fraction), ("repeat_fraction", repeat_fraction)):
        if not 0 <= fraction <= 1:
            raise AnnotationError(f"{name} must be within [0, 1], got {fraction}")
    table = _manifest_table(manifest)
    labels = set(table.column(CHECKPOINT).to_pylist())
    for label in (checkpoint_a, checkpoint_b):
        if label not in labels:
            raise AnnotationError(f"checkpoint {label!r} is not in the manifest; it holds {sorted(labels)}")

    quarantine: list[dict] = []
    images: dict[str, dict[tuple[str, int], dict]] = {checkpoint_a: {}, checkpoint_b: {}}
    bad: dict[str, dict[tuple[str, int], dict]] = {checkpoint_a: {}, checkpoint_b: {}}
    for row in table.to_pylist():
        if row[CHECKPOINT] not in images:
            continue
        key = (row[S.PROMPT_ID], int(row[S.SEED]))
        problem = _image_problem(row[IMAGE])
        if key in images[row[CHECKPOINT]] or key in bad[row[CHECKPOINT]]:
            problem = ("duplicate_image", f"a second image of {key} for checkpoint {row[CHECKPOINT]!r}")
        if problem:
            quarantine.append(_quarantine_row(row, *problem))
            bad[row[CHECKPOINT]].setdefault(key, row)
        else:
            images[row[CHECKPOINT]][key] = row
    keys = sorted(set(images[checkpoint_a]) & set(images[checkpoint_b]))
    for label, other in ((checkpoint_a, checkpoint_b), (checkpoint_b, checkpoint_a)):
        for key in sorted(set(images[label]) - set(keys)):
            why = "partner_image_unusable" if key in bad[other] else "no_partner_image"
            detail = f"checkpoint {other!r} has no usable image of {key}"
            quarantine.append(_quarantine_row(images[label][key], why, detail))
    layout = ABLayout(work, criterion.name)
    layout.root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA), layout.pairs_quarantine)
    if quarantine:
        log.warning("%d manifest rows could not make a pair: see %s", len(quarantine), layout.pairs_quarantine)
    if not keys:
        raise AnnotationError(f"no (prompt_id, seed) has a usable image for both {checkpoint_a!r} and {checkpoint_b!r}")

    comparisons = []
    for prompt_id, image_seed in keys:
        a, b = images[checkpoint_a][(prompt_id, image_seed)], images[checkpoint_b][(prompt_id, image_seed)]
        pair_id = _digest(criterion.name, "comparison", checkpoint_a, checkpoint_b, prompt_id, image_seed)[:16]
        comparisons.append(
            _pair(pair_id, "comparison", a, checkpoint_a, checkpoint_b, a[IMAGE], b[IMAGE], _left(seed, pair_id)))
    rng = np.random.default_rng(seed)
    n_gold = _count(gold_fraction, len(comparisons))
    gold = _gold_pairs(comparisons, images, n_gold, criterion, layout, rng, seed, damages)
    repeats = []
    for index in sorted(rng.choice(len(comparisons), _count(repeat_fraction, len(comparisons)), replace=False)):
        original = comparisons[index]
        pair_id = _digest(criterion.name, "repeat", original[S.PAIR_ID])[:16]
        repeat = {**original, S.PAIR_ID: pair_id, S.KIND: "repeat", S.REPEAT_OF: original[S.PAIR_ID]}
        repeat[S.LEFT] = "b" if original[S.LEFT] == "a" else "a"  # the sides swapped
        repeats.append(repeat)
    pq.write_table(pa.Table.from_pylist(comparisons + gold + repeats, schema=S.PAIRS_SCHEMA), layout.pairs)
    log.info("%s: %d comparisons, %d gold, %d repeats", layout.pairs, len(comparisons), len(gold), len(repeats))
    return layout.pairs


def _count(fraction: float, n: int) -> int:
    return 0 if fraction == 0 else min(n, max(1, round(fraction * n)))


def _pair(pair_id: str, kind: str, prompt_row: dict, checkpoint_a: str, checkpoint_b: str, image_a: str,
          image_b: str, left: str, gold_answer: str | None = None) -> dict:
    return {
        S.PAIR_ID: pair_id, S.KIND: kind, S.PROMPT_ID: prompt_row[S.PROMPT_ID], S.PROMPT: prompt_row[S.PROMPT],
        S.CATEGORY: prompt_row[S.CATEGORY], S.SEED: int(prompt_row[S.SEED]), S.CHECKPOINT_A: checkpoint_a,
        S.CHECKPOINT_B: checkpoint_b, S.IMAGE_A: image_a, S.IMAGE_B: image_b, S.LEFT: left,
        S.GOLD_ANSWER: gold_answer, S.REPEAT_OF: None,
    }


def _gold_pairs(comparisons: list[dict], images: dict, n: int, criterion: Criterion, layout: ABLayout,
                rng: np.random.Generator, seed: int, damages: Sequence[str]) -> list[dict]:
    """Pairs with a known answer: the undamaged image against a damaged copy of it, or (faithfulness) the
    prompt's image against the image of another prompt from the same checkpoint."""
    if n and criterion.gold == "other_prompt" and len({c[S.PROMPT_ID] for c in comparisons}) < 2:
        raise AnnotationError("faithfulness gold pairs need at least two prompts (an image of another prompt)")
    gold = []
    for i, index in enumerate(sorted(rng.choice(len(comparisons), n, replace=False))):
        shown = comparisons[index]
        label = shown[S.CHECKPOINT_A] if rng.integers(2) == 0 else shown[S.CHECKPOINT_B]
        source = images[label][(shown[S.PROMPT_ID], shown[S.SEED])]
        answer = "a" if rng.integers(2) == 0 else "b"
        pair_id = _digest(criterion.name, "gold", i, shown[S.PROMPT_ID], shown[S.SEED], seed)[:16]
        if criterion.gold == "damaged":
            kind = damages[i % len(damages)]
            wrong = layout.gold_images / f"{pair_id}-{kind}.png"
            wrong.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(source[IMAGE]) as image:
                damage(image.convert("RGB"), kind).save(wrong)
            wrong_image = str(wrong)
        else:
            others = [c for c in comparisons if c[S.PROMPT_ID] != shown[S.PROMPT_ID]]
            other = others[rng.integers(len(others))]
            wrong_image = images[label][(other[S.PROMPT_ID], other[S.SEED])][IMAGE]
        right_image = source[IMAGE]
        image_a, image_b = (right_image, wrong_image) if answer == "a" else (wrong_image, right_image)
        gold.append(_pair(pair_id, "gold", source, label, label, image_a, image_b, _left(seed, pair_id), answer))
    return gold


def _quarantine_row(row: dict, reason: str, detail: str) -> dict:
    return {
        SOURCE: row.get(IMAGE) or "manifest",
        SOURCE_KEY: f"{row[CHECKPOINT]}/{row[S.PROMPT_ID]}/s{row[S.SEED]}",
        ID: None,
        REASON: reason,
        DETAIL: detail,
    }


def read_pairs(work: Path, criterion: Criterion) -> pa.Table:
    path = ABLayout(work, criterion.name).pairs
    if not path.exists():
        raise AnnotationError(f"no pairs table at {path}: run build_pairs (python -m annotation ab-pairs) first")
    return pq.read_table(path)


# -- push ---------------------------------------------------------------------------------------------------
@dataclass
class ABPushResult:
    project_ids: list[int]
    tasks: int  # pairs that became tasks
    created: int  # imported by this push
    already_present: int  # found on the server already (an earlier or interrupted push)
    quarantined: int  # pairs that could not become tasks (see push-quarantine.parquet)


def project_prefix(campaign: str, criterion: Criterion) -> str:
    return f"{campaign} · {criterion.round_name} · "


def ab_projects(client: LabelStudioClient, campaign: str, criterion: Criterion) -> dict[str, int]:
    return dict(sorted(client.projects_titled(project_prefix(campaign, criterion)).items(), key=lambda kv: kv[1]))


def image_dir(settings: LabelStudioSettings, campaign: str, criterion: Criterion) -> Path:
    return settings.document_root / "needles" / campaign / criterion.round_name


def _task(pair: dict, criterion: Criterion, storage: Path, document_root: Path) -> dict:
    """A pair's task: its id, the two images in screen order (named by content hash) and the prompt when
    the criterion shows it; nothing says which checkpoint is where."""
    urls = {}
    on_screen = (S.IMAGE_A, S.IMAGE_B) if pair[S.LEFT] == "a" else (S.IMAGE_B, S.IMAGE_A)
    for side, column in zip(("left", "right"), on_screen):
        data, ext = original_image({IMAGE_PATH: pair[column]})
        digest = hashlib.sha256(data).hexdigest()
        file = storage / digest[:2] / f"{digest}{ext}"
        write_once(file, data)
        urls[f"image_{side}"] = f"/data/local-files/?d={file.relative_to(document_root).as_posix()}"
    data = {POOL_ID_KEY: pair[S.PAIR_ID], **urls}
    if criterion.show_prompt:
        data["prompt"] = pair[S.PROMPT]
    return {"data": data}


def push_ab(
    criterion: Criterion,
    campaign: str,
    work: Path,
    settings: LabelStudioSettings,
    max_tasks_per_project: int = MAX_TASKS_PER_PROJECT,
    batch_size: int = IMPORT_BATCH,
) -> ABPushResult:
    """WORK/<criterion>/pairs.parquet -> one task per pair in projects "<campaign> · ab-<criterion> · <part>",
    each pair seen by ``criterion.votes_per_pair`` people (Label Studio's overlap).

    Idempotent: a pair id already in any project of the criterion is not imported again. Tasks go in
    pair-id order, a hash, so gold pairs and repeats sit at random places in the queue.
    """
    _check_campaign(campaign)
    pairs = read_pairs(work, criterion).to_pylist()
    longest = f"{project_prefix(campaign, criterion)}{math.ceil(len(pairs) / max_tasks_per_project)}"
    if len(longest) > MAX_TITLE:
        raise AnnotationError(f"project title {longest!r} is {len(longest)} characters, over Label Studio's "
                              f"{MAX_TITLE}: use a campaign name of at most {len(campaign) - len(longest) + MAX_TITLE}")
    with LabelStudioClient(settings) as client:
        client.wait_until_up()
        layout = ABLayout(work, criterion.name)
        storage = image_dir(settings, campaign, criterion)
        tasks, quarantine = [], []
        for pair in sorted(pairs, key=lambda p: p[S.PAIR_ID]):
            try:
                tasks.append(_task(pair, criterion, storage, settings.document_root))
            except NoImage as error:
                quarantine.append({SOURCE: str(layout.pairs), SOURCE_KEY: pair[S.PAIR_ID], ID: pair[S.PAIR_ID],
                                   REASON: "no_image", DETAIL: str(error)})
        pq.write_table(pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA), layout.push_quarantine)
        if quarantine:
            log.warning("%d pairs could not become tasks: see %s", len(quarantine), layout.push_quarantine)
        if not tasks:
            raise AnnotationError(f"{layout.pairs} gave no task (quarantined: {len(quarantine)})")

        # What the server already holds: the idempotency check of the whole push.
        known = set().union(*(client.pool_ids(pid) for pid in ab_projects(client, campaign, criterion).values()))
        already = len(known)
        project_ids, created = [], 0
        n_projects = math.ceil(len(tasks) / max_tasks_per_project)
        for part, start in enumerate(range(0, len(tasks), max_tasks_per_project)):
            title = f"{project_prefix(campaign, criterion)}{part + 1}"
            project_id = client.ensure_project(
                title, criterion.label_config, criterion.guideline, criterion.votes_per_pair,
                f"needles: A/B {criterion.name} round of campaign {campaign}, part {part + 1} of {n_projects}",
            )
            client.ensure_local_storage(project_id, storage)
            project_ids.append(project_id)
            for batch in batched(tasks[start : start + max_tasks_per_project], batch_size):
                created += client.import_new_tasks(project_id, batch, known)
            log.info("project %s (%d): %d tasks", title, project_id, min(max_tasks_per_project, len(tasks) - start))
        return ABPushResult(project_ids, len(tasks), created, already, len(quarantine))


# -- status ---------------------------------------------------------------------------------------------
def ab_status(
    criterion: Criterion, campaign: str, settings: LabelStudioSettings, work: Path | None = None
) -> RoundStatus:
    """Counts from Label Studio's project counters (a pair is finished with ``votes_per_pair`` votes; a
    skip does not count, so Label Studio gives the pair to someone else); with ``work``, also per
    annotator (votes, skips, gold accuracy and flag) from the annotations."""
    with LabelStudioClient(settings) as client:
        return client_ab_status(client, criterion, campaign, work)


def client_ab_status(client: LabelStudioClient, criterion: Criterion, campaign: str,
                     work: Path | None = None) -> RoundStatus:
    """``ab_status`` through an open client (a waiter polls with one client)."""
    projects = ab_projects(client, campaign, criterion)
    status = counted_status(client, criterion.round_name, campaign, projects)
    if work is not None:
        pairs = read_pairs(work, criterion)
        rows = _vote_rows(client, criterion, projects.values(), pairs)
        add_per_annotator(status, rows, _gold_accuracy(rows, pairs, criterion))
    return status


def wait_for_ab(criterion: Criterion, campaign: str, settings: LabelStudioSettings, timeout_s: float,
                poll_s: float = 10.0) -> RoundStatus:
    """Block, polling Label Studio's counters, until every pair has its votes (the flows use the relay)."""
    deadline = time.monotonic() + timeout_s
    with LabelStudioClient(settings) as client:
        while not (status := client_ab_status(client, criterion, campaign)).complete:
            if time.monotonic() + poll_s > deadline:
                raise TimeoutError(f"A/B {criterion.name!r} of {campaign!r} not complete after {timeout_s:.0f}s: "
                                   f"{status.remaining} of {status.tasks} pairs remaining")
            time.sleep(poll_s)
    return status


# -- pull ---------------------------------------------------------------------------------------------------
def _vote_rows(client: LabelStudioClient, criterion: Criterion, project_ids: Any, pairs: pa.Table) -> list[dict]:
    """Every annotation of the criterion's projects as a VOTES row: curation's annotation rows (skipped,
    superseded, missing answer) with the choice turned into a side and, through the pair's coin flip,
    a vote in checkpoint terms."""
    by_id = {p[S.PAIR_ID]: p for p in pairs.select([S.PAIR_ID, S.KIND, S.PROMPT_ID, S.LEFT]).to_pylist()}
    rows = []
    for row in _annotation_rows(client, criterion, project_ids, {}):
        pair = by_id.get(row[ID])
        reason = row[S.EXCLUSION_REASON]
        if reason == "task_without_pool_id":
            reason = "task_without_pair_id"  # the same key, named for A/B
        elif pair is None:
            reason = "pair_not_in_pairs_table"  # pairs.parquet was rebuilt after the push
        raw = row[S.DECISION]
        side = criterion.sides.get(raw) if raw else None
        rows.append({
            S.PAIR_ID: row[ID],
            S.KIND: pair[S.KIND] if pair else None,
            S.PROMPT_ID: pair[S.PROMPT_ID] if pair else None,
            S.ANNOTATOR: row[S.ANNOTATOR],
            S.RAW_CHOICE: raw,
            S.SIDE: side,
            S.VOTE: to_vote(side, pair[S.LEFT]) if side and pair else None,
            S.TASK_ID: row[S.TASK_ID],
            S.PROJECT_ID: row[S.PROJECT_ID],
            S.ANNOTATION_ID: row[S.ANNOTATION_ID],
            S.LEAD_TIME: row[S.LEAD_TIME],
            S.EXCLUSION_REASON: reason,
        })
    return rows


def _valid(rows: list[dict], kinds: Sequence[str]) -> list[tuple[str, str, str]]:
    return [(r[S.PAIR_ID], r[S.ANNOTATOR], r[S.VOTE]) for r in rows
            if r[S.EXCLUSION_REASON] is None and r[S.KIND] in kinds]


def _gold_answers(pairs: pa.Table) -> dict[str, str]:
    return {p[S.PAIR_ID]: p[S.GOLD_ANSWER] for p in pairs.select([S.PAIR_ID, S.KIND, S.GOLD_ANSWER]).to_pylist()
            if p[S.KIND] == "gold"}


def _gold_accuracy(rows: list[dict], pairs: pa.Table, criterion: Criterion) -> dict[str, GoldAccuracy]:
    """Each annotator's accuracy on gold pairs (a tie on a gold pair is wrong: one side is damaged)."""
    return gold_accuracy(_valid(rows, ("gold",)), _gold_answers(pairs), criterion.min_gold_accuracy)


def pull_ab(criterion: Criterion, campaign: str, work: Path, settings: LabelStudioSettings) -> Path:
    """Every annotation of the criterion's projects -> WORK/<criterion>/votes.parquet, one row each (votes
    pulled = annotations made, skips included), with an exclusion reason where it cannot count. Annotators
    flagged on gold (accuracy below ``min_gold_accuracy``) have their other votes excluded with the
    reason ``annotator_failed_gold``."""
    with LabelStudioClient(settings) as client:
        projects = ab_projects(client, campaign, criterion)
        if not projects:
            raise AnnotationError(f"no Label Studio project for A/B {criterion.name!r} of campaign {campaign!r}")
        pairs = read_pairs(work, criterion)
        rows = _vote_rows(client, criterion, projects.values(), pairs)
    flagged = {name for name, acc in _gold_accuracy(rows, pairs, criterion).items() if acc.flagged}
    for row in rows:
        if row[S.ANNOTATOR] in flagged and row[S.EXCLUSION_REASON] is None and row[S.KIND] != "gold":
            row[S.EXCLUSION_REASON] = "annotator_failed_gold"
    layout = ABLayout(work, criterion.name)
    pq.write_table(pa.Table.from_pylist(rows, schema=S.VOTES_SCHEMA), layout.votes)
    log.info("%s: %d annotations, %d flagged annotators", layout.votes, len(rows), len(flagged))
    return layout.votes


# -- summary ------------------------------------------------------------------------------------------------
def _comparison(votes: list[tuple[str, str, str]], prompt_of: dict[str, str], criterion: Criterion,
                n_boot: int, confidence: float, seed: int) -> dict[str, dict | None]:
    """Both aggregation rules: Emu's plurality and Playground v2.5's margin."""
    result = {}
    for rule in ("plurality", "margin"):
        outcomes = pair_outcomes(votes, rule, criterion.margin)
        result[rule] = comparison_summary(outcomes, prompt_of, n_boot, confidence, seed).to_dict() if outcomes else None
    return result


def summarise_ab(criterion: Criterion, work: Path, n_boot: int = 2000, confidence: float = 0.95,
                 seed: int = 0) -> Path:
    """votes.parquet + pairs.parquet -> WORK/<criterion>/summary.json: win / tie / lose of A against B on
    the comparison pairs by both rules (overall and per category), gold accuracy per annotator, repeat
    consistency, position bias, Fleiss' kappa, and the counts (pairs, votes valid and excluded by reason,
    comparison pairs without a valid vote)."""
    layout = ABLayout(work, criterion.name)
    if not layout.votes.exists():
        raise AnnotationError(f"no votes table at {layout.votes}: run pull_ab (python -m annotation ab-pull) first")
    pairs = read_pairs(work, criterion)
    rows = pq.read_table(layout.votes).to_pylist()
    pair_rows = pairs.to_pylist()
    comparisons = [p for p in pair_rows if p[S.KIND] == "comparison"]
    prompt_of = {p[S.PAIR_ID]: p[S.PROMPT_ID] for p in comparisons}
    votes = _valid(rows, ("comparison",))
    category_of = {p[S.PAIR_ID]: p[S.CATEGORY] for p in comparisons}
    by_category = {
        category: _comparison([v for v in votes if category_of[v[0]] == category], prompt_of, criterion,
                              n_boot, confidence, seed)
        for category in sorted(set(category_of.values()))
    }
    accuracy = _gold_accuracy(rows, pairs, criterion)
    repeats = {p[S.PAIR_ID]: p[S.REPEAT_OF] for p in pair_rows if p[S.KIND] == "repeat"}
    sides = [(r[S.ANNOTATOR], r[S.SIDE]) for r in rows
             if r[S.EXCLUSION_REASON] is None and r[S.KIND] in ("comparison", "repeat")]
    voted = {v[0] for v in votes}
    summary = {
        "criterion": criterion.name,
        "checkpoint_a": sorted({p[S.CHECKPOINT_A] for p in comparisons}),
        "checkpoint_b": sorted({p[S.CHECKPOINT_B] for p in comparisons}),
        "votes_per_pair": criterion.votes_per_pair,
        "margin": criterion.margin,
        "comparison": _comparison(votes, prompt_of, criterion, n_boot, confidence, seed),
        "by_category": by_category,
        "gold_accuracy": {name: asdict(acc) for name, acc in accuracy.items()},
        "min_gold_accuracy": criterion.min_gold_accuracy,
        "flagged_annotators": sorted(name for name, acc in accuracy.items() if acc.flagged),
        "repeat_consistency": repeat_consistency(_valid(rows, ("comparison", "repeat")), repeats).to_dict(),
        "position_bias": position_bias(sides).to_dict() if sides else None,
        "agreement": round_agreement(votes, OUTCOMES).to_dict(),
        "counts": {
            "pairs": dict(Counter(p[S.KIND] for p in pair_rows)),
            "votes": len(rows),
            "valid": sum(r[S.EXCLUSION_REASON] is None for r in rows),
            "excluded_by_reason": dict(Counter(r[S.EXCLUSION_REASON] for r in rows if r[S.EXCLUSION_REASON])),
            "comparison_pairs_without_valid_vote": sum(p[S.PAIR_ID] not in voted for p in comparisons),
        },
    }
    layout.summary.write_text(json.dumps(summary, indent=2, sort_keys=True))
    return layout.summary


# -- simulated voters: FOR DEMOS AND TESTS ONLY, never for a real evaluation -----------------------------------
def _unit(*parts: str) -> float:
    """A deterministic number in [0, 1) from the parts."""
    return int(_digest(*parts)[:8], 16) / 2**32


@dataclass
class SharpnessVoter:
    """DEMO/TEST ONLY: a real Label Studio user (signed up through the invite link, with its own token) that
    works through the criterion's labeling stream as the UI does (``/next``, then submit). It downloads the
    task's two images through Label Studio and prefers the sharper (variance of the Laplacian, the
    pipeline's technical scorer); a tie when the two are within ``tolerance`` of each other. Created only in
    dev mode (NEEDLES_DEV=1; annotation.simulated.scripted_user)."""

    email: str
    password: str = field(repr=False)
    tolerance: float = 0.1  # relative: |s_left - s_right| <= tolerance * max(s_left, s_right) is a tie
    contrarian: bool = False  # prefers the blurrier image: fails damaged gold (tests of flagging)
    noise: float = 0.0  # share of decisive votes flipped to the other side, by a hash of voter and pair
    skip_rate: float = 0.0  # share of tasks skipped, by a hash of voter and pair
    lead_time_s: float = 2.0  # recorded as the annotation's lead time
    hash_key: str | None = None  # keys the noise and skip hashes (default: the email)

    def side(self, left: bytes, right: bytes, pair_id: str) -> Side:
        size = TechnicalOptions().analysis_size
        s_left, s_right = sharpness_and_contrast(left, size)[0], sharpness_and_contrast(right, size)[0]
        if abs(s_left - s_right) <= self.tolerance * max(s_left, s_right):
            return "tie"
        sharper = "left" if s_left > s_right else "right"
        flip = self.contrarian != (_unit(self.hash_key or self.email, pair_id, "noise") < self.noise)
        return ("right" if sharper == "left" else "left") if flip else sharper

    def vote(self, admin: LabelStudioClient, criterion: Criterion, campaign: str, limit: int | None = None) -> Counter:
        """Vote on open pairs of the criterion (at most ``limit``) as this user; returns how many were
        answered and skipped."""
        done: Counter = Counter()
        with scripted_user(admin, self.email, self.password) as me:
            for project_id in ab_projects(admin, campaign, criterion).values():
                while limit is None or done.total() < limit:
                    task = me.next_task(project_id)
                    if task is None:
                        break
                    pair_id = task["data"][POOL_ID_KEY]
                    if _unit(self.hash_key or self.email, pair_id, "skip") < self.skip_rate:
                        me.submit_annotation(task["id"], [], self.lead_time_s, skipped=True)
                        done["skipped"] += 1
                        continue
                    left, right = (_download(me, task["data"][f"image_{side}"]) for side in ("left", "right"))
                    choice = criterion.choice_for(self.side(left, right, pair_id))
                    me.submit_annotation(task["id"], criterion.result_for(choice), self.lead_time_s)
                    done["answered"] += 1
        return done


def _download(client: LabelStudioClient, url: str) -> bytes:
    """An image as the annotator's browser gets it: from Label Studio, with the annotator's credentials."""
    response = client.http.get(url)
    if response.status_code != 200:
        raise AnnotationError(f"Label Studio did not serve {url}: HTTP {response.status_code}")
    return response.content


def simulate_ab(admin: LabelStudioClient, criterion: Criterion, campaign: str, voters: int,
                noise: float = 0.0, skip_rate: float = 0.0) -> dict[str, Counter]:
    """DEV MODE ONLY (NEEDLES_DEV=1): ``voters`` new scripted users (ab-voter-N-<random tag>@needles.local, random
    passwords) vote on every open pair by sharpness (noise and skips keyed on ab-voter-N@needles.local, so they
    do not depend on the tag); returns how many pairs each answered and skipped."""
    require_dev_mode("annotator_mode=simulated (scripted voters)")
    tag = run_tag()
    done = {}
    for i in range(voters):
        name = f"ab-voter-{i + 1}"
        voter = SharpnessVoter(f"{name}-{tag}@needles.local", one_time_password(), noise=noise, skip_rate=skip_rate,
                               hash_key=f"{name}@needles.local")
        done[voter.email] = voter.vote(admin, criterion, campaign)
    return done
