"""Active learning (annotation/active.py): the head beats a constant on simulated votes, its calibration,
the learned order needs fewer annotations on a simulated pool, the run-level step (ranking, proposals,
the report's section), and the learned order as Label Studio serves it."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from annotation.active import (
    ActiveError, Head, compare_orders, learn, platt_fit, propose_review, propose_tighten, reliability, task_priority,
    train_head, weighted_auc,
)
from annotation.client import POOL_ID_KEY, LabelStudioClient
from annotation.curation import push_round
from annotation.layout import ActiveLayout
from annotation.rounds import get_round
from annotation.simulated import SimulatedAnnotator, full_answers
from pipeline.config import load_config
from pipeline.report import build_report
from pipeline.schema import ID

from .chain import CONFIG, pipeline_run, scripted_round, sharp_rule
from .conftest import ids_of


def simulated_votes(n: int, d: int, seed: int, signal: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features and two simulated annotators' votes per image, keep ~ Bernoulli(sigmoid(signal * x . beta))."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    beta = rng.normal(size=d)
    p = 1 / (1 + np.exp(-signal * x @ beta))
    pos = rng.binomial(2, p).astype(float)
    return x, pos, 2 - pos


def test_weighted_auc_is_the_pairwise_probability():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 6, 40).astype(float)  # ties on purpose
    pos, neg = rng.integers(0, 3, 40).astype(float), rng.integers(0, 3, 40).astype(float)
    wins = sum(pos[i] * neg[j] * (1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0)
               for i in range(40) for j in range(40))
    assert weighted_auc(scores, pos, neg) == pytest.approx(wins / (pos.sum() * neg.sum()))


def test_head_beats_a_constant_on_simulated_votes_and_noise_does_not():
    x, pos, neg = simulated_votes(400, 6, seed=0)
    head, report = train_head(x, pos, neg, "scores", [f"f{i}" for i in range(6)], "generalist")
    assert report.auc > 0.75 and report.auc_ci[0] > 0.5  # held-out (out-of-fold), over votes
    assert report.brier < report.brier_constant and report.beats_constant
    assert report.ece < 0.08 and sum(b["votes"] for b in report.reliability) == report.votes
    assert Head.from_dict(json.loads(json.dumps(head.to_dict()))).predict(x) == pytest.approx(head.predict(x))
    # votes that do not depend on the features: the head must not claim to beat a constant
    rng = np.random.default_rng(5)
    noise_pos = rng.binomial(2, 0.4, 400).astype(float)
    _, noise = train_head(x, noise_pos, 2 - noise_pos, "scores", [], "generalist")
    assert not noise.beats_constant
    with pytest.raises(ActiveError, match="votes of both kinds"):
        train_head(x, pos + neg, 0 * neg, "scores", [], "specialist")


def test_platt_scaling_calibrates_an_overconfident_logit():
    rng = np.random.default_rng(2)
    true_logit = rng.normal(0, 1.5, 3000)
    pos = rng.binomial(1, 1 / (1 + np.exp(-true_logit))).astype(float)
    overconfident = 3.0 * true_logit
    a, c = platt_fit(overconfident, pos, 1 - pos)
    assert a == pytest.approx(1 / 3, abs=0.05) and abs(c) < 0.1
    raw = reliability(1 / (1 + np.exp(-overconfident)), pos, 1 - pos)[1]
    calibrated = reliability(1 / (1 + np.exp(-(a * overconfident + c))), pos, 1 - pos)[1]
    assert calibrated < raw / 2


def test_learned_order_needs_fewer_annotations_on_a_simulated_pool():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 8))
    quality = x[:, :3] @ np.array([1.0, 0.7, 0.5]) + rng.normal(0, 0.7, 3000)
    threshold = float(np.quantile(quality, 0.97))
    result = compare_orders(x, quality, target=30, batch=100, seeds=5, threshold=threshold, noise=0.3, kind="clip")
    # random order needs ~ target / keep rate; the learned order far fewer, on every seed
    assert result.mean["random"] == pytest.approx(30 / result.keep_rate, rel=0.35)
    assert all(learned < random for learned, random in zip(result.needed["learned"], result.needed["random"]))
    assert result.saving_ci[0] > 0.3
    assert result.curves["learned"][299] > result.curves["random"][299]


def test_threshold_proposals_need_evidence():
    rng = np.random.default_rng(3)
    values = rng.uniform(10, 100, 200)  # a ">=" filter at 10: annotators reject what lies below 30
    pos = (values > 30).astype(float) * 2
    tighten = propose_tighten(values, pos, 2 - pos, "min_sharpness", "sharpness", ">=", 10.0)
    assert tighten.direction == "tighten" and 10 < tighten.proposed < 35 and tighten.rows_affected >= 10
    assert "0% of the keep votes lost" in tighten.evidence
    flat = np.full(200, 1.0)  # votes that do not depend on the score: no proposal
    assert propose_tighten(values, flat, flat, "min_sharpness", "sharpness", ">=", 10.0) is None
    # rows the filter alone drops, which the head likes as much as the annotated pool: review, not applied
    dropped = rng.uniform(0, 10, 40)
    review = propose_review(dropped, rng.uniform(0.5, 0.9, 40), rng.uniform(0.1, 0.8, 200), "min_sharpness",
                            "sharpness", ">=", 10.0)
    assert review.direction == "review" and review.proposed < 10.0 and review.rows_affected == 20
    assert propose_review(dropped, np.full(40, 0.05), rng.uniform(0.1, 0.8, 200), "min_sharpness", "sharpness",
                          ">=", 10.0) is None


@pytest.fixture(scope="module")
def voted_run(tmp_path_factory):
    """A pipeline run of 80 photos whose generalists keep the sharper half (tests/annotation/chain.py)."""
    run = pipeline_run(tmp_path_factory.mktemp("active"))
    scripted_round(run.annotation, "generalist", run.pool, sharp_rule(run))
    return run


def test_learn_ranks_every_scored_row_and_proposes_thresholds_shown_not_applied(voted_run, tmp_path):
    result = learn(voted_run.root)
    assert result.features == "scores"  # no CLIP column; MobileNetV2 not staged in the tests' environment
    (report,) = result.reports
    assert report.round == "generalist" and report.beats_constant and report.auc > 0.7
    ranking = pq.read_table(result.ranking)
    scored = pq.read_table(voted_run.selection)
    assert sorted(ranking[ID].to_pylist()) == sorted(scored[ID].to_pylist())
    probability = ranking["keep_probability"].to_numpy()
    assert (np.diff(probability) <= 0).all() and ranking["rank"].to_pylist() == list(range(1, len(ranking) + 1))
    # the un-annotated rows (dropped by the filters) are ranked too
    assert (~ranking["annotated"].to_numpy()).sum() == (~scored["keep"].to_numpy()).sum() > 0
    # push_round's priority: the best-ranked id first
    priority = task_priority(result.ranking)
    assert list(priority) == ranking[ID].to_pylist() and max(priority.values()) == priority[ranking[ID][0].as_py()]
    # the annotators keep the sharper photos: a stricter min_sharpness is proposed, with its evidence
    sharpness = [p for p in result.proposals if p.filter == "min_sharpness"]
    assert sharpness and sharpness[0].direction == "tighten" and sharpness[0].proposed > CONFIG["filters"]["min_sharpness"]
    # shown in the selection report, never applied: the selection is untouched
    before = pq.read_table(voted_run.selection)
    html = build_report(voted_run.root, load_config(voted_run.root.parent / "pipeline.yaml")).read_text()
    assert "Learned from the annotators" in html and "min_sharpness" in html and "not applied" in html
    assert pq.read_table(voted_run.selection).equals(before)
    summary = json.loads(ActiveLayout(voted_run.annotation).summary.read_text())
    assert summary["rounds"][0]["beats_constant"] and summary["proposals"]


def test_label_studio_serves_the_likely_keeps_first(labelstudio, photo_pool, tmp_path, dev_mode):
    """push_round(priority=...) imports by keep-probability and the project samples sequentially, so an
    annotator's /next walks the tasks in that order (here: the reverse of the pool-id order)."""
    settings = labelstudio.settings()
    ids = sorted(ids_of(photo_pool))
    priority = {pool_id: rank / len(ids) for rank, pool_id in enumerate(ids)}  # the last id is the likeliest
    generalist = get_round("generalist", overlap=1)
    push_round(photo_pool, generalist, "order", tmp_path / "work", settings, priority=priority)
    seen = []

    def answer(data):
        seen.append(data[POOL_ID_KEY])
        return full_answers(generalist, True, data, 0.5)

    SimulatedAnnotator("carol@needles.test", "carol-password-1", answer).annotate(
        LabelStudioClient(settings), generalist, "order")
    assert seen == ids[::-1]

