"""A curation round end to end, as functions a CLI or a Prefect flow calls with paths:

    push_round(pool, round, ...)    -> PushResult (Label Studio project ids)
    round_status(round, ...)        -> RoundStatus (counts, remaining, complete, per-annotator, gold flags)
    wait_for_round(round, ...)      -> RoundStatus once every task has its overlap (polling; webhook opt-in)
    pull_round(round, ...)          -> path of the annotations table
    decide_round(round, pool, ...)  -> path of the next round's pool
"""

from __future__ import annotations

import html
import json
import logging
import math
import re
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from annotation import schema as S
from annotation.agreement import GoldAccuracy, gold_accuracy, round_agreement
from annotation.client import POOL_ID_KEY, LabelStudioClient, LabelStudioSettings, batched
from annotation.consensus import decide
from annotation.images import NoImage, iter_rows, pool_dataset, read_columns, shown_image, write_once
from annotation.layout import RoundLayout
from annotation.rounds import AnnotationError, Round
from annotation.webhook import WebhookReceiver
from pipeline.schema import (
    AESTHETIC_SCORE,
    CAPTION,
    DETAIL,
    FORMAT,
    ID,
    IMAGE,
    IMAGE_PATH,
    QUARANTINE_SCHEMA,
    REASON,
    SOURCE,
    SOURCE_KEY,
    THUMBNAIL,
)

log = logging.getLogger(__name__)

#: Label Studio's guidance: keep projects under 100K tasks.
MAX_TASKS_PER_PROJECT = 100_000
#: tasks per import request (one request may carry up to 250K tasks / 200 MB; 10K keeps each short)
IMPORT_BATCH = 10_000
CAMPAIGN_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,30}$")


def _check_campaign(campaign: str) -> None:
    # Project titles are "<campaign> · <round> · <part>" and Label Studio caps titles at 50 characters.
    if not CAMPAIGN_PATTERN.match(campaign):
        raise AnnotationError(f"campaign name {campaign!r} must be 1-30 characters of A-Z a-z 0-9 _ . -")


def project_prefix(campaign: str, round_: Round) -> str:
    return f"{campaign} · {round_.name} · "


def round_projects(client: LabelStudioClient, campaign: str, round_: Round) -> dict[str, int]:
    return dict(sorted(client.projects_titled(project_prefix(campaign, round_)).items(), key=lambda kv: kv[1]))


def image_dir(settings: LabelStudioSettings, campaign: str, round_: Round) -> Path:
    return settings.document_root / "needles" / campaign / round_.name


def read_gold(gold: Path | None) -> dict[str, str]:
    """Gold table: pool columns plus ``gold_answer``, the decision a careful annotator gives."""
    if gold is None:
        return {}
    table = read_columns(gold, [ID, S.GOLD_ANSWER])
    if S.GOLD_ANSWER not in table.column_names:
        raise AnnotationError(f"gold table {gold} has no {S.GOLD_ANSWER!r} column")
    return dict(zip(table[ID].to_pylist(), table[S.GOLD_ANSWER].to_pylist()))


# -- push -----------------------------------------------------------------------------------------------
@dataclass
class PushResult:
    project_ids: list[int]
    tasks: int  # tasks the round should hold (pool rows with an image, plus gold in every project)
    created: int  # imported by this push
    already_present: int  # found on the server already (an earlier or interrupted push)
    gold_per_project: int
    quarantined: int  # pool rows that could not become tasks (see push-quarantine.parquet)


