"""Human A/B rounds (annotation/abtest.py): pairs, gold and repeats built from a generation manifest made in
the test, then a whole round against the real Label Studio with simulated voters whose answers are known.

The manifest: real photos (scikit-image) as the "generated" images of two checkpoints. On the WIN prompts
the tuned image is sharp and the base one blurred, on the LOSS prompt the other way round, on the TIE prompts
both checkpoints made the same image. A voter who prefers the sharper image therefore gives the outcome table
below, by hand: 5 wins, 2 ties, 1 loss of 8 comparisons.
"""

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

from annotation import schema as S
from annotation.abstats import pair_outcomes
from annotation.abtest import (
    SharpnessVoter,
    ab_status,
    build_pairs,
    damage,
    get_criterion,
    pull_ab,
    push_ab,
    summarise_ab,
)
from annotation.client import LabelStudioClient, LabelStudioSettings
from annotation.layout import ABLayout
from annotation.rounds import AnnotationError
from model.evaluation.schema import MANIFEST_SCHEMA
from pipeline.scorers.technical import sharpness_and_contrast

#: photo -> the expected outcome of tuned (A) against base (B) for a voter preferring the sharper image
EXPECTED = {
    "astronaut": "a", "coffee": "a", "chelsea": "a", "rocket": "a", "camera": "a",
    "immunohistochemistry": "tie", "hubble_deep_field": "tie",
    "coins": "b",
}
CATEGORY = {"astronaut": "people", "camera": "people", "coffee": "objects", "rocket": "objects",
            "coins": "objects", "chelsea": "animals", "immunohistochemistry": "science",
            "hubble_deep_field": "science"}
MISSING_BASE, UNREADABLE_TUNED = "moon", "page"  # two more prompts whose images cannot make a pair
SIZE = 128


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def write_manifest(generate: Path) -> Path:
    """RUN/generate with images/<label>/<prompt_id>-s0.png and manifest.parquet (MANIFEST columns)."""
    rows = []
    for name in [*EXPECTED, MISSING_BASE, UNREADABLE_TUNED]:
        sharp = Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((SIZE, SIZE), Image.LANCZOS)
        blurred = sharp.filter(ImageFilter.GaussianBlur(2.5))
        outcome = EXPECTED.get(name, "a")
        images = {"tuned": sharp if outcome != "b" else blurred,
                  "base": sharp if outcome != "a" else blurred}
        for label, image in images.items():
            relative = f"images/{label}/p-{name}-s0.png"
            path = generate / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            if (name, label) == (UNREADABLE_TUNED, "tuned"):
                path.write_bytes(b"\x89PNG not really")
            elif (name, label) != (MISSING_BASE, "base"):
                path.write_bytes(_png(image))
            rows.append({
                "prompt_id": f"p-{name}", "prompt": f"a photo of the {name.replace('_', ' ')}",
                "category": CATEGORY.get(name, "other"), "seed": 0, "checkpoint": label,
                "checkpoint_path": f"/checkpoints/{label}", "image_path": relative, "height": SIZE, "width": SIZE,
                "num_inference_steps": 20, "guidance_scale": 7.5,
            })
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), generate / "manifest.parquet")
    return generate


@pytest.fixture(scope="module")
def generate_dir(tmp_path_factory) -> Path:
    return write_manifest(tmp_path_factory.mktemp("run") / "generate")


def sharpness(path: str) -> float:
    return sharpness_and_contrast(Path(path).read_bytes(), 256)[0]


def right_and_wrong(gold: dict) -> tuple[str, str]:
    """A gold pair's images: the one its answer names, then the other."""
    return (gold[S.IMAGE_A], gold[S.IMAGE_B]) if gold[S.GOLD_ANSWER] == "a" else (gold[S.IMAGE_B], gold[S.IMAGE_A])


