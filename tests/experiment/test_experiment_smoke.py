"""The experiment end to end at its smoke size: haystack, curation, a TINY RANDOMLY-INITIALISED model
pre-trained for a few steps, every quality-tuning arm, generation, judges and the report (the numbers mean
nothing at this size; the test shows the machinery holds together and the report holds every arm)."""

from __future__ import annotations

import json
import time

import pytest

from experiment.__main__ import main
from experiment.run import PROFILES, arms


@pytest.mark.slow
def test_smoke_experiment_runs_end_to_end_and_reports_every_arm(tmp_path, staged_mobilenet):
    t0 = time.perf_counter()
    assert main(["run", "--out", str(tmp_path / "exp"), "--profile", "smoke"]) == 0
    elapsed = time.perf_counter() - t0
    report = json.loads((tmp_path / "exp" / "report" / "report.json").read_text())
    names = [a.name for a in arms(PROFILES["smoke"])]
    assert list(report["arms"]) == names
    for name in names:
        arm = report["arms"][name]
        assert "skipped" not in arm, (name, arm)
        assert 0.0 <= arm["q"]["mean"] <= 1.0
        assert arm["kid"] is not None
        if name != "base":
            s = arm["vs_base"]
            assert s["wins"] + s["ties"] + s["losses"] == s["n_pairs"] > 0
    pixel = report["training"][0]["pixel_loss_weight"]
    assert pixel["qt-2k"] == 0 and pixel["qt-2k-pixel"] > 0  # "auto" was calibrated to a number
    assert report["curation"]["mean_q"]["specialist"] > report["curation"]["mean_q"]["automatic_filters"]
    ceiling = report["autoencoder_ceiling"][0]
    assert 0.0 <= ceiling["q_reconstructed"] <= 1.0 and ceiling["images"] > 0
    md = (tmp_path / "exp" / "report" / "index.md").read_text()
    assert "Table 1" in md and "Table 2" in md and all(n in md for n in names)
    assert (tmp_path / "exp" / "report" / "samples.png").is_file()
    # a rerun finds every step's outputs and redoes nothing
    t1 = time.perf_counter()
    assert main(["run", "--out", str(tmp_path / "exp"), "--profile", "smoke", "--step", "train"]) == 0
    assert time.perf_counter() - t1 < 10
    assert elapsed < 120 * 2  # < 2 min on an idle 2-core machine; this suite shares its cores with others


def test_unknown_steps_and_missing_earlier_steps_are_user_errors(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path / "x"), "--profile", "smoke", "--step", "judge"]) == 2
    assert "missing: run the earlier steps first" in capsys.readouterr().err