def _tasks_from(
    path: Path, round_: Round, storage: Path, document_root: Path, quarantine: list[dict], seen: set[str],
    gold_ids: set[str] = frozenset(),
) -> list[dict[str, Any]]:
    tasks = []
    columns = [ID, THUMBNAIL, CAPTION, SOURCE, SOURCE_KEY]
    if round_.image_source == "original":  # only then are the full images read (not the whole column for nothing)
        columns += [IMAGE, IMAGE_PATH, FORMAT]
    for row in iter_rows(path, columns):
        pool_id = row[ID]
        if pool_id in gold_ids:
            raise AnnotationError(f"{path}: row {pool_id} is also a gold task; gold images check the annotators "
                                  "and are never decided as pool images, so take them from outside the pool")
        if pool_id in seen:
            quarantine.append(_quarantine_row(row, path, "duplicate_id", "id appears more than once"))
            continue
        try:
            data, ext = shown_image(row, round_.image_source)
        except NoImage as error:
            quarantine.append(_quarantine_row(row, path, "no_image", str(error)))
            continue
        seen.add(pool_id)
        file = storage / pool_id[:2] / f"{pool_id}{ext}"
        write_once(file, data)
        tasks.append(
            {
                "data": {
                    POOL_ID_KEY: pool_id,
                    "image": f"/data/local-files/?d={file.relative_to(document_root).as_posix()}",
                    "caption": row.get(CAPTION) or "",
                }
            }
        )
    return tasks


def _quarantine_row(row: dict, path: Path, reason: str, detail: str) -> dict:
    return {
        SOURCE: row.get(SOURCE) or str(path),
        SOURCE_KEY: row.get(SOURCE_KEY) or row[ID],
        ID: row[ID],
        REASON: reason,
        DETAIL: detail,
    }


def _with_gold_and_preload(chunk: list[dict], gold: list[dict], preload_next: int) -> list[dict]:
    """Gold tasks spread evenly through the queue (so they cannot be told apart by position), then each
    task told which images come next so the browser can fetch them ahead."""
    tasks = list(chunk)
    for i, g in enumerate(gold):
        tasks.insert(round((i + 1) * len(tasks) / (len(gold) + 1)), g)
    out = []
    for i, task in enumerate(tasks):
        data = dict(task["data"])
        if preload_next:
            upcoming = tasks[i + 1 : i + 1 + preload_next]
            data["preload"] = "".join(
                f'<img src="{html.escape(t["data"]["image"])}" alt="" width="1" height="1">' for t in upcoming
            ) or "<span></span>"
        out.append({"data": data})
    return out


