"""Annotations that teach the filters (active learning): a learned keep-probability per image.

    learn(run_dir)                  -> ActiveResult: per round a head, its held-out AUC and calibration;
                                       RUN/annotation/active/{heads.json, ranking.parquet, proposals.json}
    task_priority(ranking)          -> {pool id: keep-probability}: push_round(priority=...) imports the
                                       likely keeps first (Label Studio serves tasks in import order)
    propose_thresholds(...)         -> threshold changes for the automatic filters, shown in the report,
                                       never applied
    compare_orders(...)             -> annotations needed to reach a target of keeps, random vs learned
                                       order, with simulated annotators on a pool of known quality

The head is an L2-regularised logistic regression (a binomial GLM: each image's positive and negative
votes are its successes and failures) on the stored features: the CLIP image embedding when the run has
one, else the ImageNet MobileNetV2 features of the thumbnails (when its weights are staged), else the
cheap scores (quadratic in them: see Head). Its probabilities are calibrated by Platt scaling (Platt 1999: a 1-d logistic fit of the
label on the head's out-of-fold logit). Held-out figures are out-of-fold (k-fold over images): the AUC
is the Mann-Whitney statistic over votes (Hanley & McNeil 1982) with a bootstrap CI over images, and a
reliability table with its expected calibration error (Naeini et al. 2015). A constant predictor (the
vote share) has AUC 0.5 and the Brier score ``brier_constant``; the head must beat both to be used.

The keep-probability of an image is the product of its per-round probabilities (chain rule: kept at the
end = kept by the generalists, then selected by the specialists).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.optimize import minimize

from annotation import schema as S
from annotation.layout import ActiveLayout, RoundLayout
from annotation.rounds import ROUNDS
from pipeline.config import FILTERS_BY_NAME
from pipeline.errors import UserError
from pipeline.layout import RunLayout
from pipeline.schema import (
    AESTHETIC_SCORE, ASPECT_RATIO, CLIP_IMAGE_EMBEDDING, CLIP_SCORE, CONCEPT_CONFIDENCE, CONTRAST, DROP_REASON,
    DROP_REASONS, ENGAGEMENT, ID, KEEP, MEGAPIXELS, MIN_SIDE, NSFW_SCORE, OCR_TEXT_AREA, OCR_WORD_COUNT, SHARPNESS,
    THUMBNAIL,
)
from pipeline.select import selection_summary

log = logging.getLogger(__name__)

#: the cheap scores the fallback head reads (whichever the run has); heavy-tailed ones enter as log1p
SCORE_FEATURES = (ASPECT_RATIO, MIN_SIDE, MEGAPIXELS, SHARPNESS, CONTRAST, OCR_WORD_COUNT, OCR_TEXT_AREA,
                  NSFW_SCORE, CLIP_SCORE, AESTHETIC_SCORE, CONCEPT_CONFIDENCE, ENGAGEMENT)
LOG_FEATURES = {MIN_SIDE, MEGAPIXELS, SHARPNESS, OCR_WORD_COUNT, ENGAGEMENT}
FEATURE_KINDS = ("auto", "clip", "imagenet", "scores")
KEEP_PROBABILITY = "keep_probability"
RANK = "rank"
ANNOTATED = "annotated"
PASSED_FILTERS = "passed_filters"


class ActiveError(UserError):
    """The run cannot teach a head: no finished round, no usable features, or votes of one kind only."""


# --- features --------------------------------------------------------------------------------------------
@dataclass
class Features:
    ids: list[str]
    matrix: np.ndarray  # rows x features, float64, no NaN
    kind: str  # "clip" | "imagenet" | "scores"
    names: list[str]

    def rows(self, ids: list[str]) -> np.ndarray:
        index = {i: n for n, i in enumerate(self.ids)}
        return self.matrix[[index[i] for i in ids]]


def score_matrix(table: pa.Table) -> tuple[np.ndarray, list[str]]:
    """The cheap scores present in ``table`` as a matrix; a null score becomes the column's mean plus a
    0/1 "missing" column (a null is information: e.g. an empty caption has no CLIP score)."""
    columns, names = [], []
    for name in SCORE_FEATURES:
        if name not in table.column_names:
            continue
        values = table[name].cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
        missing = np.isnan(values)
        if missing.all():
            continue
        if name in LOG_FEATURES:
            values = np.log1p(np.clip(values, 0, None))
        values[missing] = np.nanmean(values)
        columns.append(values)
        names.append(f"log1p({name})" if name in LOG_FEATURES else name)
        if missing.any():
            columns.append(missing.astype(np.float64))
            names.append(f"{name}_missing")
    if not columns:
        raise ActiveError(f"no score column to learn from (looked for {', '.join(SCORE_FEATURES)})")
    return np.column_stack(columns), names


def imagenet_available() -> bool:
    """Whether the ImageNet MobileNetV2 the evaluation uses is staged (never downloaded here)."""
    from model.evaluation.distribution import features_weights
    from pipeline.weights import WeightsError, resolve

    try:
        resolve(features_weights())
    except WeightsError:
        return False
    return True


def imagenet_matrix(thumbnails: list[bytes], ids: list[str]) -> np.ndarray:
    """1280-d pooled MobileNetV2 features of the thumbnails (model.evaluation's ImageNetFeatures)."""
    from model.evaluation.distribution import ImageNetFeatures
    from pipeline.scorers.common import decode_thumbnail

    return ImageNetFeatures(device="cpu")([decode_thumbnail(i, t) for i, t in zip(ids, thumbnails)]).astype(np.float64)


def run_features(run_dir: Path, kind: str = "auto") -> Features:
    """Features of every scored row of a pipeline run (RUN/score), annotated or not.

    ``auto``: the CLIP image embedding when the run stored it, else ImageNet features of the thumbnails
    when MobileNetV2 is staged (cached in RUN/annotation/active/imagenet-features.parquet), else the
    cheap scores."""
    if kind not in FEATURE_KINDS:
        raise ActiveError(f"feature kind {kind!r}: choose one of {', '.join(FEATURE_KINDS)}")
    layout = RunLayout(run_dir)
    if not layout.score_shards():
        raise ActiveError(f"{layout.score} holds no scored shard: run the pipeline first")
    scores = duckdb.sql(f"SELECT * FROM read_parquet('{layout.score}/shard-*.parquet', union_by_name=true) "
                        f"ORDER BY {ID}").arrow().read_all()
    ids = scores[ID].to_pylist()
    has_clip = CLIP_IMAGE_EMBEDDING in scores.column_names and scores[CLIP_IMAGE_EMBEDDING].null_count < len(scores)
    if kind == "clip" or (kind == "auto" and has_clip):
        if not has_clip:
            raise ActiveError(f"{layout.score} has no {CLIP_IMAGE_EMBEDDING}: the run did not use the clip scorer")
        from pipeline.scorers.common import arrow_to_embeddings

        matrix, valid = arrow_to_embeddings(scores[CLIP_IMAGE_EMBEDDING], what="active learning")
        return Features(ids, np.column_stack([matrix, ~valid]).astype(np.float64), "clip",
                        [f"clip_{i}" for i in range(matrix.shape[1])] + ["clip_missing"])
    if kind == "imagenet" or (kind == "auto" and imagenet_available()):
        return Features(ids, _cached_imagenet(layout, ids), "imagenet", [f"imagenet_{i}" for i in range(1280)])
    matrix, names = score_matrix(scores)
    return Features(ids, matrix, "scores", names)


def _cached_imagenet(layout: RunLayout, ids: list[str]) -> np.ndarray:
    cache = ActiveLayout(layout.annotation).imagenet_features
    known: dict[str, np.ndarray] = {}
    if cache.exists():
        table = pq.read_table(cache)
        known = dict(zip(table[ID].to_pylist(), np.asarray(table["features"].to_pylist(), np.float64)))
    todo = [i for i in ids if i not in known]
    if todo:
        wanted = ", ".join(f"'{i}'" for i in todo)
        rows = duckdb.sql(f"SELECT {ID}, {THUMBNAIL} FROM '{layout.ingest}/shard-*.parquet' WHERE {ID} IN ({wanted})"
                          ).arrow().read_all()
        new = imagenet_matrix(rows[THUMBNAIL].to_pylist(), rows[ID].to_pylist())
        known.update(zip(rows[ID].to_pylist(), new))
        cache.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({ID: list(known), "features": [v.tolist() for v in known.values()]}), cache)
    return np.stack([known[i] for i in ids])


