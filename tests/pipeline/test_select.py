"""Selection and its balancing as pure functions over score tables built in code; run_select over a
small run directory."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline import schema
from pipeline.config import THRESHOLD_FILTERS, ConfigError, parse_config
from pipeline.layout import shard_name
from pipeline.select import (
    SelectError,
    balance_allocation,
    near_duplicate_groups,
    near_duplicate_pairs,
    run_select,
    select,
    selection_summary,
    water_fill,
)

OFF = {f.name: None for f in THRESHOLD_FILTERS}


def config(filters=None, balance=None):
    """Every default threshold off unless given: each test states the filters it exercises."""
    return parse_config({
        "scorers": {},
        "filters": {**OFF, "near_duplicates": False, **(filters or {})},
        "balance": {"target_size": None, **(balance or {})},
    })


def table(**columns):
    n = len(next(iter(columns.values())))
    return pa.table({schema.ID: [f"id{i:04d}" for i in range(n)], **columns})


def verdicts(selection):
    return {r["id"]: r for r in selection.to_pylist()}


def flip(value: int, bits) -> int:
    """``value`` (signed int64) with the given bit positions flipped."""
    u = np.int64(value).view(np.uint64)
    for b in bits:
        u ^= np.uint64(1) << np.uint64(b)
    return int(u.view(np.int64))


# --- thresholds ------------------------------------------------------------------------------------


def test_each_filter_names_itself_as_the_reason_and_keeps_the_rest():
    t = table(
        min_side=pa.array([600, 100, 600, 600, 600, 600], pa.int32()),
        aspect_ratio=[1.5, 1.5, 4.0, 1.5, 1.5, 1.5],
        nsfw_score=[0.0, 0.0, 0.0, 0.9, 0.0, 0.0],
        clip_score=[0.3, 0.3, 0.3, 0.3, 0.1, 0.3],
        aesthetic_score=[6.0, 6.0, 6.0, 6.0, 6.0, 4.0],
    )
    s = select(t, config({"min_side": 256, "max_aspect_ratio": 3, "max_nsfw": 0.5, "min_clip_score": 0.28, "min_aesthetic": 5}))
    assert s.schema.equals(schema.SELECTION_SCHEMA, check_metadata=False)
    assert s[schema.ID].to_pylist() == t[schema.ID].to_pylist()  # one verdict per row, same order
    assert s[schema.DROP_REASON].to_pylist() == [None, "min_side", "max_aspect_ratio", "max_nsfw", "min_clip_score", "min_aesthetic"]
    assert s[schema.KEEP].to_pylist() == [True, False, False, False, False, False]
    assert s[schema.DROP_REASONS].to_pylist()[0] == []


def test_all_failing_filters_are_listed_in_declaration_order():
    t = table(min_side=pa.array([10], pa.int32()), aspect_ratio=[9.0], aesthetic_score=[1.0])
    s = select(t, config({"min_aesthetic": 5, "min_side": 256, "max_aspect_ratio": 3}))
    assert s[schema.DROP_REASONS].to_pylist() == [["min_side", "max_aspect_ratio", "min_aesthetic"]]
    assert s[schema.DROP_REASON].to_pylist() == ["min_side"]


def test_thresholds_are_inclusive():
    t = table(min_side=pa.array([256, 255], pa.int32()), aspect_ratio=[3.0, 3.0001])
    s = select(t, config({"min_side": 256, "max_aspect_ratio": 3}))
    assert s[schema.DROP_REASONS].to_pylist() == [[], ["min_side", "max_aspect_ratio"]]


def test_null_scores_follow_each_filters_policy():
    t = table(
        clip_score=pa.array([None, 0.3, float("nan")], pa.float32()),  # empty caption; scored; NaN from a broken model
        engagement=pa.array([None, 3.0, 50.0]),
    )
    s = select(t, config({"min_clip_score": 0.28, "min_engagement": 10}))
    # null CLIP score fails with its own reason; a missing engagement signal passes
    assert s[schema.DROP_REASONS].to_pylist() == [["clip_score_null"], ["min_engagement"], ["clip_score_null"]]


def test_absent_columns_are_skipped_and_recorded_off_filters_are_not():
    s = select(table(aspect_ratio=[9.0]), config({"max_aspect_ratio": 3, "min_aesthetic": 5, "max_nsfw": 0.5}))
    summary = selection_summary(s)
    assert summary["applied_filters"] == ["max_aspect_ratio"]
    assert summary["skipped_filters"] == ["max_nsfw", "min_aesthetic"]
    assert "min_side" not in summary["skipped_filters"]  # off, not skipped
    assert s[schema.DROP_REASON].to_pylist() == ["max_aspect_ratio"]


def test_an_empty_table_gives_an_empty_selection():
    empty = pa.table({schema.ID: pa.array([], pa.string()), schema.PHASH: pa.array([], pa.int64()),
                      schema.AESTHETIC_SCORE: pa.array([], pa.float32())})
    s = select(empty, config({"min_aesthetic": 5, "near_duplicates": True}, {"target_size": 10}))
    assert s.num_rows == 0 and s.schema.equals(schema.SELECTION_SCHEMA, check_metadata=False)


def test_selection_needs_ids():
    with pytest.raises(ConfigError, match="'id' column"):
        select(pa.table({"aspect_ratio": [1.0]}), config())


# --- near-duplicates -----------------------------------------------------------------------------


def brute_force_pairs(hashes: np.ndarray, t: int) -> set[tuple[int, int]]:
    u = hashes.view(np.uint64)
    distance = np.bitwise_count(u[:, None] ^ u[None, :])
    i, j = np.nonzero(np.triu(distance <= t, k=1))
    return set(zip(i.tolist(), j.tolist()))


@pytest.mark.parametrize("t", [1, 3, 6, 10])
def test_banded_search_finds_exactly_the_brute_force_pairs(t):
    rng = np.random.default_rng(t)
    base = rng.integers(-(2**63), 2**63 - 1, size=300, dtype=np.int64)
    # plant neighbours at every distance from 1 to t + 2 so the boundary is exercised
    planted = [flip(base[k], rng.choice(64, size=1 + k % (t + 2), replace=False)) for k in range(300)]
    hashes = np.unique(np.concatenate([base, planted]))
    i, j = near_duplicate_pairs(hashes, t)
    assert set(zip(i.tolist(), j.tolist())) == brute_force_pairs(hashes, t)
    assert len(i) >= 300 * t // (t + 2)  # every planted pair within t bits was found


def test_groups_are_transitive_and_identical_hashes_group():
    a = 0x0F0F0F0F0F0F0F0F
    hashes = np.array([a, flip(a, [0, 1, 2]), flip(a, [0, 1, 2, 3, 4, 5]), a, flip(a, range(30))], np.int64)
    labels = near_duplicate_groups(hashes, 3)
    # a ~ b (3 bits), b ~ c (3 bits) though a-c is 6; d == a; e is far from all
    assert labels[0] == labels[1] == labels[2] == labels[3] != labels[4]


def test_groups_of_dense_clusters_equal_the_brute_force_components():
    """Crops of a few photos: every hash is close to dozens of others, so the close pairs outnumber the
    hashes many times over and the grouping merges components several times as it goes (its memory
    bound); the groups still equal the connected components of the brute-force pairs."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rng = np.random.default_rng(7)
    centres = rng.integers(-(2**63), 2**63 - 1, size=6, dtype=np.int64)
    hashes = np.array([flip(centres[k % 6], rng.choice(64, size=rng.integers(0, 4), replace=False)) for k in range(600)]
                      + list(rng.integers(-(2**63), 2**63 - 1, size=100, dtype=np.int64)), np.int64)
    unique, inverse = np.unique(hashes, return_inverse=True)
    pairs = brute_force_pairs(unique, 4)
    assert len(pairs) > 5 * len(unique)  # dense enough to force several merges
    i, j = np.array(sorted(pairs)).T
    _, expected = connected_components(coo_matrix((np.ones(len(i)), (i, j)), shape=(len(unique),) * 2), directed=False)
    labels = near_duplicate_groups(hashes, 4)
    assert labels.max() + 1 == expected.max() + 1  # labels are 0..k-1, as many groups
    mapping = {}
    for got, want in zip(labels.tolist(), expected[inverse].tolist()):
        assert mapping.setdefault(got, want) == want  # the same partition, label for label
    assert len(set(mapping.values())) == len(mapping)


