"""The pipeline end to end on the generated sample: each defect is caught by the filter meant for it and
clean rows survive; the CLI's errors are one line; a run killed mid-score resumes to the same funnel."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from pipeline.config import load_config
from pipeline.engine import score_run
from pipeline.ingest import ingest
from pipeline.layout import RunLayout
from pipeline.report import build_report, funnel
from pipeline.sample import generate_sample
from pipeline.scorers import build_chain
from pipeline.select import run_select

# defect -> the filter that must catch it (it may be caught by others too: drop_reasons lists all)
CAUGHT_BY = {
    "tiny": "min_side",
    "extreme_aspect": "max_aspect_ratio",
    "blur": "min_sharpness",
    "low_contrast": "min_contrast",
}


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    return generate_sample(tmp_path_factory.mktemp("e2e") / "sample", n=160, seed=3)


@pytest.fixture(scope="module")
def run(sample, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("e2e-run")
    cfg = load_config(None)
    ingest([sample], run_dir, shard_rows=cfg.ingest.shard_rows, thumbnail_size=cfg.ingest.thumbnail_size)
    score_run(run_dir, build_chain(cfg.scorers), backend="local")
    run_select(run_dir, cfg)
    build_report(run_dir, cfg)
    return run_dir


def _rows(run_dir: Path) -> list[dict]:
    layout = RunLayout(run_dir)
    return duckdb.sql(
        f"""select s.id, s.keep, s.drop_reason, s.drop_reasons, s.near_dup_group,
                   json_extract_string(i.meta, '$.defect') as defect, i.source_key
            from '{layout.selection}' s join read_parquet('{layout.ingest}/shard-*.parquet') i using (id)"""
    ).to_arrow_table().to_pylist()


def test_each_defect_is_caught_by_its_filter(run):
    rows = _rows(run)
    for defect, filter_name in CAUGHT_BY.items():
        hit = [r for r in rows if r["defect"] == defect]
        assert hit, f"the sample has no {defect} rows"
        missed = [r["source_key"] for r in hit if filter_name not in (r["drop_reasons"] or [])]
        assert not missed, f"{filter_name} let {defect} rows through: {missed}"
        assert not any(r["keep"] for r in hit)


def test_exact_duplicates_collapse_and_near_duplicates_keep_one(run, sample):
    captions = [json.loads(line) for line in (sample / "captions.jsonl").read_text().splitlines()]
    exact = {c["file_name"] for c in captions if c["defect"] == "exact_duplicate"}
    duplicates = duckdb.sql(f"select source_key from '{RunLayout(run).duplicates}'").fetchall()
    assert {Path(k).name for (k,) in duplicates} == exact

    rows = _rows(run)
    by_key = {Path(r["source_key"]).name: r for r in rows}
    for c in captions:
        if c["defect"] != "near_duplicate":
            continue
        copy, original = by_key[c["file_name"]], by_key[c["duplicate_of"]]
        if copy["drop_reason"] in (None, "near_duplicates") and original["drop_reason"] in (None, "near_duplicates"):
            assert copy["near_dup_group"] == original["near_dup_group"]
            assert [copy["keep"], original["keep"]].count(True) == 1, (c["file_name"], c["duplicate_of"])


def test_clean_rows_survive(run):
    clean = [r for r in _rows(run) if r["defect"] == "clean"]
    # a clean photo may lose only to its own near-duplicate copy (one survivor per group)
    wrongly = [(r["source_key"], r["drop_reasons"]) for r in clean if not r["keep"] and r["drop_reason"] != "near_duplicates"]
    assert not wrongly
    assert sum(r["keep"] for r in clean) >= 0.8 * len(clean)


def test_funnel_and_report(run):
    stages = {row["stage"]: row["rows"] for row in funnel(run)}
    removed = sum(n for stage, n in stages.items() if stage not in ("rows in", "ingested", "kept"))
    assert stages["rows in"] == 160 == stages["kept"] + removed
    html = (RunLayout(run).report / "index.html").read_text()
    for filter_name in CAUGHT_BY.values():
        assert filter_name in html


def _cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def test_cli_help_and_one_line_errors(tmp_path):
    assert "ingest" in _cli("--help").stdout and "--run" in _cli("score", "--help").stdout
    missing = _cli("ingest", str(tmp_path / "nowhere"), "--run", str(tmp_path / "r"), "--quiet")
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and "Traceback" not in missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("filters:\n  max_aspec_ratio: 3\n")
    config_error = _cli("select", "--run", str(tmp_path), "--config", str(bad), "--quiet")
    assert config_error.returncode == 2 and "filters.max_aspec_ratio" in config_error.stderr
    assert "Traceback" not in config_error.stderr


def test_killed_mid_score_resumes_to_the_same_funnel(sample, tmp_path):
    config = tmp_path / "small-shards.yaml"
    config.write_text("ingest:\n  shard_rows: 16\n")
    clean_run, crashed = tmp_path / "clean", tmp_path / "crashed"
    assert _cli("run", str(sample), "--run", str(clean_run), "--config", str(config), "--backend", "local", "--quiet").returncode == 0

    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(sample), "--run", str(crashed), "--config",
                             str(config), "--backend", "local", "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list((crashed / "score").glob("shard-*.parquet")):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before scoring began"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    scored_before = len(list((crashed / "score").glob("shard-*.parquet")))
    assert scored_before < len(list((crashed / "ingest").glob("shard-*.parquet"))), "killed too late to prove resume"

    resumed = _cli("run", str(sample), "--run", str(crashed), "--config", str(config), "--backend", "local", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert funnel(crashed) == funnel(clean_run)