# --- the head --------------------------------------------------------------------------------------------
def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # = 1 / (1 + e^-z), without overflow


def fit_logistic(x: np.ndarray, pos: np.ndarray, neg: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    """Weights and bias minimising the binomial negative log-likelihood of ``pos`` successes and ``neg``
    failures per row, plus (l2 / 2) |w|^2 (the bias is not penalised); L-BFGS."""
    n, d = x.shape

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:d], theta[d]
        z = x @ w + b
        # -[pos log s(z) + neg log(1 - s(z))] = pos softplus(-z) + neg softplus(z)
        value = (pos * np.logaddexp(0, -z) + neg * np.logaddexp(0, z)).sum() + 0.5 * l2 * w @ w
        residual = (pos + neg) * _sigmoid(z) - pos
        return value, np.concatenate([x.T @ residual + l2 * w, [residual.sum()]])

    share = (pos.sum() + 0.5) / (pos.sum() + neg.sum() + 1.0)
    start = np.concatenate([np.zeros(d), [np.log(share / (1 - share))]])
    theta = minimize(loss, start, jac=True, method="L-BFGS-B").x
    return theta[:d], float(theta[d])


@dataclass
class Head:
    """A calibrated logistic head: p = sigmoid(a * (w . phi(z) + b) + c), z = (x - mean) / scale, where
    phi(z) = [z, z^2] on the few cheap scores (a quadratic logistic: annotators reject both ends of a
    score, e.g. blurred and noise-cluttered images at either end of sharpness) and phi(z) = z on
    embeddings (hundreds of dimensions, where a linear head is the usual probe)."""

    kind: str
    names: list[str]
    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: float
    platt: tuple[float, float] = (1.0, 0.0)
    quadratic: bool = False

    @classmethod
    def fit(cls, x: np.ndarray, pos: np.ndarray, neg: np.ndarray, kind: str, names: list[str],
            l2: float = 1.0) -> "Head":
        mean, scale = x.mean(axis=0), x.std(axis=0)
        scale[scale < 1e-12] = 1.0
        head = cls(kind, names, mean, scale, np.zeros(0), 0.0, quadratic=kind == "scores")
        head.weights, head.bias = fit_logistic(head.phi(x), pos, neg, l2)
        return head

    def phi(self, x: np.ndarray) -> np.ndarray:
        z = (x - self.mean) / self.scale
        return np.column_stack([z, z**2]) if self.quadratic else z

    def logit(self, x: np.ndarray) -> np.ndarray:
        return self.phi(x) @ self.weights + self.bias

    def predict(self, x: np.ndarray) -> np.ndarray:
        a, c = self.platt
        return _sigmoid(a * self.logit(x) + c)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "names": self.names, "mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "weights": self.weights.tolist(), "bias": self.bias, "platt": list(self.platt),
                "quadratic": self.quadratic}

    @classmethod
    def from_dict(cls, d: dict) -> "Head":
        return cls(d["kind"], d["names"], np.asarray(d["mean"]), np.asarray(d["scale"]), np.asarray(d["weights"]),
                   d["bias"], tuple(d["platt"]), d["quadratic"])


