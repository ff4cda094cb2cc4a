"""pipeline/weights.py: staging checks hashes, offline staging never downloads, errors name the file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import weights
from pipeline.weights import WeightsError, WeightSpec


def test_offline_prefetch_checks_what_is_staged(shared_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NEEDLES_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("NEEDLES_OFFLINE", "1")
    config = {"scorers": {"ocr": {}, "nsfw": {}, "aesthetic": {}}}
    with pytest.raises(WeightsError, match="sac\\+logos\\+ava1-l14-linearMSE.pth"):
        weights.prefetch_all(config)
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "sac+logos+ava1-l14-linearMSE.pth").symlink_to(
        shared_dir / "weights" / "aesthetic" / "improved_sac+logos+ava1-l14-linearMSE.pth"
    )
    staged = {spec.name for spec, _ in weights.prefetch_all(config)}
    assert staged == {"easyocr-craft", "easyocr-english_g2", "open-nsfw", "aesthetic:improved_sac+logos+ava1-l14-linearMSE"}


def test_cli_reports_missing_weights(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("scorers:\n  clip: {model: ViT-B-32, pretrained: laion2b_s34b_b79k}\n")
    env = {**os.environ, "NEEDLES_WEIGHTS_DIR": str(tmp_path), "NEEDLES_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "pipeline", "weights", "--config", str(config)],
                            check=False, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[3])
    assert result.returncode != 0
    assert "ViT-B-32 pretrained='laion2b_s34b_b79k' is not staged" in result.stdout + result.stderr


def test_hash_mismatch_names_file_and_expected_hash(tmp_path):
    path = tmp_path / "head.pth"
    path.write_bytes(b"something else")
    spec = WeightSpec("head", "path", str(path), "0" * 64, expected="an MLP 768-1024-128-64-16-1")
    with pytest.raises(WeightsError, match=f"{path}.*expected 0000.*768-1024"):
        weights.resolve(spec)
