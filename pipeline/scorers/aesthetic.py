"""Aesthetic score (Emu: "aesthetic score filter") from the LAION aesthetic predictors, applied to the
stored CLIP image embeddings (CLIP is never recomputed here).

Heads (state dicts, loaded with ``torch.load(weights_only=True)``):
  * LAION improved predictor (christophschuhmann/improved-aesthetic-predictor): an MLP
    768-1024-128-64-16-1 on the L2-normalised ViT-L/14 (OpenAI) image embedding, ~1-10 scale.
    "linearMSE" files have dropout and no activations (keys layers.{0,2,4,6,7});
    the "reluMSE" file has a ReLU after each hidden layer (keys layers.{0,3,6,9,11}).
  * LAION aesthetic predictor v1 (LAION-AI/aesthetic-predictor): one Linear(D -> 1), D = 512 for
    ViT-B/32 and ViT-B/16, 768 for ViT-L/14.
A head whose input width differs from the embeddings' width is refused: it was trained on another CLIP.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from pipeline import schema
from pipeline.scorer import Resources, Scorer, ScorerError, ScorerOptions
from pipeline.scorers.common import arrow_to_embeddings
from pipeline.weights import WeightSpec, resolve

_IMPROVED = "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
_V1 = "https://github.com/LAION-AI/aesthetic-predictor/raw/main/"

#: known heads by name: (URL, sha256, CLIP it was trained on)
KNOWN_HEADS: dict[str, tuple[str, str, str]] = {
    "improved_sac+logos+ava1-l14-linearMSE": (_IMPROVED + "sac+logos+ava1-l14-linearMSE.pth", "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0", "ViT-L-14 openai"),
    "improved_ava+logos-l14-linearMSE": (_IMPROVED + "ava+logos-l14-linearMSE.pth", "390a3aafaf3b37d57148f9b22f30556de38343064b7d915acfa80d3812b4c9ff", "ViT-L-14 openai"),
    "improved_ava+logos-l14-reluMSE": (_IMPROVED + "ava+logos-l14-reluMSE.pth", "0af3254c651d55b7ea851429c20f26ec880bb0169805a4df85b814bd7966f3e4", "ViT-L-14 openai"),
    "laion_v1_sa_0_4_vit_l_14_linear": (_V1 + "sa_0_4_vit_l_14_linear.pth", "2cd4e60f4f24ae3bcd57b847b13c1f3ba27edc28cc1a7f9ce74ee9f421243cba", "ViT-L-14 openai"),
    "laion_v1_sa_0_4_vit_b_16_linear": (_V1 + "sa_0_4_vit_b_16_linear.pth", "8ad3923d7ecf019df20ecd2ab5542a3075fbba0278d239c0371345f3d7fcbde0", "ViT-B-16 openai"),
    "laion_v1_sa_0_4_vit_b_32_linear": (_V1 + "sa_0_4_vit_b_32_linear.pth", "c7b14cead230694acc7b9447974d3cad78003c72da032e402a303b6c2429e85f", "ViT-B-32 openai"),
}

def head_clip_mismatch(head: str, clip_model: str, clip_pretrained: str | None) -> str | None:
    """Why a known head cannot score that CLIP's embeddings (None when it can, or when the CLIP comes from a
    local checkpoint whose origin is unknown). Same width is not enough: a ViT-L/14 trained on LAION has
    768-wide embeddings in another space than OpenAI's, which the LAION heads were trained on."""
    if head not in KNOWN_HEADS or clip_pretrained is None:
        return None
    trained_on = KNOWN_HEADS[head][2]
    used = f"{clip_model} {clip_pretrained}"
    return None if used == trained_on else f"aesthetic head {head!r} was trained on {trained_on} embeddings, not {used}"


# Layouts by their exact key sets: Linear indices inside the original nn.Sequential, and whether a ReLU
# follows each hidden Linear.
_IMPROVED_LINEAR = ([0, 2, 4, 6, 7], False)
_IMPROVED_RELU = ([0, 3, 6, 9, 11], True)
_HIDDEN = (1024, 128, 64, 16)


def _keys(indices: list[int]) -> set[str]:
    return {f"layers.{i}.{p}" for i in indices for p in ("weight", "bias")}