# -- pairs (no server) -------------------------------------------------------------------------------------
def test_pairs_gold_repeats_and_quarantine(generate_dir, tmp_path):
    appeal = get_criterion("appeal")
    path = build_pairs(generate_dir, "tuned", "base", appeal, tmp_path)
    assert path == ABLayout(tmp_path, "appeal").pairs
    pairs = pq.read_table(path)
    assert pairs.schema == S.PAIRS_SCHEMA
    rows = pairs.to_pylist()
    assert Counter(r[S.KIND] for r in rows) == {"comparison": 8, "gold": 1, "repeat": 1}  # 5% of 8: at least one

    comparisons = [r for r in rows if r[S.KIND] == "comparison"]
    assert {r[S.PROMPT_ID] for r in comparisons} == {f"p-{n}" for n in EXPECTED}
    for r in comparisons:
        assert (r[S.CHECKPOINT_A], r[S.CHECKPOINT_B]) == ("tuned", "base")
        assert r[S.IMAGE_A].endswith(f"/tuned/{r[S.PROMPT_ID]}-s0.png") and Path(r[S.IMAGE_A]).is_absolute()
        assert len(r[S.PAIR_ID]) == 16 and int(r[S.PAIR_ID], 16) >= 0  # opaque hex, no label inside
    assert {r[S.LEFT] for r in comparisons} == {"a", "b"}  # a coin flip, not a constant side

    (gold,) = [r for r in rows if r[S.KIND] == "gold"]
    right, wrong = right_and_wrong(gold)
    assert Path(wrong).parent == ABLayout(tmp_path, "appeal").gold_images  # the damaged copy, beside the pairs
    assert wrong.endswith("-blur.png") and sharpness(wrong) < 0.9 * sharpness(right)
    assert right.endswith(f"/{gold[S.PROMPT_ID]}-s0.png")

    (repeat,) = [r for r in rows if r[S.KIND] == "repeat"]
    (original,) = [r for r in comparisons if r[S.PAIR_ID] == repeat[S.REPEAT_OF]]
    assert (repeat[S.IMAGE_A], repeat[S.IMAGE_B]) == (original[S.IMAGE_A], original[S.IMAGE_B])
    assert repeat[S.LEFT] != original[S.LEFT]  # shown with the sides swapped

    quarantine = pq.read_table(ABLayout(tmp_path, "appeal").pairs_quarantine).to_pylist()
    assert sorted((q["source_key"], q["reason"]) for q in quarantine) == [
        (f"base/p-{MISSING_BASE}/s0", "missing_image"),
        (f"base/p-{UNREADABLE_TUNED}/s0", "partner_image_unusable"),
        (f"tuned/p-{MISSING_BASE}/s0", "partner_image_unusable"),
        (f"tuned/p-{UNREADABLE_TUNED}/s0", "unreadable_image"),
    ]
    # every manifest row is in a comparison or in the quarantine: nothing silently lost
    assert 2 * len(comparisons) + len(quarantine) == pq.read_table(generate_dir / "manifest.parquet").num_rows

    # the same seed gives the same pairs; another seed other coin flips
    again = pq.read_table(build_pairs(generate_dir, "tuned", "base", appeal, tmp_path / "again"))
    assert again.drop_columns([S.IMAGE_A, S.IMAGE_B]) == pairs.drop_columns([S.IMAGE_A, S.IMAGE_B])
    other = pq.read_table(build_pairs(generate_dir, "tuned", "base", appeal, tmp_path / "other", seed=1))
    assert other[S.LEFT].to_pylist() != pairs[S.LEFT].to_pylist()


def test_faithfulness_gold_is_another_prompts_image(generate_dir, tmp_path):
    from model.evaluation.schema import read_manifest

    faithfulness = get_criterion("faithfulness")
    pairs = pq.read_table(build_pairs(read_manifest(generate_dir), "tuned", "base", faithfulness, tmp_path,
                                      gold_fraction=0.25)).to_pylist()
    gold = [r for r in pairs if r[S.KIND] == "gold"]
    assert len(gold) == 2
    for r in gold:
        right, wrong = right_and_wrong(r)
        assert Path(right).name == f"{r[S.PROMPT_ID]}-s0.png"
        assert Path(wrong).name != Path(right).name and Path(wrong).parent == Path(right).parent


