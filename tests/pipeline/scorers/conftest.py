"""Fixtures for the model-backed scorers.

No CLIP weights exist offline, so CLIP tests use "tiny-random-clip-32": a 2-layer open_clip ViT built from
config with RANDOM weights, saved as a checkpoint file and loaded through the same `checkpoint:` path a
user's fine-tuned CLIP would take (tests/builders.py). Its scores are meaningless; the tests check the
plumbing (shapes, normalisation, nulls, truncation, reuse), not alignment quality.
"""

from __future__ import annotations

import pytest

from tests.builders import tiny_random_clip


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> dict:
    """Options selecting tiny-random-clip-32 (random init, seed 0) from a checkpoint file."""
    return tiny_random_clip(tmp_path_factory.mktemp("tiny-random-clip"))