def task_order(tasks: list[dict[str, Any]], priority: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """Tasks by descending priority (absent: last), ties and no priority by pool id."""
    priority = priority or {}

    def key(task: dict[str, Any]) -> tuple:
        pool_id = task["data"][POOL_ID_KEY]
        return (-priority.get(pool_id, float("-inf")), pool_id)

    return sorted(tasks, key=key)


def push_round(
    pool: Path,
    round_: Round,
    campaign: str,
    work: Path,
    settings: LabelStudioSettings,
    gold: Path | None = None,
    max_tasks_per_project: int = MAX_TASKS_PER_PROJECT,
    batch_size: int = IMPORT_BATCH,
    priority: Mapping[str, float] | None = None,
) -> PushResult:
    """Pool rows -> tasks (carrying the pool id) in projects of at most ``max_tasks_per_project``.

    Tasks are imported by descending ``priority`` (pool id -> e.g. the learned keep-probability of
    annotation/active.py; ids it lacks come last), else by pool id. The projects sample sequentially, so
    Label Studio serves tasks in import order: annotators see the likely keeps first.

    Idempotent: a pool id already in any project of this round is not imported again, so re-running
    a push (complete or interrupted) only adds what is missing.
    """
    _check_campaign(campaign)
    with LabelStudioClient(settings) as client:
        client.wait_until_up()
        layout = RoundLayout(work, round_.name)
        storage = image_dir(settings, campaign, round_)
        quarantine: list[dict] = []
        seen: set[str] = set()
        gold_answers = read_gold(gold)
        gold_tasks = _tasks_from(gold, round_, storage, settings.document_root, quarantine, seen) if gold else []
        for g in gold_tasks:
            if g["data"][POOL_ID_KEY] not in gold_answers or gold_answers[g["data"][POOL_ID_KEY]] is None:
                raise AnnotationError(f"gold task {g['data'][POOL_ID_KEY]} has no {S.GOLD_ANSWER}")
        tasks = task_order(
            _tasks_from(pool, round_, storage, settings.document_root, quarantine, seen, set(gold_answers)), priority
        )
        layout.root.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA), layout.push_quarantine)
        if quarantine:
            log.warning("%d pool rows could not become tasks: see %s", len(quarantine), layout.push_quarantine)
        if not tasks:
            raise AnnotationError(f"pool {pool} gave no task (quarantined: {len(quarantine)})")

        capacity = max_tasks_per_project - len(gold_tasks)
        if capacity <= 0:
            raise AnnotationError(f"{len(gold_tasks)} gold tasks leave no room in projects of {max_tasks_per_project}")
        n_projects = math.ceil(len(tasks) / capacity)
        # What the server already holds, per project: the idempotency check of the whole push.
        held = {pid: set(client.pool_ids(pid)) for pid in round_projects(client, campaign, round_).values()}
        gold_ids = set(gold_answers)
        known = set().union(*held.values()) - gold_ids
        already = sum(len(ids) for ids in held.values())

        project_ids, created = [], 0
        for part, start in enumerate(range(0, len(tasks), capacity)):
            title = f"{project_prefix(campaign, round_)}{part + 1}"
            project_id = client.ensure_project(
                title,
                round_.label_config,
                round_.guideline,
                round_.overlap,
                f"needles: {round_.name} round of campaign {campaign}, part {part + 1} of {n_projects}",
            )
            client.ensure_local_storage(project_id, storage)
            project_ids.append(project_id)
            chunk = _with_gold_and_preload(tasks[start : start + capacity], gold_tasks, round_.preload_next)
            # Gold tasks repeat in every project, so which gold a project holds is looked up per project.
            project_known = known | held.get(project_id, set())
            for batch in batched(chunk, batch_size):
                created += client.import_new_tasks(project_id, batch, project_known)
            log.info("project %s (%d): %d tasks", title, project_id, len(chunk))
        return PushResult(
            project_ids=project_ids,
            tasks=len(tasks) + len(gold_tasks) * n_projects,
            created=created,
            already_present=already,
            gold_per_project=len(gold_tasks),
            quarantined=len(quarantine),
        )


# -- status ---------------------------------------------------------------------------------------------
@dataclass
class AnnotatorStatus:
    annotations: int = 0
    skipped: int = 0
    gold_answered: int = 0
    gold_correct: int = 0
    gold_accuracy: float | None = None
    flagged: bool = False  # accuracy on gold below the round's min_gold_accuracy


@dataclass
class RoundStatus:
    round: str
    campaign: str
    project_ids: list[int]
    tasks: int
    finished_tasks: int  # tasks holding the round's overlap of annotations
    annotations: int
    skipped: int
    per_annotator: dict[str, AnnotatorStatus] = field(default_factory=dict)

    @property
    def remaining(self) -> int:
        return self.tasks - self.finished_tasks

    @property
    def complete(self) -> bool:
        return self.tasks > 0 and self.remaining == 0

    def to_dict(self) -> dict:
        return {**asdict(self), "remaining": self.remaining, "complete": self.complete}


def counted_status(client: LabelStudioClient, name: str, campaign: str, projects: dict[str, int]) -> RoundStatus:
    """A round's progress from Label Studio's project counters (any round: curation or A/B)."""
    if not projects:
        raise AnnotationError(f"no Label Studio project for round {name!r} of campaign {campaign!r}")
    counts = [client.project_counts(pid) for pid in projects.values()]
    return RoundStatus(
        round=name,
        campaign=campaign,
        project_ids=list(projects.values()),
        tasks=sum(c.tasks for c in counts),
        finished_tasks=sum(c.finished_tasks for c in counts),
        annotations=sum(c.annotations for c in counts),
        skipped=sum(c.skipped for c in counts),
    )


