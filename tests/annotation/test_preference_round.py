"""The preference round (issue 15): 5 candidates per prompt, best and worst, gold tasks and agreement, through
the real Label Studio (the session server of tests/conftest.py) with scripted rankers, exported to a pairs
Parquet that preference tuning reads."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import skimage.data
from PIL import Image, ImageFilter

from annotation import preference as AP
from annotation.client import LabelStudioClient
from annotation.rounds import AnnotationError
from model.evaluation.schema import MANIFEST_SCHEMA

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket"]
BLUR = [0, 0.5, 1.0, 1.5, 2.0]  # seed k of a prompt is the photo blurred by BLUR[k]: seed 0 the sharpest
SIZE = 96


def write_manifest(generate: Path, short: str = "camera") -> Path:
    """RUN/generate of one checkpoint, 5 seeds per prompt (and a prompt ``short`` with only 3)."""
    rows = []
    for name in [*PHOTOS, short]:
        photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((SIZE, SIZE), Image.LANCZOS)
        for seed, radius in enumerate(BLUR[: 3 if name == short else 5]):
            relative = f"images/current/p-{name}-s{seed}.png"
            (generate / relative).parent.mkdir(parents=True, exist_ok=True)
            (photo.filter(ImageFilter.GaussianBlur(radius)) if radius else photo).save(generate / relative)
            rows.append({"prompt_id": f"p-{name}", "prompt": f"a photo of the {name}", "category": "photos",
                         "seed": seed, "checkpoint": "current", "checkpoint_path": "/checkpoints/current",
                         "image_path": relative, "height": SIZE, "width": SIZE, "num_inference_steps": 20,
                         "guidance_scale": 5.0})
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), generate / "manifest.parquet")
    return generate


@pytest.fixture(scope="module")
def generate_dir(tmp_path_factory) -> Path:
    return write_manifest(tmp_path_factory.mktemp("run") / "generate")


def test_candidates_shuffled_gold_and_quarantine(generate_dir, tmp_path):
    table = pq.read_table(AP.build_candidates(generate_dir, tmp_path / "round", gold_fraction=0.25)).to_pylist()
    tasks = [r for r in table if r[AP.KIND] == "candidates"]
    gold = [r for r in table if r[AP.KIND] == "gold"]
    assert sorted(r[AP.PROMPT_ID] for r in tasks) == sorted(f"p-{n}" for n in PHOTOS) and len(gold) == 1
    columns = [f"image_{i}" for i in range(1, 6)]
    for task in tasks:  # every seed once, in a shuffled order
        assert sorted(Path(task[c]).stem[-2:] for c in columns) == [f"s{k}" for k in range(5)]
    assert any([Path(t[c]).stem[-2:] for c in columns] != [f"s{k}" for k in range(5)] for t in tasks)
    damaged = gold[0][f"image_{gold[0][AP.GOLD_WORST]}"]
    assert "/gold/" in damaged and Path(damaged).is_file()
    quarantine = pq.read_table(tmp_path / "round" / "candidates-quarantine.parquet").to_pylist()
    assert [(q["source_key"], q["reason"]) for q in quarantine] == [("p-camera", "too_few_candidates")]
    with pytest.raises(AnnotationError, match="not in the manifest"):
        AP.build_candidates(generate_dir, tmp_path / "other", checkpoint="tuned")


def test_round_trip_through_label_studio(labelstudio, generate_dir, tmp_path, dev_mode):
    settings = labelstudio.settings()
    work = tmp_path / "round"
    AP.build_candidates(generate_dir, work, gold_fraction=0.25)
    round_ = AP.PreferenceRound(votes_per_task=3)
    pushed = AP.push_preference("preftrip", work, settings, round_)
    assert (pushed["tasks"], pushed["created"]) == (5, 5)
    assert AP.push_preference("preftrip", work, settings, round_)["created"] == 0  # idempotent re-push
    admin = LabelStudioClient(settings)
    task = next(iter(admin.sdk.tasks.list(project=pushed["project_ids"][0], fields="task_only", include="id,data")))
    assert set(task.data) == {"pool_id", "prompt", *(f"image_{i}" for i in range(1, 6))}
    assert all("-s" not in task.data[f"image_{i}"] for i in range(1, 6))  # content-hash names: no seed shown

    # eve ranks backwards (the damaged gold image as best): flagged on gold, her other votes excluded
    alice = AP.SharpnessRanker("pref-alice@needles.test", "alice-password-1")
    bob = AP.SharpnessRanker("pref-bob@needles.test", "bob-password-1")
    eve = AP.SharpnessRanker("pref-eve@needles.test", "eve-password-1", contrarian=True)
    assert [r.rank(admin, "preftrip", round_) for r in (alice, bob, eve)] == [5, 5, 5]
    status = AP.preference_status("preftrip", settings, round_)
    assert status.complete and (status.tasks, status.annotations) == (5, 15)

    votes = pq.read_table(AP.pull_preference("preftrip", work, settings, round_)).to_pylist()
    assert Counter(v["exclusion_reason"] for v in votes) == {None: 11, "annotator_failed_gold": 4}
    summary = json.loads((work / "summary.json").read_text())
    assert summary["flagged_annotators"] == [eve.email]
    assert summary["gold_accuracy"][alice.email]["accuracy"] == 1.0
    assert summary["agreement"]["best"]["fleiss_kappa"] == pytest.approx(1.0)  # alice and bob always agree
    assert summary["agreement"]["worst"]["fleiss_kappa"] == pytest.approx(1.0)

    pairs = AP.read_pairs(AP.export_pairs(work, "preftrip"), ["human"]).to_pylist()
    assert sorted(p[AP.PROMPT_ID] for p in pairs) == sorted(f"p-{n}" for n in PHOTOS)
    for pair in pairs:  # the sharpest candidate wins, the blurriest loses, two valid votes each
        assert Path(pair[AP.WINNER_REF]).stem.endswith("-s0") and Path(pair[AP.LOSER_REF]).stem.endswith("-s4")
        assert pair[AP.WINNER_IMAGE] == Path(pair[AP.WINNER_REF]).read_bytes()
        assert Image.open(io.BytesIO(pair[AP.LOSER_IMAGE])).size == (SIZE, SIZE)
        assert (pair[AP.FEEDBACK_COL], pair[AP.VOTES], pair[AP.WINNER_VOTES], pair[AP.LOSER_VOTES]) == ("human", 2, 2, 2)
    with pytest.raises(AnnotationError, match="only \\['ai'\\]"):  # human votes never train an AI-feedback run
        AP.read_pairs(work / "pairs.parquet", ["ai"])


def test_judge_pairs_are_ai_feedback(generate_dir, tmp_path):
    pairs = AP.read_pairs(AP.judge_pairs(generate_dir, tmp_path / "ai" / "pairs.parquet"), ["ai"]).to_pylist()
    assert len(pairs) == 5 and all(p[AP.FEEDBACK_COL] == "ai" and p[AP.JUDGE] == "sharpness" for p in pairs)
    assert all(Path(p[AP.WINNER_REF]).stem.endswith("-s0") and p[AP.WINNER_SCORE] > p[AP.LOSER_SCORE] for p in pairs)
    with pytest.raises(AnnotationError, match="feedback \\{'ai': 5\\}"):
        AP.read_pairs(tmp_path / "ai" / "pairs.parquet", ["human"])


def test_pairs_from_an_ab_round_take_the_plurality_winner(generate_dir, tmp_path):
    """An A/B round's tables (as pull_ab writes them) by hand: a pair won 2-1 by A, one won 2-0 by B (a third
    vote excluded), one tied 1-1: two pairs, labelled ab_round, winner and loser by the votes."""
    from annotation import schema as S
    from annotation.layout import ABLayout

    layout = ABLayout(tmp_path / "ab", "flaws")
    layout.root.mkdir(parents=True)
    image = {k: str(generate_dir / f"images/current/p-{name}-s{k}.png") for k, name in ((0, "rocket"), (4, "rocket"))}
    pairs = [{S.PAIR_ID: pid, S.KIND: "comparison", S.PROMPT_ID: f"p-{pid}", S.PROMPT: f"prompt {pid}",
              S.CATEGORY: "x", S.SEED: 0, S.CHECKPOINT_A: "tuned", S.CHECKPOINT_B: "base", S.IMAGE_A: image[0],
              S.IMAGE_B: image[4], S.LEFT: "a", S.GOLD_ANSWER: None, S.REPEAT_OF: None} for pid in ("x", "y", "z")]
    pq.write_table(pa.Table.from_pylist(pairs, schema=S.PAIRS_SCHEMA), layout.pairs)
    votes = [("x", "u1", "a", None), ("x", "u2", "a", None), ("x", "u3", "b", None), ("y", "u1", "b", None),
             ("y", "u2", "b", None), ("y", "u3", "a", "annotator_failed_gold"), ("z", "u1", "a", None),
             ("z", "u2", "b", None)]
    rows = [{S.PAIR_ID: p, S.KIND: "comparison", S.PROMPT_ID: f"p-{p}", S.ANNOTATOR: who, S.RAW_CHOICE: None,
             S.SIDE: None, S.VOTE: vote, S.TASK_ID: i, S.PROJECT_ID: 1, S.ANNOTATION_ID: i, S.LEAD_TIME: 1.0,
             S.EXCLUSION_REASON: why} for i, (p, who, vote, why) in enumerate(votes)]
    pq.write_table(pa.Table.from_pylist(rows, schema=S.VOTES_SCHEMA), layout.votes)
    out = AP.read_pairs(AP.ab_pairs(tmp_path / "ab", "flaws", tmp_path / "pairs.parquet"), ["ab_round"]).to_pylist()
    got = {p[AP.PROMPT_ID]: (p[AP.WINNER_REF], p[AP.LOSER_REF], p[AP.VOTES], p[AP.WINNER_VOTES], p[AP.LOSER_VOTES])
           for p in out}
    assert got == {"p-x": (image[0], image[4], 3, 2, 1), "p-y": (image[4], image[0], 2, 2, 0)}
    assert {p[AP.FEEDBACK_COL] for p in out} == {"ab_round"} and {p[AP.JUDGE] for p in out} == {"ab-flaws"}
