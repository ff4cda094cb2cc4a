"""The YAML config: defaults, overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import (
    FILTERS_BY_NAME,
    THRESHOLD_FILTERS,
    ConfigError,
    PipelineConfig,
    default_config_yaml,
    load_config,
    parse_config,
)

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_config_is_the_rendered_defaults():
    shipped = (ROOT / "configs" / "pipeline.yaml").read_text(encoding="utf-8")
    assert shipped == default_config_yaml(), "configs/pipeline.yaml is stale: python -m pipeline.config > configs/pipeline.yaml"
    assert load_config(ROOT / "configs" / "pipeline.yaml") == load_config(None)


def test_defaults():
    config = load_config(None)
    assert config.balance.target_size == 200_000
    assert config.balance.rank_by == "aesthetic_score"
    assert list(config.scorers) == ["size", "phash", "technical"]
    # each scorer's options are filled in from its own Options model
    assert config.scorers["phash"] == {"hash_size": 8}
    assert config.filters.max_aspect_ratio == 3.0 and config.filters.min_side == 192


def test_partial_file_overrides_only_its_keys(tmp_path):
    config = load_config(write(tmp_path, "filters:\n  min_side: 512\n  min_clip_score: null\nbalance:\n  target_size: 10\n"))
    assert config.filters.min_side == 512
    assert config.filters.min_clip_score is None
    assert config.filters.max_aspect_ratio == 3.0  # untouched default
    assert config.balance.target_size == 10


def test_scorers_section_replaces_the_list_in_its_order(tmp_path):
    config = load_config(write(tmp_path, "scorers:\n  technical: {analysis_size: 128}\n  size:\n"))
    assert list(config.scorers) == ["technical", "size"]
    assert config.scorers["technical"] == {"analysis_size": 128}


@pytest.mark.parametrize(
    "text, message",
    [
        ("filters:\n  max_aspec_ratio: 2\n", "unknown key filters.max_aspec_ratio (did you mean max_aspect_ratio?)"),
        ("filter:\n  min_side: 2\n", "unknown key filter (did you mean filters?)"),
        ("filters:\n  max_aspect_ratio: 0.5\n", "filters.max_aspect_ratio: Input should be greater than or equal to 1, got 0.5"),
        ("filters:\n  min_side: 12.5\n", "filters.min_side: Input should be a valid integer, got 12.5"),
        ("filters:\n  max_nsfw: high\n", "filters.max_nsfw: Input should be a valid number"),
        ("scorers:\n  sise: {}\n", "unknown scorer sise (did you mean size?)"),
        ("scorers:\n  phash: {hash_sise: 8}\n", "unknown key scorers.phash.hash_sise (did you mean hash_size?)"),
        ("balance:\n  quotas: {food: 1.5}\n", "balance.quotas: food: a fraction must be within 0-1, got 1.5"),
        ("balance:\n  target_size: 100\n  quotas: {food: 0.5, people: 60}\n", "quotas add up to 110 rows, more than target_size 100"),
        ("filters:\n  min_clip_score: 28\n", "filters.min_clip_score 28.0 is outside the CLIP score's range +-1.0"),
        ("ingest:\n  shard_rows: 0\n", "ingest.shard_rows: Input should be greater than or equal to 1, got 0"),
        ("- a\n- b\n", "the config must be a mapping of sections, got list"),
        ("filters: [\n", "not valid YAML"),
        ("filters:\n  min_side: 512\n  min_side: 64\n", "key 'min_side' is given twice"),
    ],
)
def test_errors_name_the_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert message in str(error.value)
    assert str(path) in str(error.value)


def test_every_error_is_reported_at_once():
    with pytest.raises(ConfigError) as error:
        parse_config({"filters": {"min_side": 0, "max_nsfw": 2}})
    assert "filters.min_side" in str(error.value) and "filters.max_nsfw" in str(error.value)


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.yaml")
    assert load_config(write(tmp_path, "")) == PipelineConfig()


def test_quotas_fraction_or_count():
    config = parse_config({"balance": {"target_size": 1000, "quotas": {"food": 0.25, "people": 100, "cars": 1.0 / 3}}})
    assert config.balance.quota_counts() == {"food": 250, "people": 100, "cars": 333}


def test_every_threshold_filter_is_a_config_key_and_reads_a_schema_column():
    from pipeline import schema

    columns = {getattr(schema, name) for name in dir(schema) if name.isupper() and isinstance(getattr(schema, name), str)}
    for f in THRESHOLD_FILTERS:
        assert f.name in type(PipelineConfig().filters).model_fields
        assert f.column in columns, f"{f.name} reads {f.column}, which pipeline/schema.py does not name"
    assert FILTERS_BY_NAME["min_clip_score"].null_reason == "clip_score_null"
    assert FILTERS_BY_NAME["min_engagement"].null_passes


def test_clip_threshold_follows_the_clip_scorers_scale():
    assert parse_config({"scorers": {"clip": {"scale": 100}}, "filters": {"min_clip_score": 28}}).filters.min_clip_score == 28


def test_aesthetic_and_concept_must_read_the_clip_scorers_embeddings():
    """Same-width embeddings of another CLIP would be scored silently and wrongly: refuse the config."""
    laion = {"model": "ViT-L-14", "pretrained": "laion2b_s32b_b82k"}
    with pytest.raises(ConfigError, match="trained on ViT-L-14 openai embeddings, not ViT-L-14 laion2b_s32b_b82k"):
        parse_config({"scorers": {"clip": laion, "aesthetic": {}}})
    with pytest.raises(ConfigError, match="scorers.concept.clip .* is not the CLIP the clip scorer runs"):
        parse_config({"scorers": {"clip": laion, "concept": {}}})
    # the same CLIP in both places, a head for it, or a local checkpoint (origin unknown) pass
    parse_config({"scorers": {"clip": laion, "concept": {"clip": laion}}})
    parse_config({"scorers": {"clip": {}, "aesthetic": {}, "concept": {}}})
    local = {"model": "ViT-L-14", "pretrained": None, "checkpoint": "/models/my-clip.pt"}
    parse_config({"scorers": {"clip": local, "aesthetic": {}, "concept": {"clip": local}}})
