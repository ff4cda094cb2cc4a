"""Lineage (annotation/lineage.py): a checkpoint trained by `python -m model train-qt` (tiny preset, a
TINY RANDOMLY-INITIALISED model, a few steps) on a curated set made by the real stages answers
`python -m annotation lineage CHECKPOINT`: every curated image traced back to its source row."""

from __future__ import annotations

import json

import duckdb
import pyarrow.parquet as pq

from annotation import schema as S
from annotation.__main__ import main as annotation_main
from annotation.layout import RoundLayout
from annotation.lineage import LINEAGE_FILE, curated_set_id
from model.__main__ import main as model_main
from model.export import config_hash

from .chain import curated_chain

FAST = ["autoencoder.train_steps=5", "pretrain.0.max_steps=2", "pretrain.1.max_steps=2", "quality_tune.max_steps=2",
        "quality_tune.eval_every=2", "quality_tune.sample_every=2", "sample.num_inference_steps=2",
        "sample.prompts=['a fox']"]


def test_lineage_traces_every_curated_image_of_a_checkpoint_to_its_source_row(tmp_path, capsys):
    run, curated = curated_chain(tmp_path, n=40)
    out = tmp_path / "train-qt"
    argv = ["train-qt", "--preset", "tiny", "--data", str(curated), "--out", str(out)]
    assert model_main(argv + [arg for s in FAST for arg in ("--set", s)]) == 0
    best = out / "quality_tune" / "best"
    record = json.loads((best / LINEAGE_FILE).read_text())
    assert record["curated_set_id"] == curated_set_id(curated) and record["config_hash"] == config_hash(out / "config.yaml")
    assert (out / "quality_tune" / "final" / LINEAGE_FILE).is_file()
    capsys.readouterr()

    table_path = tmp_path / "lineage.parquet"
    assert annotation_main(["lineage", str(best), "--out", str(table_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    curated_ids = set(pq.read_table(curated / "curated.parquet", columns=["id"])["id"].to_pylist())
    assert summary["images"] == len(curated_ids) > 0
    assert summary["traced_to_source_row"] == summary["source_file_present"] == summary["with_scores"] == len(curated_ids)
    assert summary["curated_set_unchanged"] is True and summary["config_hash"] == record["config_hash"]
    # every vote on a curated image, in both rounds, is in the table with its annotator
    for name in ("generalist", "specialist"):
        votes = duckdb.sql(f"SELECT count(*) FROM '{RoundLayout(run.annotation, name).annotations}' "
                           f"WHERE NOT {S.IS_GOLD} AND id IN (SELECT id FROM '{curated}/curated.parquet')").fetchall()[0][0]
        assert summary["rounds"][name]["votes"] == votes == 2 * len(curated_ids)
        assert summary["rounds"][name]["annotators"] == ["annotator-0@needles.test", "annotator-1@needles.test"]
    # the table joins checkpoint -> image -> source file, scores, filter verdict -> round decisions and votes
    rows = duckdb.sql(f"SELECT DISTINCT id, source, source_key, sharpness, passed_filters, round, round_keep, "
                      f"checkpoint, curated_set_id FROM '{table_path}'").fetchall()
    assert {r[0] for r in rows} == curated_ids
    assert all(r[1] == str((tmp_path / "source").resolve()) and (tmp_path / "source" / r[2]).is_file() for r in rows)
    assert all(r[3] is not None and r[4] is True and r[6] is True and r[8] == record["curated_set_id"] for r in rows)
    assert {r[5] for r in rows} == {"generalist", "specialist"}

    # the query itself, for DuckDB alone
    assert annotation_main(["lineage", str(best), "--sql"]) == 0
    sql = capsys.readouterr().out
    assert duckdb.sql(sql).arrow().read_all().num_rows == pq.read_table(table_path).num_rows


def test_a_checkpoint_without_a_record_is_a_clear_error(tmp_path, capsys):
    assert annotation_main(["lineage", str(tmp_path)]) == 2
    assert LINEAGE_FILE in capsys.readouterr().err