def test_one_representative_per_group_best_by_rank_then_size_then_id():
    a, b = 0x123456789ABCDEF0, 0x7EDCBA9876543210
    t = table(
        phash=pa.array([a, flip(a, [5]), flip(a, [9, 10]), b, flip(b, [1]), flip(b, [2]), 77], pa.int64()),
        aesthetic_score=[5.0, 7.0, 6.0, 6.0, 6.0, 6.0, 1.0],
        width=pa.array([100, 100, 100, 100, 300, 300, 100], pa.int32()),
        height=pa.array([100] * 7, pa.int32()),
    )
    s = verdicts(select(t, config({"near_duplicates": True, "near_duplicate_max_distance": 4})))
    # group 1: best aesthetic (id0001) wins; group 2: equal aesthetic -> larger image -> smaller id (id0004)
    assert [k for k, v in s.items() if v["keep"]] == ["id0001", "id0004", "id0006"]
    assert {k: v["near_dup_group"] for k, v in s.items()} == {
        "id0000": "id0001", "id0001": "id0001", "id0002": "id0001",
        "id0003": "id0004", "id0004": "id0004", "id0005": "id0004", "id0006": None,
    }
    assert s["id0000"]["drop_reason"] == "near_duplicates"
    assert selection_summary(select(t, config({"near_duplicates": True})))["near_duplicate_groups"] == 2


