"""The two curation rounds end to end against a real Label Studio, with two annotator users."""

from __future__ import annotations

import json

import datasets
import pyarrow.parquet as pq
import pytest

from annotation import schema as S
from annotation.client import LabelStudioClient
from annotation.curation import decide_round, pull_round, push_round, round_status, wait_for_round
from annotation.export import export_curated
from annotation.rounds import get_round
from annotation.simulated import SimulatedAnnotator, full_answers
from pipeline.schema import CAPTION, ID, SOURCE_KEY

from .conftest import GOLD_PHOTOS, POOL_PHOTOS, ids_of


def photo_of(data: dict) -> str:
    return data["caption"].removeprefix("a photo: ").replace(" ", "_")


def gold_then(rule):
    """Answer gold photos correctly, the rest by ``rule(photo name)``."""

    def answer(round_, data):
        name = photo_of(data)
        if name in GOLD_PHOTOS:
            return full_answers(round_, GOLD_PHOTOS[name] == "keep", data, 0.5)
        return rule(round_, name, data)

    return answer


def test_generalist_then_specialist_then_export(labelstudio, photo_pool, gold_table, tmp_path, dev_mode):
    settings = labelstudio.settings()
    admin = LabelStudioClient(settings)
    work = tmp_path / "work"
    generalist = get_round("generalist", target_size=6)

    pushed = push_round(photo_pool, generalist, "trip", work, settings, gold=gold_table)
    assert (pushed.created, pushed.tasks, pushed.gold_per_project, len(pushed.project_ids)) == (14, 14, 2, 1)
    before = round_status(generalist, "trip", settings, gold=gold_table)
    assert (before.tasks, before.remaining, before.complete) == (14, 14, False)

    # alice keeps the first 8 photos, bob the first 4: the "any" rule keeps 8, two over the target of 6
    alice = SimulatedAnnotator(
        "alice@needles.test", "alice-password-1",
        lambda d: gold_then(lambda r, n, d: full_answers(r, POOL_PHOTOS.index(n) < 8, d, 0.5))(generalist, d),
    )
    bob = SimulatedAnnotator(
        "bob@needles.test", "bob-password-1",
        lambda d: gold_then(lambda r, n, d: full_answers(r, POOL_PHOTOS.index(n) < 4, d, 0.5))(generalist, d),
    )
    assert alice.annotate(admin, generalist, "trip") == 14
    assert bob.annotate(admin, generalist, "trip") == 14
    status = wait_for_round(generalist, "trip", settings, timeout_s=30, poll_s=1)
    assert status.complete and status.annotations == 28
    detailed = round_status(generalist, "trip", settings, gold=gold_table)
    assert {k: (v.annotations, v.gold_answered, v.gold_accuracy, v.flagged) for k, v in detailed.per_annotator.items()} == {
        "alice@needles.test": (14, 2, 1.0, False),
        "bob@needles.test": (14, 2, 1.0, False),
    }

    annotations = pq.read_table(pull_round(generalist, "trip", work, settings, gold=gold_table))
    assert annotations.num_rows == 28 and annotations[S.EXCLUSION_REASON].null_count == 28
    assert all(t > 0 for t in annotations[S.LEAD_TIME].to_pylist())
    summary = json.loads((work / "generalist" / "summary.json").read_text())
    # alice and bob disagree on photos 4-7 only: 10 of 14 tasks agree
    assert summary["pull"]["agreement"]["percent_agreement"] == pytest.approx(10 / 14)

    next_pool = decide_round(generalist, photo_pool, work)
    kept = {n for n in POOL_PHOTOS if _id(photo_pool, n) in set(ids_of(next_pool / "shard-00000.parquet"))}
    # photos 0-3 (both kept) first, then of 4-7 the two best aesthetic scores (6 and 7)
    assert kept == {POOL_PHOTOS[i] for i in (0, 1, 2, 3, 6, 7)}
    decide_summary = json.loads((work / "generalist" / "summary.json").read_text())["decide"]
    assert decide_summary["not_kept_by_reason"] == {"over_target": 2, "consensus_reject": 4}

    specialist = get_round("specialist", target_size=2)
    assert push_round(next_pool, specialist, "trip", work, settings).created == 6

    def specialist_rule(who, selects, quality):
        def rule(d):
            name = photo_of(d)
            if who == "bob" and name == POOL_PHOTOS[7]:
                return None  # bob skips this one; carol, a third specialist, picks it up
            answers = full_answers(specialist, name in selects, d, quality.get(name, 0.8))
            if name in selects:
                answers["caption"] = f"{who}'s caption of the {name.replace('_', ' ')}" + (
                    ", detailed and precise" if who == "alice" else ""
                )
            return answers

        return rule

    quality = {POOL_PHOTOS[2]: 0.3}  # both rate photo 2 lower: it loses the rank to photos 0 and 1
    SimulatedAnnotator("alice@needles.test", "alice-password-1",
                       specialist_rule("alice", set(POOL_PHOTOS[:3]) | {POOL_PHOTOS[6]}, quality)).annotate(
        admin, specialist, "trip")
    SimulatedAnnotator("bob@needles.test", "bob-password-1",
                       specialist_rule("bob", set(POOL_PHOTOS[:4]), quality)).annotate(admin, specialist, "trip")
    assert not round_status(specialist, "trip", settings).complete  # bob's skip leaves one task short
    assert SimulatedAnnotator("carol@needles.test", "carol-password-1",
                              specialist_rule("carol", set(), quality)).annotate(admin, specialist, "trip") == 1
    assert round_status(specialist, "trip", settings).complete

    table = pq.read_table(pull_round(specialist, "trip", work, settings))
    reasons = [r for r in table[S.EXCLUSION_REASON].to_pylist() if r]
    assert reasons == ["skipped"]
    curated_pool = decide_round(specialist, next_pool, work)
    curated = pq.read_table(curated_pool / "shard-00000.parquet")
    assert sorted(curated[SOURCE_KEY].to_pylist()) == sorted(POOL_PHOTOS[:2])
    assert all(c.startswith("alice's caption") for c in curated[CAPTION].to_pylist())
    assert set(curated[S.SOURCE_CAPTION].to_pylist()) == {f"a photo: {n.replace('_', ' ')}" for n in POOL_PHOTOS[:2]}

    out = export_curated(curated_pool, work / "curated")
    loaded = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    assert loaded.num_rows == 2
    assert sorted(loaded["text"]) == sorted(curated[CAPTION].to_pylist())
    sizes = {(r["image"].width, r["image"].height) for r in loaded}
    assert sizes == {(w, h) for w, h in zip(curated["width"].to_pylist(), curated["height"].to_pylist())}
    assert pq.read_table(out / "curated.parquet").num_rows == 2


def _id(pool, name: str) -> str:
    table = pq.read_table(pool, columns=[ID, SOURCE_KEY])
    return dict(zip(table[SOURCE_KEY].to_pylist(), table[ID].to_pylist()))[name]