def add_per_annotator(status: RoundStatus, rows: list[dict], accuracy: dict[str, GoldAccuracy]) -> RoundStatus:
    """Each annotator's answers, skips and gold accuracy (flag included) from the round's annotation rows."""
    for row in rows:
        who = status.per_annotator.setdefault(row[S.ANNOTATOR], AnnotatorStatus())
        if row[S.EXCLUSION_REASON] == "skipped":
            who.skipped += 1
        else:
            who.annotations += 1
    for name, acc in accuracy.items():
        who = status.per_annotator[name]
        who.gold_answered, who.gold_correct = acc.n_gold, acc.n_correct
        who.gold_accuracy, who.flagged = acc.accuracy, acc.flagged
    return status


def round_status(
    round_: Round,
    campaign: str,
    settings: LabelStudioSettings,
    gold: Path | None = None,
    per_annotator: bool = True,
) -> RoundStatus:
    """Counts from Label Studio's project counters; per annotator (and gold flags) from the annotations."""
    with LabelStudioClient(settings) as client:
        return client_round_status(client, round_, campaign, gold, per_annotator)


def client_round_status(
    client: LabelStudioClient, round_: Round, campaign: str, gold: Path | None = None, per_annotator: bool = True
) -> RoundStatus:
    """``round_status`` through an open client (a waiter polls with one client)."""
    projects = round_projects(client, campaign, round_)
    status = counted_status(client, round_.name, campaign, projects)
    if per_annotator:
        gold_answers = read_gold(gold)
        rows = _annotation_rows(client, round_, projects.values(), gold_answers)
        add_per_annotator(status, rows, _gold_accuracy(rows, gold_answers, round_))
    return status


def wait_for_round(
    round_: Round,
    campaign: str,
    settings: LabelStudioSettings,
    timeout_s: float,
    poll_s: float = 30.0,
    webhook: bool = False,
    webhook_bind: tuple[str, int] = ("127.0.0.1", 0),
    webhook_url: str | None = None,
) -> RoundStatus:
    """Block until every task of the round has its overlap of annotations, reading Label Studio's counters
    every ``poll_s`` seconds (raises ``TimeoutError`` after ``timeout_s``).

    Polling is the default and needs nothing from the server. ``webhook=True`` is an opt-in that also wakes
    the waiter at each annotation: a receiver listens on ``webhook_bind`` (host, port; port 0: any free one)
    and Label Studio is told to call it at ``webhook_url`` (default: the receiver's own address). Label
    Studio's SSRF protection (on, as it should be) refuses webhooks to loopback and private addresses, so
    opt in only with a receiver address the server is allowed to reach; a refused registration is a
    ``LabelStudioError`` saying so. Polling continues with a webhook too: webhooks carry no guarantee of
    delivery.
    """
    deadline = time.monotonic() + timeout_s
    receiver: WebhookReceiver | None = None
    hooks: list[int] = []
    with LabelStudioClient(settings) as client:
        try:
            if webhook:
                receiver = WebhookReceiver(*webhook_bind, public_url=webhook_url).start()
                for project_id in round_projects(client, campaign, round_).values():
                    hooks.append(client.create_webhook(project_id, receiver.url))
            while True:
                status = client_round_status(client, round_, campaign, per_annotator=False)
                if status.complete:
                    return status
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"round {round_.name!r} of {campaign!r} not complete after {timeout_s:.0f}s: "
                        f"{status.remaining} of {status.tasks} tasks remaining"
                    )
                if receiver is not None:
                    receiver.wait(min(poll_s, left))
                else:
                    time.sleep(min(poll_s, left))
        finally:
            for hook in hooks:
                client.delete_webhook(hook)
            if receiver is not None:
                receiver.stop()


