"""Idempotent push, interrupted push, server restart mid-round, wrong token, failed gold, bad answers."""

from __future__ import annotations

import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from annotation import schema as S
from annotation.client import LabelStudioAuthError, LabelStudioClient, LabelStudioUnavailable
from annotation.curation import AnnotationError, pull_round, push_round, round_status
from annotation.rounds import get_round
from annotation.simulated import SimulatedAnnotator, full_answers, hash_rule

from .conftest import GOLD_PHOTOS


def test_repush_and_interrupted_push_create_no_duplicate(labelstudio, photo_pool, tmp_path):
    settings = labelstudio.settings()
    generalist = get_round("generalist")
    half = tmp_path / "half.parquet"
    pq.write_table(pq.read_table(photo_pool).slice(0, 6), half)  # a push that stopped half way
    first = push_round(half, generalist, "repush", tmp_path, settings, max_tasks_per_project=5)
    assert (first.created, len(first.project_ids)) == (6, 2)
    second = push_round(photo_pool, generalist, "repush", tmp_path, settings, max_tasks_per_project=5)
    assert (second.created, second.already_present, len(second.project_ids)) == (6, 6, 3)
    third = push_round(photo_pool, generalist, "repush", tmp_path, settings, max_tasks_per_project=5)
    assert (third.created, third.already_present) == (0, 12)
    assert round_status(generalist, "repush", settings, per_annotator=False).tasks == 12


def test_restart_mid_round_loses_nothing(labelstudio, photo_pool, tmp_path, dev_mode):
    settings = labelstudio.settings()
    admin = LabelStudioClient(settings)
    generalist = get_round("generalist")
    push_round(photo_pool, generalist, "restart", tmp_path, settings)
    dana = SimulatedAnnotator("dana@needles.test", "dana-password-1", hash_rule(generalist, "dana", 0.5))
    assert dana.annotate(admin, generalist, "restart", limit=5) == 5

    labelstudio.stop()
    with pytest.raises(LabelStudioUnavailable, match="did not answer"):
        round_status(generalist, "restart", labelstudio.settings(retry_budget_s=2), per_annotator=False)
    # a caller that starts while the server is down gets its answer once it is back (retry with backoff)
    answer = {}
    waiting = threading.Thread(
        target=lambda: answer.update(status=round_status(generalist, "restart", labelstudio.settings(retry_budget_s=240)))
    )
    waiting.start()
    labelstudio.start()
    waiting.join(timeout=300)
    assert answer["status"].annotations == 5
    assert answer["status"].per_annotator["dana@needles.test"].annotations == 5

    assert dana.annotate(admin, generalist, "restart") == 7
    erin = SimulatedAnnotator("erin@needles.test", "erin-password-1", hash_rule(generalist, "erin", 0.5))
    assert erin.annotate(admin, generalist, "restart") == 12
    assert round_status(generalist, "restart", settings, per_annotator=False).complete
    assert pq.read_table(pull_round(generalist, "restart", tmp_path, settings)).num_rows == 24


def test_wrong_token_is_one_clear_error(labelstudio):
    client = LabelStudioClient(labelstudio.settings(api_key="not-a-token"))
    with pytest.raises(LabelStudioAuthError, match="rejected the API token"):
        client.whoami()


def test_gold_failing_annotator_is_flagged_and_bad_answers_excluded(labelstudio, photo_pool, gold_table, tmp_path,
                                                                    dev_mode):
    settings = labelstudio.settings()
    admin = LabelStudioClient(settings)
    specialist = get_round("specialist", overlap=3)  # a third annotator's answer still counts
    small = tmp_path / "small.parquet"
    pq.write_table(pq.read_table(photo_pool).slice(0, 3), small)
    gold = tmp_path / "gold.parquet"  # the specialist's gold answers: select / reject
    table = pq.read_table(gold_table)
    answers = ["select" if GOLD_PHOTOS[k] == "keep" else "reject" for k in table["source_key"].to_pylist()]
    pq.write_table(table.set_column(table.column_names.index(S.GOLD_ANSWER), S.GOLD_ANSWER, [answers]), gold)
    push_round(small, specialist, "gold", tmp_path, settings, gold=gold)

    def honest(d):
        name = d["caption"].removeprefix("a photo: ")
        return full_answers(specialist, GOLD_PHOTOS.get(name, "keep") == "keep", d, 0.9)

    def contrary(d):
        name = d["caption"].removeprefix("a photo: ")
        return full_answers(specialist, GOLD_PHOTOS.get(name, "keep") != "keep", d, 0.9)

    def incomplete(d):  # submits without rating lighting: the annotation cannot count
        a = honest(d)
        del a["lighting"]
        return a

    SimulatedAnnotator("frank@needles.test", "frank-password-1", honest).annotate(admin, specialist, "gold")
    SimulatedAnnotator("mallory@needles.test", "mallory-password-1", contrary).annotate(admin, specialist, "gold")
    SimulatedAnnotator("gina@needles.test", "gina-password-1", incomplete).annotate(admin, specialist, "gold", limit=1)

    status = round_status(specialist, "gold", settings, gold=gold)
    assert status.per_annotator["mallory@needles.test"].gold_accuracy == 0.0
    assert status.per_annotator["mallory@needles.test"].flagged
    assert not status.per_annotator["frank@needles.test"].flagged

    rows = pq.read_table(pull_round(specialist, "gold", tmp_path, settings, gold=gold)).to_pylist()
    by = {(r[S.ANNOTATOR], r[S.IS_GOLD]): r[S.EXCLUSION_REASON] for r in rows}
    assert by[("mallory@needles.test", False)] == "annotator_failed_gold"
    assert by[("frank@needles.test", False)] is None
    assert [r[S.EXCLUSION_REASON] for r in rows if r[S.ANNOTATOR] == "gina@needles.test"] == ["missing_fields:lighting"]


def test_a_gold_image_that_is_also_in_the_pool_is_refused_by_name(labelstudio, photo_pool, tmp_path):
    """A pool row that is a gold task would never be decided: the push says so instead of losing it."""
    pool = pq.read_table(photo_pool)
    rows = pool.slice(0, 1).to_pylist()
    rows[0][S.GOLD_ANSWER] = "keep"
    gold = tmp_path / "gold-from-pool.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=pool.schema.append(pa.field(S.GOLD_ANSWER, pa.string()))), gold)
    with pytest.raises(AnnotationError, match=f"row {rows[0]['id']} is also a gold task"):
        push_round(photo_pool, get_round("generalist"), "goldpool", tmp_path, labelstudio.settings(), gold=gold)