def test_representative_is_chosen_among_rows_that_pass_the_thresholds():
    a = 0x123456789ABCDEF0
    t = table(phash=pa.array([a, flip(a, [1])], pa.int64()), aesthetic_score=[9.0, 6.0], nsfw_score=[0.9, 0.1])
    s = verdicts(select(t, config({"near_duplicates": True, "max_nsfw": 0.5})))
    assert s["id0000"]["drop_reasons"] == ["max_nsfw"]  # the best-looking one is offensive ...
    assert s["id0001"]["keep"]  # ... so its clean near-duplicate survives


def test_null_phash_stays_ungrouped_and_missing_phash_skips_the_filter():
    t = table(phash=pa.array([None, None], pa.int64()), aesthetic_score=[1.0, 2.0])
    s = select(t, config({"near_duplicates": True}))
    assert s[schema.KEEP].to_pylist() == [True, True]
    s = select(table(aesthetic_score=[1.0]), config({"near_duplicates": True}))
    assert selection_summary(s)["skipped_filters"] == ["near_duplicates"]


def test_semantic_duplicates_keep_the_best_ranked_of_a_scene_and_are_skipped_without_embeddings():
    rng = np.random.default_rng(0)
    scene, other = rng.normal(size=16), rng.normal(size=16)
    vectors = [scene, scene + rng.normal(size=16) * 0.05, other, scene + rng.normal(size=16) * 0.05, None]
    embeddings = pa.array([None if v is None else (v / np.linalg.norm(v)).astype(np.float16).tolist() for v in vectors],
                          pa.list_(pa.float16()))
    t = table(clip_image_embedding=embeddings, aesthetic_score=[5.0, 7.0, 6.0, 4.0, 3.0],
              nsfw_score=[0.1, 0.1, 0.1, 0.1, 0.1])
    s = verdicts(select(t, config({"semantic_duplicates": 0.95, "semantic_duplicate_clusters": 1})))
    # the scene's best-looking shot (id0001) stays; its two other shots go, pointing at it; the null
    # embedding is not compared
    assert [k for k, v in s.items() if v["keep"]] == ["id0001", "id0002", "id0004"]
    assert {k: s[k]["near_dup_group"] for k in ("id0000", "id0003")} == {"id0000": "id0001", "id0003": "id0001"}
    assert s["id0000"]["drop_reason"] == "semantic_duplicates"
    summary = selection_summary(select(t, config({"semantic_duplicates": 0.95})))
    assert summary["semantic_duplicates"] == 2 and "semantic_duplicates" in summary["applied_filters"]
    # a row another filter drops cannot be the representative: the next best shot stands for the scene
    offensive_best = t.set_column(t.column_names.index("nsfw_score"), "nsfw_score", pa.array([0.1, 0.9, 0.1, 0.1, 0.1]))
    s = verdicts(select(offensive_best, config({"semantic_duplicates": 0.95, "max_nsfw": 0.5})))
    assert s["id0001"]["drop_reason"] == "max_nsfw" and s["id0000"]["keep"] and not s["id0003"]["keep"]
    skipped = select(table(aesthetic_score=[1.0, 2.0]), config({"semantic_duplicates": 0.95}))
    assert selection_summary(skipped)["skipped_filters"] == ["semantic_duplicates"]


# --- balancing -----------------------------------------------------------------------------------


def test_water_fill_gives_a_short_concepts_surplus_to_the_others_by_weight():
    assert water_fill({"a": 10, "b": 100, "c": 100}, {"a": 1, "b": 1, "c": 2}, 100) == {"a": 10, "b": 30, "c": 60}
    assert water_fill({"a": 5, "b": 5}, {"a": 1, "b": 1}, 100) == {"a": 5, "b": 5}  # not enough rows at all
    allocation = water_fill({"a": 50, "b": 50, "c": 50}, {"a": 1, "b": 1, "c": 1}, 100)
    assert sum(allocation.values()) == 100 and sorted(allocation.values()) == [33, 33, 34]


