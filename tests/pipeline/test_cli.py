"""``python -m pipeline``: an error a user can fix (a pipeline.errors.UserError) is one line on stderr and
exit 2; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from pipeline.__main__ import main
from tests.builders import random_photo, write_ingest_run


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["select", "--run", "{tmp}/run", "--config", "{tmp}/missing.yaml"], "no such config file"),
        (["ingest", "{tmp}/no-such-folder", "--run", "{tmp}/run"], "no such file or folder"),
        (["ingest", "{tmp}/photos", "--run", "{tmp}/a-file/run"], "cannot create the run folder"),
        (["score", "--run", "{tmp}/empty", "--backend", "local"], "run ingest first"),
        (["select", "--run", "{tmp}/empty"], "run ingest first"),
        (["report", "--run", "{tmp}/empty"], "run select first"),
        (["sample", "{tmp}/sample", "--n", "3"], "at least"),
        (["sample", "{tmp}"], "not a sample"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "a-file").write_text("in the way")
    (tmp_path / "empty").mkdir()
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "0.jpg").write_bytes(random_photo(np.random.default_rng(0)))
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    assert message in one_line_error(capsys)


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """An exception that is no UserError (here an OSError raised by code, not by the user's input) is not
    turned into a one-line message: it propagates to the interpreter, traceback and all."""
    import pipeline.select

    write_ingest_run(tmp_path, n=4, shard_rows=4)

    def broken(*args, **kwargs):
        raise FileNotFoundError("/internal/file/the/code/should/have/written")

    monkeypatch.setattr(pipeline.select, "run_select", broken)
    with pytest.raises(FileNotFoundError, match="internal"):
        main(["select", "--run", str(tmp_path)])


def test_the_module_exits_2_for_a_user_error(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pipeline", "select", "--run", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("error: no ingest shards")


def test_the_readme_duckdb_example_runs_on_a_run_folder(tmp_path):
    """The README's query runs as written (the duckdb package from .venv, no DuckDB CLI) on the layout
    the pipeline writes."""
    import re
    from pathlib import Path

    from pipeline.config import THRESHOLD_FILTERS, parse_config
    from pipeline.engine import score_run
    from pipeline.scorers import build_chain
    from pipeline.select import run_select

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    commands = re.findall(r"`(\.venv/bin/python -c \"import duckdb;[^`]*)`", readme)
    assert len(commands) == 1, commands
    run_dir = tmp_path / "data" / "runs" / "demo"
    write_ingest_run(run_dir, n=12, shard_rows=12)
    score_run(run_dir, build_chain({"size": {}}), backend="local")
    filters = {**{f.name: None for f in THRESHOLD_FILTERS}, "max_aspect_ratio": 1.5}
    stats = run_select(run_dir, parse_config({"scorers": {}, "filters": filters, "balance": {"target_size": None}}))
    (tmp_path / ".venv").symlink_to(sys.prefix)  # the README's .venv/bin/python: this interpreter's environment
    done = subprocess.run(["bash", "-c", commands[0]], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "drop_reason" in done.stdout and "max_aspect_ratio" in done.stdout
    assert re.search(rf"│ NULL\s+│\s+{stats.kept} │", done.stdout), done.stdout  # kept rows have no drop reason
