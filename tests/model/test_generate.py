"""Evaluation, step 1: prompt sets and generation (issue 10, item 1).

The checkpoints are tiny pipelines with RANDOM UNets (tests/model/conftest.py: export_tiny_pipeline), so
their images are noise-like: the tests check that every checkpoint gets the same prompts, seeds and
initial noise, the manifest, resuming, and the errors a user meets."""

from __future__ import annotations

import collections
import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from model.__main__ import main
from model.evaluation import EvalLayout, EvaluationError, load_prompts, read_manifest, split_prompts
from model.evaluation import schema
from model.evaluation.generate import checkpoint_labels, generate
from tests.model.conftest import export_tiny_pipeline

PROMPTS = ["a red fox in the snow", "a lighthouse at sunset", "a bowl of oranges"]


@pytest.fixture(scope="module")
def checkpoints(frozen, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("checkpoints")
    return {"base": export_tiny_pipeline(root / "base", frozen, seed=0),
            "tuned": export_tiny_pipeline(root / "tuned", frozen, seed=1),
            "big": export_tiny_pipeline(root / "big", frozen, seed=0, resolution=128)}


@pytest.fixture()
def prompt_file(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("text,category\n" + "".join(f"{p},{c}\n" for p, c in zip(PROMPTS, ["animals", "scenes", "food"])))
    return path


def test_every_checkpoint_gets_the_same_prompts_seeds_and_noise(checkpoints, prompt_file, tmp_path):
    prompts = load_prompts(prompt_file)
    out = EvalLayout(tmp_path / "run").generate
    # "base-again" is the base checkpoint under a second label: same (prompt, seed) -> the same pixels
    labelled = {"base": checkpoints["base"], "tuned": checkpoints["tuned"], "base-again": checkpoints["base"]}
    manifest_path = generate(labelled, prompts, seeds=2, out=out, steps=2, guidance_scale=3.0, batch_size=4)

    assert manifest_path == EvalLayout(tmp_path / "run").manifest
    stored = pq.read_table(manifest_path)
    assert stored.schema.equals(schema.MANIFEST_SCHEMA)
    assert stored.num_rows == 3 * 3 * 2
    assert all(not p.startswith("/") for p in stored.column(schema.IMAGE_PATH).to_pylist()), "stored relative"
    manifest = read_manifest(out)
    rows = manifest.to_pylist()
    keys = collections.defaultdict(set)
    for r in rows:
        keys[r[schema.CHECKPOINT]].add((r[schema.PROMPT_ID], r[schema.PROMPT], r[schema.CATEGORY], r[schema.SEED]))
        assert (r[schema.HEIGHT], r[schema.WIDTH], r[schema.NUM_INFERENCE_STEPS]) == (64, 64, 2)
        assert r[schema.IMAGE_PATH].endswith(f"images/{r[schema.CHECKPOINT]}/{r[schema.PROMPT_ID]}-s{r[schema.SEED]}.png")
        with Image.open(r[schema.IMAGE_PATH]) as im:
            assert im.size == (64, 64)
    assert keys["base"] == keys["tuned"] == keys["base-again"]
    assert {k[1] for k in keys["base"]} == set(PROMPTS) and {k[3] for k in keys["base"]} == {0, 1}

    pixels = {(r[schema.CHECKPOINT], r[schema.PROMPT_ID], r[schema.SEED]): np.asarray(Image.open(r[schema.IMAGE_PATH]), np.int16)
              for r in rows}
    for (label, prompt_id, seed), image in pixels.items():
        if label == "base":
            assert np.array_equal(image, pixels[("base-again", prompt_id, seed)]), "same checkpoint, same seed: same pixels"
            assert not np.array_equal(image, pixels[("tuned", prompt_id, seed)]), "another UNet draws another image"
            assert not np.array_equal(image, pixels[("base", prompt_id, 1 - seed)]), "another seed, another noise"


def test_a_rerun_makes_only_the_missing_images_and_refuses_other_settings(checkpoints, prompt_file, tmp_path):
    prompts = load_prompts(prompt_file)
    out = tmp_path / "generate"
    two = {"base": checkpoints["base"], "tuned": checkpoints["tuned"]}
    generate(two, prompts, seeds=[3, 4], out=out, steps=2)
    images = sorted((out / "images").rglob("*.png"))
    assert len(images) == 2 * 3 * 2
    removed = images[0]
    kept = {p: p.stat().st_mtime_ns for p in images[1:]}
    first = np.asarray(Image.open(removed), np.int16)
    removed.unlink()
    pq.write_table(pq.read_table(out / "manifest.parquet").slice(0, 1), out / "manifest.parquet")  # a cut manifest

    generate(two, prompts, seeds=[3, 4], out=out, steps=2)
    # the same image again; alone in its batch now, so float rounding may move a pixel level or two
    assert np.abs(np.asarray(Image.open(removed), np.int16) - first).max() <= 2
    assert {p: p.stat().st_mtime_ns for p in kept} == kept, "images on disk are not made again"
    assert read_manifest(out).num_rows == 2 * 3 * 2, "the manifest is rewritten complete"

    with pytest.raises(EvaluationError, match="sampled with .*'num_inference_steps': 2"):
        generate(two, prompts, seeds=[3, 4], out=out, steps=3)
    with pytest.raises(EvaluationError, match="label 'base' holds images of"):
        generate({"base": checkpoints["tuned"]}, prompts, seeds=[3], out=out, steps=2)


def test_checkpoints_of_different_latent_shapes_are_refused_before_generating(checkpoints, prompt_file, tmp_path):
    with pytest.raises(EvaluationError) as error:
        generate({"base": checkpoints["base"], "big": checkpoints["big"]}, load_prompts(prompt_file), 1, tmp_path / "g", steps=2)
    message = str(error.value)
    assert "'base'" in message and "'big'" in message
    assert "4x8x8 latents" in message and "4x16x16 latents" in message
    assert not (tmp_path / "g" / "images").exists()


def test_generate_cli_labels_and_errors(checkpoints, prompt_file, tmp_path, capsys):
    out = tmp_path / "run" / "generate"
    argv = ["generate", "--checkpoint", f"mine={checkpoints['tuned']}", "--checkpoint", str(checkpoints["base"]),
            "--checkpoint", str(checkpoints["base"]), "--prompts", str(prompt_file), "--n", "2", "--seeds", "1",
            "--steps", "2", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"manifest: {out / 'manifest.parquet'}" in printed
    manifest = read_manifest(out)
    assert set(manifest.column(schema.CHECKPOINT).to_pylist()) == {"mine", "base", "base-2"}
    assert manifest.num_rows == 3 * 2

    no_column = tmp_path / "bad.csv"
    no_column.write_text("caption,style\na cat,photo\n")
    assert main(["generate", "--checkpoint", str(checkpoints["base"]), "--prompts", str(no_column), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "bad.csv has no prompt column" in err and "['caption', 'style']" in err


def test_checkpoint_labels():
    assert checkpoint_labels(["a=/x/best", "/y/best", "/z/best"]) == {
        "a": Path("/x/best"), "best": Path("/y/best"), "best-2": Path("/z/best")}
    with pytest.raises(EvaluationError, match="given twice"):
        checkpoint_labels(["a=/x", "a=/y"])


# --- prompts ----------------------------------------------------------------------------------------


def test_shipped_prompt_sets_load_without_shared():
    parti, drawbench = load_prompts("parti"), load_prompts("drawbench")
    assert parti.schema.equals(schema.PROMPTS_SCHEMA)
    assert parti.num_rows == 1632 and len(set(parti.column(schema.CATEGORY).to_pylist())) == 12
    assert drawbench.num_rows == 200 and len(set(drawbench.column(schema.CATEGORY).to_pylist())) == 11
    first = parti.slice(0, 1).to_pylist()[0]
    assert first[schema.PROMPT] == "bond" and first[schema.CATEGORY] == "Abstract"
    assert first[schema.PROMPT_ID] == "parti-" + hashlib.sha256(b"bond").hexdigest()[:10]
    assert 'The 1970s logo for a london-area football club called "The Rumbury Wanderers"' in \
        parti.column(schema.PROMPT).to_pylist(), "quotes inside a TSV prompt are text"


def test_per_category_sampling_is_seeded_and_equal():
    counts = collections.Counter(load_prompts("parti", per_category=5).column(schema.CATEGORY).to_pylist())
    assert len(counts) == 12 and set(counts.values()) == {5}
    # 40 over DrawBench's 11 categories: 3 or 4 each, and "Rare Words" (7 prompts) is not short of 4
    sample = load_prompts("drawbench", n=40, seed=3)
    counts = collections.Counter(sample.column(schema.CATEGORY).to_pylist())
    assert sample.num_rows == 40 and len(counts) == 11 and set(counts.values()) <= {3, 4}
    assert sample.equals(load_prompts("drawbench", n=40, seed=3))
    assert not sample.equals(load_prompts("drawbench", n=40, seed=4))
    # more than a small category holds: it gives all it has, the others share the rest equally
    big = collections.Counter(load_prompts("drawbench", per_category=15).column(schema.CATEGORY).to_pylist())
    assert big["Rare Words"] == 7 and big["Colors"] == 15
    only = load_prompts("drawbench", categories=["Text", "Counting"], n=6)
    assert collections.Counter(only.column(schema.CATEGORY).to_pylist()) == {"Text": 3, "Counting": 3}
    with pytest.raises(EvaluationError, match="no prompts in categories \\['Cats'\\]"):
        load_prompts("drawbench", categories=["Cats"])


def test_split_prompts_keeps_selection_and_report_apart():
    table = load_prompts("drawbench")
    selection, report = split_prompts(table, 32, seed=1)
    chosen, reported = set(selection.column(schema.PROMPT_ID).to_pylist()), set(report.column(schema.PROMPT_ID).to_pylist())
    assert len(chosen) == 32 and not chosen & reported and chosen | reported == set(table.column(schema.PROMPT_ID).to_pylist())
    assert len(set(selection.column(schema.CATEGORY).to_pylist())) == 11, "the selection spans the categories"
    with pytest.raises(EvaluationError, match="n_select"):
        split_prompts(table, 200)


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".tsv", ".jsonl", ".parquet"])
def test_prompt_files_of_each_format(tmp_path, suffix):
    path = tmp_path / f"My Prompts{suffix}"
    if suffix == ".txt":
        path.write_text("\n".join(PROMPTS + [PROMPTS[0], ""]) + "\n")
    elif suffix == ".csv":
        path.write_text('Prompt,Category\n"a fox, in snow",animals\n' + "".join(f"{p},scenes\n" for p in PROMPTS))
    elif suffix == ".tsv":
        path.write_text("Prompts\tCategory\n" + "".join(f"{p}\tscenes\n" for p in PROMPTS))
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps({"prompt": p, "category": None}) + "\n" for p in PROMPTS))
    else:
        pq.write_table(pa.table({"text": PROMPTS, "Category": ["a", "b", "b"]}), path)
    table = load_prompts(path)
    assert set(PROMPTS) <= set(table.column(schema.PROMPT).to_pylist())
    assert all(i.startswith("my_prompts-") for i in table.column(schema.PROMPT_ID).to_pylist())
    if suffix in (".txt", ".jsonl"):
        assert table.num_rows == 3 and set(table.column(schema.CATEGORY).to_pylist()) == {schema.UNCATEGORIZED}
    if suffix == ".csv":
        assert "a fox, in snow" in table.column(schema.PROMPT).to_pylist()


def test_prompt_file_without_a_prompt_column(tmp_path):
    path = tmp_path / "captions.parquet"
    pq.write_table(pa.table({"caption": ["a cat"], "url": ["x"]}), path)
    with pytest.raises(EvaluationError, match=r"captions.parquet has no prompt column .*its columns: \['caption', 'url'\]"):
        load_prompts(path)
    (tmp_path / "p.xlsx").write_text("x")
    with pytest.raises(EvaluationError, match="unknown format '.xlsx'"):
        load_prompts(tmp_path / "p.xlsx")