# -- pull -----------------------------------------------------------------------------------------------
def _annotation_rows(
    client: LabelStudioClient, round_: Round, project_ids: Any, gold_answers: dict[str, str]
) -> list[dict]:
    """Every annotation of the round's projects as an ANNOTATIONS_SCHEMA row, with an exclusion reason
    when it cannot count: skipped, missing required answers, superseded, on a task without pool id."""
    users = client.user_emails()
    rows = []
    for project_id in project_ids:
        for task in client.export_tasks(project_id):
            pool_id = (task.get("data") or {}).get(POOL_ID_KEY)
            is_gold = pool_id in gold_answers
            latest_by_annotator: dict[int, int] = {}
            for annotation in task.get("annotations", []):
                who = annotation.get("completed_by")
                if who is not None and (
                    who not in latest_by_annotator or annotation["id"] > latest_by_annotator[who]
                ):
                    latest_by_annotator[who] = annotation["id"]
            for annotation in task.get("annotations", []):
                answers, missing = round_.answers_from_result(annotation.get("result") or [])
                decision = answers.get(round_.decision_field)
                if pool_id is None:
                    reason = "task_without_pool_id"
                elif annotation.get("was_cancelled"):
                    reason = "skipped"
                elif annotation["id"] != latest_by_annotator.get(annotation.get("completed_by")):
                    reason = "superseded"  # the same annotator annotated the task again later
                elif missing:
                    reason = "missing_fields:" + ",".join(missing)
                else:
                    reason = None
                who = annotation.get("completed_by")
                rows.append(
                    {
                        ID: pool_id or f"task:{task['id']}",
                        S.TASK_ID: task["id"],
                        S.PROJECT_ID: project_id,
                        S.ANNOTATION_ID: annotation["id"],
                        S.ANNOTATOR: users.get(who, f"user:{who}"),
                        S.ANSWERS: json.dumps(answers, sort_keys=True),
                        S.DECISION: decision,
                        S.LEAD_TIME: annotation.get("lead_time"),
                        S.CREATED_AT: annotation.get("created_at"),
                        S.IS_GOLD: is_gold,
                        S.GOLD_CORRECT: (decision == gold_answers[pool_id]) if is_gold and reason is None else None,
                        S.EXCLUSION_REASON: reason,
                    }
                )
    return rows


def _votes(rows: list[dict]) -> list[tuple[str, str, str]]:
    return [(r[ID], r[S.ANNOTATOR], r[S.DECISION]) for r in rows if r[S.EXCLUSION_REASON] is None]


def _gold_accuracy(rows: list[dict], gold_answers: dict[str, str], round_: Round) -> dict[str, GoldAccuracy]:
    gold_votes = [v for v in _votes(rows) if v[0] in gold_answers]
    return gold_accuracy(gold_votes, gold_answers, round_.min_gold_accuracy)


def pull_round(
    round_: Round,
    campaign: str,
    work: Path,
    settings: LabelStudioSettings,
    gold: Path | None = None,
) -> Path:
    """Annotations -> WORK/<round>/annotations.parquet (+ agreement and gold accuracy in summary.json).

    Annotators flagged on gold (below ``min_gold_accuracy``) have their other answers excluded with the
    reason ``annotator_failed_gold`` when the round says so.
    """
    with LabelStudioClient(settings) as client:
        projects = round_projects(client, campaign, round_)
        if not projects:
            raise AnnotationError(f"no Label Studio project for round {round_.name!r} of campaign {campaign!r}")
        gold_answers = read_gold(gold)
        rows = _annotation_rows(client, round_, projects.values(), gold_answers)
    accuracy = _gold_accuracy(rows, gold_answers, round_)
    flagged = {name for name, acc in accuracy.items() if acc.flagged}
    if flagged and round_.exclude_flagged_annotators:
        for row in rows:
            if row[S.ANNOTATOR] in flagged and row[S.EXCLUSION_REASON] is None and not row[S.IS_GOLD]:
                row[S.EXCLUSION_REASON] = "annotator_failed_gold"
    layout = RoundLayout(work, round_.name)
    layout.root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=S.ANNOTATIONS_SCHEMA), layout.annotations)
    agreement = round_agreement(_votes(rows), round_.controls[round_.decision_field].choices)
    _update_summary(
        layout,
        "pull",
        {
            "annotations": len(rows),
            "valid": sum(r[S.EXCLUSION_REASON] is None for r in rows),
            "excluded_by_reason": dict(Counter(r[S.EXCLUSION_REASON] for r in rows if r[S.EXCLUSION_REASON])),
            "agreement": agreement.to_dict(),
            "gold_accuracy": {name: asdict(acc) for name, acc in accuracy.items()},
            "flagged_annotators": sorted(flagged),
        },
    )
    return layout.annotations