def platt_fit(logits: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """Platt scaling: (a, c) of sigmoid(a * logit + c) fitted to the votes (a 1-d binomial GLM)."""
    w, c = fit_logistic(logits[:, None], pos, neg, l2=1e-6)
    return float(w[0]), c


def weighted_auc(scores: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> float:
    """AUC over votes: the probability that a positive vote's image scores above a negative vote's image
    (ties count one half): the Mann-Whitney U / (P N), each image weighted by its votes of each kind."""
    values, index = np.unique(scores, return_inverse=True)
    p = np.bincount(index, pos, len(values))
    n = np.bincount(index, neg, len(values))
    below = np.cumsum(n) - n
    total = p.sum() * n.sum()
    return float((p * (below + 0.5 * n)).sum() / total) if total else float("nan")


def reliability(prob: np.ndarray, pos: np.ndarray, neg: np.ndarray, bins: int = 10) -> tuple[list[dict], float]:
    """Per equal-width bin of predicted probability: mean prediction, observed vote share, votes; and the
    expected calibration error, sum over bins of votes_b / votes * |predicted_b - observed_b|."""
    votes = pos + neg
    which = np.minimum((prob * bins).astype(int), bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        inside = (which == b) & (votes > 0)
        v = votes[inside].sum()
        if not v:
            continue
        predicted = float((prob[inside] * votes[inside]).sum() / v)
        observed = float(pos[inside].sum() / v)
        table.append({"bin": f"{b / bins:.1f}-{(b + 1) / bins:.1f}", "predicted": predicted, "observed": observed,
                      "votes": int(v)})
        ece += v / votes.sum() * abs(predicted - observed)
    return table, float(ece)


@dataclass
class HeadReport:
    """A round's head and its held-out (out-of-fold) figures."""

    round: str
    images: int
    votes: int
    positive_share: float
    auc: float  # out-of-fold, over votes
    auc_ci: tuple[float, float]  # 95% bootstrap over images
    brier: float  # out-of-fold calibrated probabilities, per vote
    brier_constant: float  # the constant predictor (the vote share)
    ece: float
    reliability: list[dict] = field(default_factory=list)

    @property
    def beats_constant(self) -> bool:
        return self.auc_ci[0] > 0.5 and self.brier < self.brier_constant


def out_of_fold(x: np.ndarray, pos: np.ndarray, neg: np.ndarray, folds: int, seed: int, l2: float,
                kind: str = "", names: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold logits and Platt-calibrated probabilities (the calibration of each fold is fitted on
    the other folds' out-of-fold logits, so no figure sees its own image's votes)."""
    n = len(x)
    fold = np.random.default_rng(seed).permutation(n) % folds
    logits = np.zeros(n)
    for k in range(folds):
        test = fold == k
        head = Head.fit(x[~test], pos[~test], neg[~test], kind, names or [], l2)
        logits[test] = head.logit(x[test])
    prob = np.zeros(n)
    for k in range(folds):
        test = fold == k
        a, c = platt_fit(logits[~test], pos[~test], neg[~test])
        prob[test] = _sigmoid(a * logits[test] + c)
    return logits, prob


def bootstrap_auc(scores: np.ndarray, pos: np.ndarray, neg: np.ndarray, seed: int, draws: int = 1000
                  ) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    n = len(scores)
    values = [weighted_auc(scores[i], pos[i], neg[i]) for i in (rng.integers(0, n, n) for _ in range(draws))]
    low, high = np.nanpercentile(values, [2.5, 97.5])
    return float(low), float(high)


def train_head(x: np.ndarray, pos: np.ndarray, neg: np.ndarray, kind: str, names: list[str], round_name: str,
               folds: int = 5, seed: int = 0, l2: float = 1.0) -> tuple[Head, HeadReport]:
    """The head fitted on every image, its Platt map fitted on the out-of-fold logits, and the held-out
    report. Needs both kinds of vote and at least ``folds`` images."""
    if len(x) < folds or pos.sum() == 0 or neg.sum() == 0:
        raise ActiveError(f"round {round_name}: {len(x)} images with {int(pos.sum())} positive and {int(neg.sum())} "
                          f"negative votes: a head needs at least {folds} images and votes of both kinds")
    logits, prob = out_of_fold(x, pos, neg, folds, seed, l2, kind, names)
    head = Head.fit(x, pos, neg, kind, names, l2)
    head.platt = platt_fit(logits, pos, neg)
    votes = pos + neg
    share = pos.sum() / votes.sum()
    table, ece = reliability(prob, pos, neg)

    def brier(p: np.ndarray) -> float:  # mean over votes of (p - vote)^2
        return float(((pos * (1 - p) ** 2 + neg * p**2).sum()) / votes.sum())

    report = HeadReport(round_name, len(x), int(votes.sum()), float(share), weighted_auc(logits, pos, neg),
                        bootstrap_auc(logits, pos, neg, seed), brier(prob), brier(np.full(len(x), share)), ece, table)
    return head, report


# --- the rounds' votes ----------------------------------------------------------------------------------
def round_votes(work: Path, round_name: str) -> pa.Table:
    """Per image of a finished round: id, positive and negative votes (its decisions table, which counts
    only the valid annotations on pool images: gold, skipped and excluded ones never vote)."""
    decisions = RoundLayout(work, round_name).decisions
    if not decisions.exists():
        raise ActiveError(f"round {round_name} has no decisions at {decisions}: pull it first")
    return duckdb.sql(f"SELECT {ID}, {S.N_POSITIVE}::DOUBLE AS pos, ({S.N_VOTES} - {S.N_POSITIVE})::DOUBLE AS neg "
                      f"FROM '{decisions}' WHERE {S.N_VOTES} > 0 ORDER BY {ID}").arrow().read_all()


def finished_rounds(work: Path) -> list[str]:
    return [name for name in ROUNDS if RoundLayout(work, name).decisions.exists()]


# --- threshold proposals ------------------------------------------------------------------------------------
@dataclass
class Proposal:
    """A change to one automatic filter's threshold, with the evidence; shown, never applied."""

    filter: str
    column: str
    op: str
    current: float
    proposed: float
    direction: str  # "tighten" (from votes on rows that passed) | "review" (the head likes rows it drops)
    rows_affected: int
    evidence: str


def wilson_upper(successes: float, trials: float, z: float = 1.96) -> float:
    """Upper end of the Wilson score interval of a proportion (Wilson 1927)."""
    if trials <= 0:
        return 1.0
    p = successes / trials
    centre = p + z * z / (2 * trials)
    margin = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return float(min(1.0, (centre + margin) / (1 + z * z / trials)))


def propose_tighten(values: np.ndarray, pos: np.ndarray, neg: np.ndarray, name: str, column: str, op: str,
                    current: float, min_rows: int = 10, max_keeps_lost: float = 0.05) -> Proposal | None:
    """From votes on images that passed the filter: the strictest threshold (at the 5th..50th percentile
    of the annotated values) whose newly cut images were kept significantly less often than the rest
    (Wilson upper bound of their vote share below the others' share) and lose at most ``max_keeps_lost``
    of the positive votes. None when no such threshold exists."""
    known = ~np.isnan(values)
    values, pos, neg = values[known], pos[known], neg[known]
    sign = 1.0 if op == ">=" else -1.0  # work as ">=": a larger threshold cuts more
    v = sign * values
    best = None
    for q in (5, 10, 15, 20, 25, 30, 40, 50):
        t = float(np.percentile(v, q))
        cut = v < t
        if cut.sum() < min_rows or (~cut).sum() < min_rows:
            continue
        cut_share_high = wilson_upper(pos[cut].sum(), pos[cut].sum() + neg[cut].sum())
        rest_share = pos[~cut].sum() / max(pos[~cut].sum() + neg[~cut].sum(), 1)
        lost = pos[cut].sum() / max(pos.sum(), 1)
        if cut_share_high < rest_share and lost <= max_keeps_lost:
            best = Proposal(
                name, column, op, current, sign * t, "tighten", int(cut.sum()),
                f"{int(cut.sum())} annotated images between {current:g} and {sign * t:g}: kept by "
                f"{pos[cut].sum() / max(pos[cut].sum() + neg[cut].sum(), 1):.0%} of votes (95% upper "
                f"{cut_share_high:.0%}) against {rest_share:.0%} for the others; {lost:.0%} of the keep votes "
                f"lost, {cut.sum() / len(v):.0%} of the annotation work saved")
    return best


def propose_review(values: np.ndarray, prob: np.ndarray, pool_prob: np.ndarray, name: str, column: str, op: str,
                   current: float, min_rows: int = 10) -> Proposal | None:
    """From the head's keep-probability of the rows this filter alone drops (never annotated, so the
    head extrapolates): when their median is at least the annotated pool's median, the filter may be
    cutting images annotators would keep; proposes the threshold that lets in the better half of them.
    A sample of those rows should be annotated before changing anything."""
    known = ~np.isnan(values)
    values, prob = values[known], prob[known]
    if len(values) < min_rows or np.median(prob) < np.median(pool_prob):
        return None
    liked = values[prob >= np.median(prob)]
    proposed = float(liked.min() if op == ">=" else liked.max())
    return Proposal(name, column, op, current, proposed, "review", int(len(liked)),
                    f"{len(values)} rows dropped by {name} alone have a median keep-probability of "
                    f"{np.median(prob):.2f} (annotated pool: {np.median(pool_prob):.2f}); the head never saw rows "
                    f"like them: annotate a sample of the {len(liked)} it likes before moving the threshold")


# --- the run-level step ------------------------------------------------------------------------------------
@dataclass
class ActiveResult:
    features: str
    reports: list[HeadReport]
    ranking: Path
    proposals: list[Proposal]
    heads: Path
    skipped: dict[str, str] = field(default_factory=dict)  # round -> why it has no head

    def to_dict(self) -> dict:
        return {"features": self.features, "ranking": str(self.ranking), "heads": str(self.heads),
                "rounds": [asdict(r) | {"beats_constant": r.beats_constant} for r in self.reports],
                "skipped_rounds": self.skipped, "proposals": [asdict(p) for p in self.proposals]}


def learn(run_dir: Path, work: Path | None = None, kind: str = "auto", l2: float = 1.0, seed: int = 0) -> ActiveResult:
    """Train a head per finished round of the run, rank every scored row by its keep-probability and
    propose threshold changes; writes RUN/annotation/active/ (annotation.layout.ActiveLayout)."""
    run = RunLayout(run_dir)
    work = Path(work) if work else run.annotation
    rounds = finished_rounds(work)
    if not rounds:
        raise ActiveError(f"no finished round under {work} (no <round>/decisions.parquet): nothing to learn from")
    features = run_features(run.root, kind)
    layout = ActiveLayout(work)
    layout.root.mkdir(parents=True, exist_ok=True)
    heads, reports, skipped = {}, [], {}
    keep_probability = np.ones(len(features.ids))
    probabilities = {}
    for name in rounds:
        votes = round_votes(work, name)
        known = set(features.ids)
        votes = votes.filter(pa.array([i in known for i in votes[ID].to_pylist()], pa.bool_()))
        pos, neg = votes["pos"].to_numpy(), votes["neg"].to_numpy()
        try:
            head, report = train_head(features.rows(votes[ID].to_pylist()), pos, neg, features.kind, features.names,
                                      name, seed=seed, l2=l2)
        except ActiveError as error:  # e.g. a round where every vote was positive teaches nothing
            skipped[name] = str(error)
            log.warning("no head: %s", error)
            continue
        heads[name] = head.to_dict() | {"report": asdict(report)}
        reports.append(report)
        if report.beats_constant:
            probabilities[name] = head.predict(features.matrix)
            keep_probability *= probabilities[name]
        else:
            log.warning("round %s: the head does not beat a constant (AUC %.2f, 95%% CI %.2f-%.2f): not used to rank",
                        name, report.auc, *report.auc_ci)
    layout.heads.write_text(json.dumps(heads, indent=1))
    ranking = _ranking(run, work, features.ids, keep_probability, probabilities)
    pq.write_table(ranking, layout.ranking)
    proposals = _proposals(run, work, rounds, ranking) if probabilities else []
    layout.proposals.write_text(json.dumps([asdict(p) for p in proposals], indent=1))
    result = ActiveResult(features.kind, reports, layout.ranking, proposals, layout.heads, skipped)
    layout.summary.write_text(json.dumps(result.to_dict(), indent=1))
    return result


def _ranking(run: RunLayout, work: Path, ids: list[str], keep_probability: np.ndarray,
             probabilities: dict[str, np.ndarray]) -> pa.Table:
    annotated = set()
    for name in finished_rounds(work):
        annotated |= set(pq.read_table(RoundLayout(work, name).decisions, columns=[ID])[ID].to_pylist())
    table = pa.table({ID: ids, KEEP_PROBABILITY: keep_probability,
                      **{f"p_{name}": p for name, p in probabilities.items()},
                      ANNOTATED: [i in annotated for i in ids]})
    if run.selection.exists():
        selection = pq.read_table(run.selection, columns=[ID, KEEP, DROP_REASON])
        table = table.join(selection.rename_columns([ID, PASSED_FILTERS, DROP_REASON]), ID)
    order = np.argsort(-table[KEEP_PROBABILITY].to_numpy(), kind="stable")
    table = table.take(order)
    return table.append_column(RANK, pa.array(np.arange(1, len(order) + 1), pa.int64()))


def _proposals(run: RunLayout, work: Path, rounds: list[str], ranking: pa.Table) -> list[Proposal]:
    """Proposals for each applied threshold filter: tighten from the first round's votes, review from
    the head's view of the rows it alone drops."""
    if not run.selection.exists():
        return []
    summary = selection_summary(pq.read_schema(run.selection))
    votes = round_votes(work, rounds[0])
    scores = duckdb.sql(f"SELECT * FROM read_parquet('{run.score}/shard-*.parquet', union_by_name=true)").arrow().read_all()
    selection = pq.read_table(run.selection, columns=[ID, DROP_REASONS])
    prob = dict(zip(ranking[ID].to_pylist(), ranking[KEEP_PROBABILITY].to_numpy()))
    voted = votes[ID].to_pylist()
    pool_prob = np.array([prob[i] for i in voted])
    out = []
    for name in summary["applied_filters"]:
        f = FILTERS_BY_NAME.get(name)
        if f is None or f.column not in scores.column_names:
            continue
        column = dict(zip(scores[ID].to_pylist(), scores[f.column].cast(pa.float64()).to_numpy(zero_copy_only=False)))
        current = float(summary["thresholds"][name])
        tighten = propose_tighten(np.array([column.get(i, np.nan) for i in voted]), votes["pos"].to_numpy(),
                                  votes["neg"].to_numpy(), name, f.column, f.op, current)
        alone = [i for i, reasons in zip(selection[ID].to_pylist(), selection[DROP_REASONS].to_pylist())
                 if reasons == [name]]
        review = propose_review(np.array([column.get(i, np.nan) for i in alone]), np.array([prob[i] for i in alone]),
                                pool_prob, name, f.column, f.op, current)
        out += [p for p in (tighten, review) if p is not None]
    return out


def task_priority(ranking: Path) -> dict[str, float]:
    """{pool id: keep-probability} from a ranking.parquet, for ``push_round(priority=...)``."""
    table = pq.read_table(ranking, columns=[ID, KEEP_PROBABILITY])
    return dict(zip(table[ID].to_pylist(), table[KEEP_PROBABILITY].to_pylist()))


# --- measurement: simulated annotators on a pool of known quality ------------------------------------------
def simulated_votes(quality: np.ndarray, threshold: float, noise: float, rng: np.random.Generator) -> np.ndarray:
    """One simulated annotator's keep/reject per image: keep when quality + N(0, noise^2) > threshold."""
    return quality + rng.normal(0.0, noise, len(quality)) > threshold


def annotations_to_target(x: np.ndarray, decisions: np.ndarray, target: int, batch: int, order: str, seed: int,
                          kind: str, l2: float = 1.0) -> np.ndarray:
    """Keeps found after each annotation (cumulative), annotating the pool in batches until ``target``
    keeps (or the pool ends). ``random``: a seeded permutation. ``learned``: random until both kinds of
    decision are seen, then after each batch a head is refitted on every decision so far and the next
    batch is the ``batch`` unannotated images it ranks highest."""
    rng = np.random.default_rng(seed)
    n = len(decisions)
    remaining = list(rng.permutation(n))
    done: list[int] = []
    while remaining and decisions[done].sum() < target:
        seen = decisions[done]
        if order == "learned" and seen.any() and not seen.all():
            head = Head.fit(x[done], seen.astype(float), (~seen).astype(float), kind, [], l2)
            rest = np.array(remaining)
            chosen = rest[np.argsort(-head.logit(x[rest]), kind="stable")[:batch]]
        else:
            chosen = np.array(remaining[:batch])
        taken = set(chosen.tolist())
        remaining = [i for i in remaining if i not in taken]
        done += chosen.tolist()
    return np.cumsum(decisions[done])


def bootstrap_mean_ci(values: np.ndarray, seed: int = 0, draws: int = 2000) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (draws, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


@dataclass
class OrderComparison:
    target: int
    batch: int
    pool: int
    keep_rate: float
    needed: dict[str, list[int]]  # order -> annotations needed per seed
    mean: dict[str, float]
    ci: dict[str, tuple[float, float]]
    saving: float  # 1 - learned / random (means)
    saving_ci: tuple[float, float]  # paired bootstrap over seeds
    curves: dict[str, np.ndarray] = field(repr=False, default_factory=dict)  # mean keeps after k annotations


def compare_orders(x: np.ndarray, quality: np.ndarray, target: int, batch: int, seeds: int, threshold: float,
                   noise: float, kind: str, l2: float = 1.0) -> OrderComparison:
    """Annotations needed to reach ``target`` keeps, random vs learned order, over ``seeds`` simulated
    campaigns (each seed draws its own annotator noise and its own order); ``kind`` is the features'
    (Features.kind: the head is quadratic on "scores")."""
    needed: dict[str, list[int]] = {"random": [], "learned": []}
    curves: dict[str, list[np.ndarray]] = {"random": [], "learned": []}
    rates = []
    for seed in range(seeds):
        decisions = simulated_votes(quality, threshold, noise, np.random.default_rng(10_000 + seed))
        rates.append(decisions.mean())
        if decisions.sum() < target:
            raise ActiveError(f"seed {seed}: the simulated annotators keep {int(decisions.sum())} images, fewer than "
                              f"the target of {target}: lower the threshold or the target")
        for order in needed:
            found = annotations_to_target(x, decisions, target, batch, order, seed, kind, l2)
            needed[order].append(int(np.searchsorted(found, target) + 1))
            curves[order].append(found)
    length = max(len(c) for cs in curves.values() for c in cs)
    mean_curves = {o: np.mean([np.pad(c, (0, length - len(c)), mode="edge") for c in cs], axis=0)
                   for o, cs in curves.items()}
    arrays = {o: np.array(v, float) for o, v in needed.items()}
    rng = np.random.default_rng(0)
    pick = rng.integers(0, seeds, (2000, seeds))
    savings = 1 - arrays["learned"][pick].mean(axis=1) / arrays["random"][pick].mean(axis=1)
    low, high = np.percentile(savings, [2.5, 97.5])
    return OrderComparison(target, batch, len(quality), float(np.mean(rates)), needed,
                           {o: float(a.mean()) for o, a in arrays.items()},
                           {o: bootstrap_mean_ci(a) for o, a in arrays.items()},
                           float(1 - arrays["learned"].mean() / arrays["random"].mean()), (float(low), float(high)),
                           mean_curves)