def test_damages_are_visible():
    image = Image.fromarray(skimage.data.astronaut()).convert("RGB").resize((SIZE, SIZE))
    sharp = sharpness_and_contrast(_png(image), 256)[0]
    assert sharpness_and_contrast(_png(damage(image, "blur")), 256)[0] < 0.05 * sharp
    import numpy as np

    original = np.asarray(image, dtype=np.float32)
    for kind in ("jpeg", "text"):
        changed = np.abs(np.asarray(damage(image, kind), dtype=np.float32) - original).mean()
        assert changed > 5, kind  # mean absolute change of more than 5 grey levels: plainly visible
    with pytest.raises(AnnotationError, match="unknown damage"):
        damage(image, "smudge")


def test_bad_input_is_refused_with_the_reason(generate_dir, tmp_path):
    appeal = get_criterion("appeal")
    with pytest.raises(AnnotationError, match="two different checkpoints"):
        build_pairs(generate_dir, "tuned", "tuned", appeal, tmp_path)
    with pytest.raises(AnnotationError, match="'sdxl' is not in the manifest"):
        build_pairs(generate_dir, "tuned", "sdxl", appeal, tmp_path)
    table = pq.read_table(generate_dir / "manifest.parquet").drop_columns(["category"])
    with pytest.raises(AnnotationError, match="lacks the columns"):
        build_pairs(table, "tuned", "base", appeal, tmp_path)
    faithfulness = get_criterion("faithfulness")
    build_pairs(generate_dir, "tuned", "base", faithfulness, tmp_path)
    nowhere = LabelStudioSettings(url="http://127.0.0.1:9", api_key="unused", document_root=tmp_path)
    with pytest.raises(AnnotationError, match="over Label Studio's 50: use a campaign name of at most 28"):
        push_ab(faithfulness, "c" * 30, tmp_path, nowhere)  # refused before any request
    with pytest.raises(AnnotationError, match="unknown A/B criterion"):
        get_criterion("beauty")
    with pytest.raises(ValueError):
        get_criterion("appeal", votes_per_pair=0)


def test_criteria_choices_sides_and_results():
    faithfulness = get_criterion("faithfulness", votes_per_pair=7)
    assert faithfulness.votes_per_pair == 7 and get_criterion("faithfulness").votes_per_pair == 3
    assert (get_criterion("appeal").votes_per_pair, get_criterion("flaws").votes_per_pair) == (5, 5)
    # Emu §4: "Both" and "Neither" are a tie
    assert {c: faithfulness.sides[c] for c in faithfulness.choices} == {
        "A": "left", "B": "right", "Both": "tie", "Neither": "tie"}
    assert "$prompt" in faithfulness.label_config and "$prompt" not in get_criterion("appeal").label_config
    result = faithfulness.result_for("Neither")
    assert faithfulness.answers_from_result(result) == ({"choice": "Neither"}, [])
    assert faithfulness.answers_from_result([]) == ({}, ["choice"])
    with pytest.raises(AnnotationError, match="not a choice"):
        faithfulness.result_for("Left")