def test_quotas_fractions_counts_and_unlisted_concepts():
    c = config(balance={"target_size": 100, "quotas": {"food": 0.5, "cars": 10}})
    # people and animal have no quota: they share the 40 left equally
    assert balance_allocation({"food": 200, "cars": 200, "people": 200, "animal": 200}, c) == {
        "food": 50, "cars": 10, "people": 20, "animal": 20}
    # food is short by 45: its surplus goes to the others in proportion to their weights (10:20:20)
    assert balance_allocation({"food": 5, "cars": 200, "people": 200, "animal": 200}, c) == {
        "food": 5, "cars": 19, "people": 38, "animal": 38}


def test_a_quota_for_a_concept_no_row_carries_is_reported():
    t = table(concept=["food", "people"], aesthetic_score=[1.0, 2.0])
    s = select(t, config(balance={"target_size": 2, "quotas": {"fod": 0.5}}))
    assert selection_summary(s)["quota_concepts_absent"] == ["fod"]
    assert s[schema.KEEP].to_pylist() == [True, True]  # its share went to the others


def test_quotas_that_use_the_whole_target_leave_unlisted_concepts_the_remainder_only():
    c = config(balance={"target_size": 100, "quotas": {"food": 0.6, "cars": 0.4, "none": 0}})
    assert balance_allocation({"food": 100, "cars": 100, "other": 100, "none": 100}, c) == {
        "food": 60, "cars": 40, "other": 0, "none": 0}
    assert balance_allocation({"food": 10, "cars": 20, "other": 100, "none": 100}, c) == {
        "food": 10, "cars": 20, "other": 70, "none": 0}


def test_balanced_cut_ranks_inside_each_concept():
    rng = np.random.default_rng(0)
    n = 400
    concept = np.array(["food"] * 300 + ["people"] * 60 + ["cars"] * 40)
    aesthetic = rng.uniform(1, 10, n)
    t = table(concept=concept, aesthetic_score=aesthetic)
    s = select(t, config(balance={"target_size": 120}))
    kept = s[schema.KEEP].to_numpy(zero_copy_only=False)
    # equal shares: 40 each; every concept keeps exactly its top 40 by aesthetic score
    for name in ("food", "people", "cars"):
        members = np.flatnonzero(concept == name)
        top = set(members[np.argsort(-aesthetic[members])][:40].tolist())
        assert set(np.flatnonzero(kept & (concept == name)).tolist()) == top
    assert set(pc.unique(pc.filter(s[schema.DROP_REASON], pc.invert(s[schema.KEEP]))).to_pylist()) == {"balance_quota"}
    assert selection_summary(s)["quota_concepts_absent"] == []
    concepts = selection_summary(s)["concepts"]
    assert concepts["food"] == {"passed_filters": 300, "allocated": 40, "kept": 40}


def test_without_a_concept_column_all_rows_are_one_domain_ranked_by_the_fallback():
    t = table(sharpness=[1.0, 5.0, 3.0, None], megapixels=[9.0, 0.1, 0.1, 9.0])
    s = select(t, config(balance={"target_size": 2}))
    assert s[schema.KEEP].to_pylist() == [False, True, True, False]  # aesthetic absent -> sharpness; null last
    assert s[schema.CONCEPT].null_count == 4
    assert selection_summary(s)["rank_by"] == "sharpness"


def test_null_concept_balances_as_other_and_only_survivors_are_balanced():
    t = table(concept=pa.array(["food", None, "food"]), aesthetic_score=[6.0, 6.0, 1.0])
    s = select(t, config({"min_aesthetic": 5}, balance={"target_size": 2}))
    assert s[schema.CONCEPT].to_pylist() == ["food", "other", "food"]
    assert s[schema.DROP_REASON].to_pylist() == [None, None, "min_aesthetic"]


def test_no_ranking_column_is_a_config_error_naming_rank_by():
    with pytest.raises(ConfigError, match="balance.rank_by"):
        select(table(aspect_ratio=[1.0, 1.0]), config(balance={"target_size": 1, "rank_fallback": []}))