class AestheticHead:
    """The predictor as numpy matrices (tiny: a torch module would only add overhead per batch)."""

    def __init__(self, state: dict[str, Any], source: str) -> None:
        keys = set(state)
        if keys == {"weight", "bias"}:
            self.layers = [(state["weight"], state["bias"])]
            self.relu = False
        else:
            for indices, relu in (_IMPROVED_LINEAR, _IMPROVED_RELU):
                if keys == _keys(indices):
                    self.layers = [(state[f"layers.{i}.weight"], state[f"layers.{i}.bias"]) for i in indices]
                    self.relu = relu
                    break
            else:
                raise ScorerError(
                    f"aesthetic head {source}: unknown layout, keys {sorted(keys)}; expected a LAION improved "
                    f"predictor (layers.{{0,2,4,6,7}} or layers.{{0,3,6,9,11}}, widths D-{'-'.join(map(str, _HIDDEN))}-1) "
                    f"or a v1 linear head (weight [1, D], bias [1])"
                )
        self.layers = [(np.asarray(w, np.float32), np.asarray(b, np.float32)) for w, b in self.layers]
        widths = [w.shape for w, _ in self.layers]
        if self.layers[-1][0].shape[0] != 1 or any(a[0] != b[1] for a, b in pairwise(widths)):
            raise ScorerError(f"aesthetic head {source}: layer shapes {widths} do not chain to one output")
        self.input_width = widths[0][1]
        self.source = source

    def __call__(self, embeddings: np.ndarray) -> np.ndarray:
        x = embeddings
        for index, (weight, bias) in enumerate(self.layers):
            x = x @ weight.T + bias
            if self.relu and index < len(self.layers) - 1:
                x = np.maximum(x, 0)
        return x[:, 0]


class AestheticOptions(ScorerOptions):
    head: str = Field(
        "improved_sac+logos+ava1-l14-linearMSE",
        description="a known head name (see KNOWN_HEADS), a local .pth path or an http(s) URL (staged by `make weights`)",
    )
    sha256: str | None = Field(None, description="expected sha256 of a path/URL head (known heads carry their own)")


def head_spec(head: str, sha256: str | None) -> WeightSpec:
    if head in KNOWN_HEADS:
        url, digest, clip = KNOWN_HEADS[head]
        return WeightSpec(f"aesthetic:{head}", "url", url, sha256 or digest, expected=f"LAION aesthetic head for {clip}")
    kind = "url" if head.startswith(("http://", "https://")) else "path"
    return WeightSpec(f"aesthetic:{head}", kind, head, sha256, expected="a LAION aesthetic head state dict")


def load_head(path) -> AestheticHead:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for non-checkpoints
        raise ScorerError(f"aesthetic head {path} is not a readable state dict: {error}") from error
    if not isinstance(state, dict):
        raise ScorerError(f"aesthetic head {path} holds a {type(state).__name__}, expected a state dict")
    return AestheticHead({k: v.numpy() for k, v in state.items()}, str(path))


class AestheticScorer(Scorer):
    name = "aesthetic"
    input_columns = (schema.CLIP_IMAGE_EMBEDDING,)
    output_fields = (pa.field(schema.AESTHETIC_SCORE, pa.float32()),)
    resources = Resources(num_cpus=0.25, batch_size=4096)
    stateful = True
    Options = AestheticOptions
    options: AestheticOptions

    def weights(self) -> list[WeightSpec]:
        return [head_spec(self.options.head, self.options.sha256)]

    def setup(self) -> None:
        self.head = load_head(resolve(self.weights()[0]))

    def score(self, batch: pa.RecordBatch) -> dict[str, Any]:
        embeddings, valid = arrow_to_embeddings(batch.column(schema.CLIP_IMAGE_EMBEDDING), what="aesthetic")
        if valid.any() and embeddings.shape[1] != self.head.input_width:
            raise ScorerError(
                f"aesthetic head {self.head.source} takes {self.head.input_width}-wide CLIP embeddings, but "
                f"{schema.CLIP_IMAGE_EMBEDDING} is {embeddings.shape[1]}-wide: the head was trained on another CLIP "
                f"model (ViT-L/14 = 768, ViT-B = 512); configure the matching clip model or head"
            )
        scores = np.full(len(valid), np.nan, dtype=np.float32)
        if valid.any():
            scores[valid] = self.head(embeddings[valid])
        return {schema.AESTHETIC_SCORE: pa.array(scores, type=pa.float32(), mask=~valid)}