def test_summary_of_hand_written_votes(generate_dir, tmp_path):
    """Three voters on the comparison pairs, written by hand: plurality and margin differ where the vote is
    2 to 1, a pair nobody voted on is counted, a skip is counted and not used."""
    appeal = get_criterion("appeal", votes_per_pair=3)
    pairs = pq.read_table(build_pairs(generate_dir, "tuned", "base", appeal, tmp_path)).to_pylist()
    by_prompt = {r[S.PROMPT_ID]: r for r in pairs if r[S.KIND] == "comparison"}
    # prompt -> the three voters' votes (None: skipped); coins gets no vote at all
    ballots = {
        "p-astronaut": ("a", "a", "a"),  # plurality a, margin a
        "p-coffee": ("a", "a", "b"),  # plurality a, margin tie (a 1-vote margin)
        "p-chelsea": ("a", "tie", "tie"),  # plurality tie, margin tie
        "p-rocket": ("b", "b", None),  # plurality b, margin b
        "p-camera": ("a", "b", "tie"),  # plurality tie (three-way), margin tie
        "p-immunohistochemistry": ("tie", "tie", "a"),  # plurality tie, margin tie
        "p-hubble_deep_field": ("a", "a", "tie"),  # plurality a, margin a (2 to 0)
    }
    rows = []
    for prompt_id, votes in ballots.items():
        pair = by_prompt[prompt_id]
        for i, vote in enumerate(votes):
            side = None if vote is None else "tie" if vote == "tie" else "left" if vote == pair[S.LEFT] else "right"
            rows.append({S.PAIR_ID: pair[S.PAIR_ID], S.KIND: "comparison", S.PROMPT_ID: prompt_id,
                         S.ANNOTATOR: f"v{i}", S.RAW_CHOICE: side and side.title(), S.SIDE: side, S.VOTE: vote,
                         S.TASK_ID: len(rows), S.PROJECT_ID: 1, S.ANNOTATION_ID: len(rows), S.LEAD_TIME: 1.0,
                         S.EXCLUSION_REASON: "skipped" if vote is None else None})
    pq.write_table(pa.Table.from_pylist(rows, schema=S.VOTES_SCHEMA), ABLayout(tmp_path, "appeal").votes)
    summary = json.loads(summarise_ab(appeal, tmp_path, n_boot=200).read_text())
    plurality, margin = summary["comparison"]["plurality"], summary["comparison"]["margin"]
    assert (plurality["wins"], plurality["ties"], plurality["losses"]) == (3, 3, 1)
    assert (margin["wins"], margin["ties"], margin["losses"]) == (2, 4, 1)
    assert plurality["n_pairs"] == 7 and plurality["net_win"] == pytest.approx(2 / 7)
    assert summary["counts"]["comparison_pairs_without_valid_vote"] == 1
    assert summary["counts"]["excluded_by_reason"] == {"skipped": 1}
    assert summary["counts"]["valid"] == 20 and summary["counts"]["votes"] == 21
    assert summary["counts"]["pairs"] == {"comparison": 8, "gold": 1, "repeat": 1}
    people = summary["by_category"]["people"]["plurality"]  # astronaut (a) and camera (tie)
    assert (people["wins"], people["ties"], people["losses"]) == (1, 1, 0)
    assert summary["gold_accuracy"] == {} and summary["repeat_consistency"]["n"] == 0


