"""`python -m model train-qt` (what `make train-qt` runs) on a small curated set, tiny preset."""

from __future__ import annotations

import pytest

from model.__main__ import main
from tests.model.conftest import write_imagefolder


def test_train_qt_cli_pretrains_then_quality_tunes_and_prints_where_things_are(tmp_path, capsys):
    data = write_imagefolder(tmp_path / "curated", 12, missing_captions=1)
    sets = ["autoencoder.train_steps=5", "pretrain.0.max_steps=2", "pretrain.1.max_steps=2",
            "quality_tune.max_steps=3", "quality_tune.eval_every=3", "quality_tune.sample_every=3",
            "quality_tune.pixel_loss_weight=1.0", "sample.num_inference_steps=2", "sample.prompts=['a fox']"]
    argv = ["train-qt", "--preset", "tiny", "--data", str(data), "--out", str(tmp_path / "out")]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"quality-tuned checkpoint (best, step 3): {tmp_path / 'out' / 'quality_tune' / 'best'}" in out
    assert (tmp_path / "out" / "quality_tune" / "best" / "model_index.json").is_file()
    assert (tmp_path / "out" / "pretrain" / "01-pretrain-128" / "final" / "unet").is_dir()
    assert list((tmp_path / "out" / "quality_tune" / "samples").glob("step-*.png"))


def test_train_qt_cli_on_an_empty_set_fails_with_the_minimum(tmp_path, capsys):
    data = write_imagefolder(tmp_path / "empty", 0)
    assert main(["train-qt", "--preset", "tiny", "--data", str(data), "--out", str(tmp_path / "out")]) == 2
    assert "needs at least 2" in capsys.readouterr().err


def test_make_train_qt_on_a_small_curated_set(tmp_path):
    """`make train-qt` as a user runs it: tiny preset on the newest curated set under DATA."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    write_imagefolder(tmp_path / "runs" / "r1" / "annotation" / "curated", 10)
    sets = ("autoencoder.train_steps=5 pretrain.0.max_steps=2 pretrain.1.max_steps=2 quality_tune.max_steps=2 "
            "quality_tune.eval_every=2 quality_tune.sample_every=2 sample.num_inference_steps=2")
    done = subprocess.run(["make", "-s", "train-qt", f"DATA={tmp_path}", "PRESET=tiny", f"SET={sets}"],
                          cwd=root, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "quality-tuned checkpoint" in done.stdout
    assert (tmp_path / "train-qt-tiny" / "quality_tune" / "best" / "model_index.json").is_file()


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys):
    """A config typo names the field; an unknown preset and a checkpoint that is not one say so."""
    data = write_imagefolder(tmp_path / "curated", 4)
    train = ["train-qt", "--data", str(data), "--out", str(tmp_path / "out")]
    assert main([*train, "--preset", "tiny", "--set", "quality_tune.max_step=3"]) == 2
    assert _one_error_line(capsys.readouterr().err) == "error: config tiny: quality_tune.max_step: unknown field (a typo?)"
    assert main([*train, "--preset", "tiny", "--set", "quality_tune.optimizer=sgd"]) == 2
    assert "quality_tune.optimizer: Input should be 'adamw' or 'adamw8bit', got 'sgd'" in _one_error_line(capsys.readouterr().err)
    assert main([*train, "--preset", "tinny"]) == 2
    assert "no config 'tinny': not a file and not a preset" in _one_error_line(capsys.readouterr().err)
    assert main(["sample", "--checkpoint", str(tmp_path / "nowhere"), "--prompt", "a fox", "--out", str(tmp_path / "x.png")]) == 2
    assert "nowhere is not a checkpoint to sample from: no model_index.json" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out" / "quality_tune").exists()


@pytest.mark.parametrize("bug", [RuntimeError, ValueError, FileNotFoundError, KeyError])
def test_an_internal_bug_keeps_its_traceback(tmp_path, monkeypatch, bug):
    """Only user errors become one line: a bug, even a plain ValueError or FileNotFoundError, propagates."""
    import model.train

    def broken(*args, **kwargs):
        raise bug("a bug inside the training stage")

    monkeypatch.setattr(model.train, "read_captioned", broken)
    data = write_imagefolder(tmp_path / "curated", 4)
    with pytest.raises(bug, match="a bug inside the training stage"):
        main(["train-qt", "--preset", "tiny", "--data", str(data), "--out", str(tmp_path / "out")])


def test_zero_snr_pipelines_sample_with_guidance_rescale():
    """One rule for training's grids, `sample` and `generate`: 0.7 on a zero-terminal-SNR scheduler, else 0."""
    from types import SimpleNamespace

    from model.config import load_config
    from model.objective import sampling_scheduler
    from model.pipeline import guidance_rescale

    prediction = {"zero_snr": "v_prediction", "scaled_linear": "epsilon", "edm": "epsilon"}
    rescale = {schedule: guidance_rescale(SimpleNamespace(scheduler=sampling_scheduler(load_config("tiny", [
        f"diffusion.schedule={schedule}", f"diffusion.prediction_type={prediction[schedule]}"]))))
        for schedule in prediction}
    assert rescale == {"zero_snr": 0.7, "scaled_linear": 0.0, "edm": 0.0}
