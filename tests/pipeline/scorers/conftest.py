"""Fixtures for the model-backed scorers.

No CLIP weights exist offline, so CLIP tests use "tiny-random-clip": a 2-layer open_clip ViT built from
the config file beside this one with RANDOM weights, saved as a checkpoint file and loaded through the
same `checkpoint:` path a user's fine-tuned CLIP would take. Its scores are meaningless; the tests check
the plumbing (shapes, normalisation, nulls, truncation, reuse), not alignment quality.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_CLIP = "tiny-random-clip"
TINY_CLIP_CONFIG = Path(__file__).with_name(f"{TINY_CLIP}.json")


def register_tiny_clip() -> None:
    import open_clip

    if TINY_CLIP not in open_clip.list_models():
        open_clip.add_model_config(TINY_CLIP_CONFIG)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> dict:
    """Options selecting tiny-random-clip (random init, seed 0) from a checkpoint file."""
    import open_clip
    import torch

    register_tiny_clip()
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP, pretrained=None)
    checkpoint = tmp_path_factory.mktemp("tiny-random-clip") / "tiny-random-clip.pt"
    torch.save(model.state_dict(), checkpoint)
    return {"model": TINY_CLIP, "pretrained": None, "checkpoint": str(checkpoint), "device": "cpu"}