def _update_summary(layout: RoundLayout, key: str, value: dict) -> None:
    summary = json.loads(layout.summary.read_text()) if layout.summary.exists() else {}
    summary[key] = value
    layout.summary.write_text(json.dumps(summary, indent=2, sort_keys=True))


# -- decide ---------------------------------------------------------------------------------------------
def decide_round(round_: Round, pool: Path, work: Path) -> Path:
    """Annotations table -> decisions by the round's consensus rule -> the next round's pool.

    The next pool holds the kept rows with every pool column; after a round with a caption question the
    specialist's caption replaces ``caption`` and the old one moves to ``source_caption``.
    """
    layout = RoundLayout(work, round_.name)
    if not layout.annotations.exists():
        raise AnnotationError(f"no annotations table at {layout.annotations}: run pull first")
    annotations = pq.read_table(layout.annotations)
    scores = read_columns(pool, [ID, AESTHETIC_SCORE])
    pool_ids = scores[ID].to_pylist()
    aesthetic = (
        dict(zip(pool_ids, scores[AESTHETIC_SCORE].to_pylist())) if AESTHETIC_SCORE in scores.column_names else {}
    )
    trust: dict[str, list[bool]] = defaultdict(list)
    for row in annotations.filter(annotations[S.IS_GOLD]).to_pylist():
        if row[S.GOLD_CORRECT] is not None:
            trust[row[S.ANNOTATOR]].append(row[S.GOLD_CORRECT])
    decisions = decide(
        annotations,
        pool_ids,
        round_,
        aesthetic={k: v for k, v in aesthetic.items() if v is not None},
        trust={k: sum(v) / len(v) for k, v in trust.items()},
    )
    pq.write_table(decisions.table, layout.decisions)
    if decisions.shortfall:
        log.warning(
            "round %s kept %d images, %d short of its target of %d",
            round_.name, decisions.kept, decisions.shortfall, decisions.target,
        )
    _write_next_pool(pool, decisions.table, round_, layout)
    _update_summary(
        layout,
        "decide",
        {
            "pool": len(pool_ids),
            "passed_consensus": decisions.passed_consensus,
            "kept": decisions.kept,
            "target": decisions.target,
            "shortfall": decisions.shortfall,
            "not_kept_by_reason": decisions.not_kept_by_reason,
        },
    )
    return layout.next_pool


def _write_next_pool(pool: Path, decisions: pa.Table, round_: Round, layout: RoundLayout) -> None:
    kept = decisions.filter(decisions[S.KEEP])
    captions = dict(zip(kept[ID].to_pylist(), kept[CAPTION].to_pylist()))
    dataset = pool_dataset(pool)
    schema = dataset.schema
    if round_.caption_field:
        schema = schema.append(pa.field(S.SOURCE_CAPTION, pa.string())) if S.SOURCE_CAPTION not in schema.names else schema
    layout.next_pool.mkdir(parents=True, exist_ok=True)
    for stale in layout.next_pool.glob("*.parquet"):
        stale.unlink()
    with pq.ParquetWriter(layout.next_pool_shard, schema) as writer:
        for batch in dataset.to_batches(batch_size=1_024):
            table = pa.Table.from_batches([batch])
            table = table.filter(pa.array([i in captions for i in table[ID].to_pylist()], pa.bool_()))
            if table.num_rows == 0:
                continue
            if round_.caption_field:
                if S.SOURCE_CAPTION not in table.column_names:
                    table = table.append_column(S.SOURCE_CAPTION, table[CAPTION])
                new = pa.array([captions[i] for i in table[ID].to_pylist()], pa.string())
                table = table.set_column(table.column_names.index(CAPTION), CAPTION, new)
            writer.write_table(table.select(schema.names).cast(schema))