# -- a whole round in the real Label Studio ----------------------------------------------------------------
def test_appeal_round_with_simulated_voters(labelstudio, generate_dir, tmp_path, dev_mode):
    settings = labelstudio.settings()
    admin = LabelStudioClient(settings)
    appeal = get_criterion("appeal", votes_per_pair=3)
    work = tmp_path / "ab"
    pairs = pq.read_table(build_pairs(generate_dir, "tuned", "base", appeal, work)).to_pylist()
    pushed = push_ab(appeal, "abtrip", work, settings)
    assert (pushed.tasks, pushed.created, pushed.already_present, pushed.quarantined) == (10, 10, 0, 0)
    assert (again := push_ab(appeal, "abtrip", work, settings)).created == 0  # idempotent re-push
    assert (again.already_present, again.project_ids) == (10, pushed.project_ids)
    task = next(iter(admin.sdk.tasks.list(project=pushed.project_ids[0], fields="task_only", include="id,data")))
    assert set(task.data) == {"pool_id", "image_left", "image_right"}  # no prompt, no checkpoint, no side
    assert all("tuned" not in v and "base" not in v for v in task.data.values())

    # dave prefers the blurrier image (fails the blurred gold pair and is flagged); bob skips some pairs,
    # which Label Studio then gives to carol. Each pair ends with 3 votes: dave's, alice's, bob's or carol's.
    dave = SharpnessVoter("dave@needles.test", "dave-password-1", contrarian=True)
    alice = SharpnessVoter("alice@needles.test", "alice-password-1")
    bob = SharpnessVoter("bob@needles.test", "bob-password-1", skip_rate=0.3)
    carol = SharpnessVoter("carol@needles.test", "carol-password-1")
    done = {v.email: v.vote(admin, appeal, "abtrip") for v in (dave, alice, bob, carol)}
    skipped = done[bob.email]["skipped"]
    assert skipped > 0 and done[bob.email]["answered"] == 10 - skipped
    assert done[carol.email] == {"answered": skipped}
    status = ab_status(appeal, "abtrip", settings, work=work)
    assert status.complete and (status.tasks, status.annotations, status.skipped) == (10, 30, skipped)
    assert status.per_annotator[dave.email].flagged and not status.per_annotator[alice.email].flagged

    votes = pq.read_table(pull_ab(appeal, "abtrip", work, settings))
    # votes pulled = annotations made, skips included
    assert votes.num_rows == sum(d.total() for d in done.values()) == 30 + skipped
    rows = votes.to_pylist()
    assert Counter(r[S.EXCLUSION_REASON] for r in rows) == {None: 21, "skipped": skipped,
                                                             "annotator_failed_gold": 9}
    assert all(r[S.VOTE] is None for r in rows if r[S.EXCLUSION_REASON] == "skipped")

    # the hand-computed outcome table, pair by pair (dave's votes excluded: alice and bob/carol remain)
    prompt_of = {r[S.PAIR_ID]: r[S.PROMPT_ID] for r in pairs}
    valid = [(r[S.PAIR_ID], r[S.ANNOTATOR], r[S.VOTE]) for r in rows
             if r[S.EXCLUSION_REASON] is None and r[S.KIND] == "comparison"]
    outcomes = {prompt_of[p]: o for p, o in pair_outcomes(valid).items()}
    assert outcomes == {f"p-{name}": outcome for name, outcome in EXPECTED.items()}

    summary = json.loads(summarise_ab(appeal, work).read_text())
    for rule in ("plurality", "margin"):  # two agreeing valid votes per pair: a 2-vote margin everywhere
        result = summary["comparison"][rule]
        assert (result["wins"], result["ties"], result["losses"]) == (5, 2, 1)
        assert result["win"] == pytest.approx(5 / 8) and result["net_win"] == pytest.approx(4 / 8)
        low, high = result["ci"]["win"]
        assert low <= 5 / 8 <= high and low < high
    assert summary["flagged_annotators"] == [dave.email]
    assert summary["gold_accuracy"][dave.email]["accuracy"] == 0.0
    assert all(acc["accuracy"] == 1.0 for who, acc in summary["gold_accuracy"].items() if who != dave.email)
    consistency = summary["repeat_consistency"]
    assert consistency["rate"] == 1.0 and consistency["n"] >= 1  # alice saw both the pair and its repeat
    assert summary["agreement"]["fleiss_kappa"] == pytest.approx(1.0)  # every valid pair of votes agrees
    # position bias, by hand: each decisive comparison or repeat has two valid votes for its sharper side
    expected_left = n_decisive = 0
    for pair in pairs:
        if pair[S.KIND] == "gold":
            continue
        outcome = EXPECTED[prompt_of[pair[S.PAIR_ID]].removeprefix("p-")]
        if outcome != "tie":
            n_decisive += 2
            expected_left += 2 * (outcome == pair[S.LEFT])
    bias = summary["position_bias"]
    assert bias["n_decisive"] == n_decisive and bias["left_share"] == pytest.approx(expected_left / n_decisive)
    assert summary["counts"]["excluded_by_reason"] == {"skipped": skipped, "annotator_failed_gold": 9}
    assert summary["counts"]["comparison_pairs_without_valid_vote"] == 0


def test_cli_builds_pairs_and_names_bad_input(generate_dir, tmp_path, capsys):
    from annotation.__main__ import main

    assert main(["ab-pairs", "--criterion", "flaws", "--manifest", str(generate_dir), "--a", "tuned", "--b", "base",
                 "--work", str(tmp_path)]) == 0
    assert pq.read_table(ABLayout(tmp_path, "flaws").pairs).num_rows == 10
    assert main(["ab-pairs", "--criterion", "flaws", "--manifest", str(tmp_path / "nowhere"), "--a", "tuned",
                 "--b", "base", "--work", str(tmp_path)]) == 2
    assert "manifest.parquet does not exist" in capsys.readouterr().err