def test_100k_rows_select_quickly_enough_for_ci():
    """A smaller twin of benchmarks/bench_select.py, so a slowdown shows in CI."""
    rng = np.random.default_rng(0)
    n = 100_000
    t = table(
        aesthetic_score=rng.normal(5.5, 1, n), clip_score=rng.normal(0.3, 0.03, n),
        phash=rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64),
        concept=rng.choice([f"c{k}" for k in range(20)], n),
    )
    import time

    start = time.perf_counter()
    s = select(t, config({"min_aesthetic": 5, "min_clip_score": 0.28, "near_duplicates": True}, {"target_size": 20_000}))
    assert time.perf_counter() - start < 5.0
    assert pc.sum(s[schema.KEEP]).as_py() == 20_000


# --- the stage -----------------------------------------------------------------------------------


def write_run(tmp_path, n=30, shard_rows=12, seed=0):
    from tests.builders import write_ingest_run

    layout = write_ingest_run(tmp_path / "run", n, shard_rows, seed)
    layout.score.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for shard in layout.ingest_shards():
        ids = pq.read_table(shard, columns=[schema.ID])[schema.ID]
        m = len(ids)
        pq.write_table(
            pa.table({
                schema.ID: ids,
                schema.ASPECT_RATIO: pa.array(rng.uniform(1, 4, m), pa.float32()),
                schema.AESTHETIC_SCORE: pa.array(rng.uniform(3, 8, m), pa.float32()),
                schema.CLIP_IMAGE_EMBEDDING: pa.array(rng.normal(size=(m, 4)).astype(np.float16).tolist(), pa.list_(pa.float16())),
            }),
            layout.score / shard.name,
        )
    return layout


def test_run_select_writes_the_selection_and_the_pool(tmp_path):
    layout = write_run(tmp_path)
    stats = run_select(layout.root, config({"max_aspect_ratio": 3, "min_aesthetic": 5}))
    selection = pq.read_table(layout.selection)
    assert selection.num_rows == stats.rows == 30
    assert stats.kept + stats.dropped == 30 and stats.kept > 0
    assert sum(stats.dropped_by_reason.values()) == stats.dropped
    assert selection_summary(pq.read_schema(layout.selection))["applied_filters"] == ["max_aspect_ratio", "min_aesthetic"]
    pool = pq.read_table(layout.pool_shards())
    kept = set(pc.filter(selection[schema.ID], selection[schema.KEEP]).to_pylist())
    assert set(pool[schema.ID].to_pylist()) == kept
    # the pool carries the images (bytes and thumbnail) and every score, types intact
    assert pool.schema.field(schema.THUMBNAIL).type == pa.binary()
    assert pool.schema.field(schema.CLIP_IMAGE_EMBEDDING).type == pa.list_(pa.float16())
    assert pc.all(pc.greater_equal(pool[schema.AESTHETIC_SCORE], 5)).as_py()
    assert {p.name for p in layout.pool_shards()} <= {shard_name(i) for i in range(3)}


def test_selection_reads_the_embeddings_only_for_the_semantic_dedup(tmp_path):
    from pipeline.select import read_scored

    layout = write_run(tmp_path)
    table, _ = read_scored(layout, config({"min_aesthetic": 5}))
    assert schema.CLIP_IMAGE_EMBEDDING not in table.column_names and schema.AESTHETIC_SCORE in table.column_names
    table, _ = read_scored(layout, config({"semantic_duplicates": 0.9}))
    assert schema.CLIP_IMAGE_EMBEDDING in table.column_names
    stats = run_select(layout.root, config({"semantic_duplicates": 0.999}))
    assert stats.kept + stats.dropped == 30  # random 4-d vectors: a few may collide, none is lost
    # the pool still carries the embeddings, read from the score shards
    assert schema.CLIP_IMAGE_EMBEDDING in pq.read_schema(layout.pool_shards()[0]).names


def test_rerun_with_new_thresholds_replaces_the_pool(tmp_path):
    layout = write_run(tmp_path)
    run_select(layout.root, config({"min_aesthetic": 3}))
    stats = run_select(layout.root, config({"min_aesthetic": 100}))
    assert stats.kept == 0 and layout.pool_shards() == []


def test_unscored_rows_stop_selection_with_a_clear_error(tmp_path):
    layout = write_run(tmp_path)
    layout.score_shards()[0].unlink()
    with pytest.raises(SelectError, match="have no scores"):
        run_select(layout.root, config())
    with pytest.raises(SelectError, match="no ingest shards"):
        run_select(tmp_path / "empty", config())


def test_ids_scored_twice_stop_selection(tmp_path):
    layout = write_run(tmp_path)
    shard = layout.score_shards()[0]
    (layout.score / shard_name(9)).write_bytes(shard.read_bytes())  # a stale copy scores the same ids again
    with pytest.raises(SelectError, match="more than once"):
        run_select(layout.root, config())
