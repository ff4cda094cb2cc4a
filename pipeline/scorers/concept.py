"""Visual concept classifier for domain balancing (Emu: "visual concept classification to source images
from specific domains (e.g., portrait, food, animal, landscape, car)").

The taxonomy is data (pipeline/concepts.yaml or a file given in the config). Two backends:
  * ``clip`` (default): zero-shot over the stored CLIP image embeddings (CLIP is not run on images
    again) against each domain's prompt embeddings (prompt-ensembled); softmax over domains at CLIP's
    own logit scale. Needs the same CLIP as the clip scorer, for its text tower only.
  * ``imagenet``: a torchvision ImageNet classifier (MobileNetV2 by default) loaded by torchvision's own
    loader; class probabilities are summed per domain through the taxonomy's ImageNet index lists.
``concept`` is the best domain, or "other" when its confidence is below ``threshold``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import yaml
from pydantic import BaseModel, ConfigDict, Field

from pipeline import schema
from pipeline.scorer import Resources, Scorer, ScorerError, ScorerOptions
from pipeline.scorers.clip import ClipModelOptions, load_clip
from pipeline.scorers.common import (
    Device,
    arrow_to_embeddings,
    decode_thumbnails,
    pick_device,
    placed,
)
from pipeline.weights import WeightSpec, resolve, torch_home

DEFAULT_TAXONOMY = Path(__file__).resolve().parents[1] / "concepts.yaml"
IMAGENET_CLASSES = 1000


class Domain(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompts: list[str] = Field(min_length=1)
    imagenet: list[int | str] = Field(default_factory=list)

    def imagenet_indices(self) -> list[int]:
        indices: list[int] = []
        for item in self.imagenet:
            if isinstance(item, str):
                low, _, high = item.partition("-")
                indices.extend(range(int(low), int(high or low) + 1))
            else:
                indices.append(item)
        if any(not 0 <= i < IMAGENET_CLASSES for i in indices):
            raise ValueError(f"ImageNet indices must be in 0-{IMAGENET_CLASSES - 1}: {self.imagenet}")
        return indices


class Taxonomy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    domains: dict[str, Domain] = Field(min_length=1)

    @classmethod
    def load(cls, path: str | Path) -> Taxonomy:
        path = Path(path)
        if not path.is_file():
            raise ScorerError(f"concept taxonomy file {path} does not exist")
        taxonomy = cls.model_validate(yaml.safe_load(path.read_text()))
        if schema.OTHER_CONCEPT in taxonomy.domains:
            raise ScorerError(f"concept taxonomy {path}: {schema.OTHER_CONCEPT!r} is reserved for low-confidence rows")
        return taxonomy

    def imagenet_matrix(self) -> np.ndarray:
        """(1000, domains) 0/1 matrix; an ImageNet class may belong to one domain only."""
        matrix = np.zeros((IMAGENET_CLASSES, len(self.domains)), dtype=np.float32)
        for column, (name, domain) in enumerate(self.domains.items()):
            for index in domain.imagenet_indices():
                if matrix[index].any():
                    raise ScorerError(f"ImageNet class {index} is mapped to two domains (one is {name!r})")
                matrix[index, column] = 1
        return matrix


class ConceptOptions(ScorerOptions):
    backend: Literal["clip", "imagenet"] = "clip"
    taxonomy: str = Field(str(DEFAULT_TAXONOMY), description="YAML file with domains, their prompts and ImageNet classes")
    threshold: float = Field(0.4, ge=0, le=1, description="below this confidence the concept is 'other' (a sum of probabilities for imagenet, a softmax over domains for clip)")
    clip: ClipModelOptions = Field(default_factory=ClipModelOptions, description="the CLIP that made the stored embeddings")
    imagenet_weights: str = Field("MobileNet_V2_Weights.IMAGENET1K_V1", description="a torchvision weights name")
    device: Device = "auto"
    batch_size: int = Field(64, ge=1)


class ConceptScorer(Scorer):
    name = "concept"
    input_columns = (schema.CLIP_IMAGE_EMBEDDING,)
    output_fields = (
        pa.field(schema.CONCEPT, pa.string()),
        pa.field(schema.CONCEPT_CONFIDENCE, pa.float32()),
    )
    # clip backend: a matmul over stored embeddings per batch, but each actor holds a whole CLIP (for its
    # prompt vectors), so one actor is enough and many would only multiply that memory
    resources = Resources(num_cpus=0.5, batch_size=1024, max_workers=1)
    stateful = True
    Options = ConceptOptions
    options: ConceptOptions

    def __init__(self, options: ConceptOptions | None = None) -> None:
        super().__init__(options)
        # the backend decides what the scorer reads: stored embeddings, or the thumbnails themselves
        if self.options.backend == "imagenet":
            self.input_columns = (schema.ID, schema.THUMBNAIL)
            self.resources = placed(Resources(num_cpus=1, batch_size=256), self.options.device)

    def weights(self) -> list[WeightSpec]:
        if self.options.backend == "clip":
            return [self.options.clip.weight_spec()]
        return [WeightSpec(f"imagenet:{self.options.imagenet_weights}", "torchvision", self.options.imagenet_weights,
                           expected="torchvision ImageNet classifier state dict")]

    def setup(self) -> None:
        self.taxonomy = Taxonomy.load(self.options.taxonomy)
        self.names = list(self.taxonomy.domains)
        if self.options.backend == "clip":
            self._setup_clip()
        else:
            self._setup_imagenet()

    def _setup_clip(self) -> None:
        import torch

        model, _, tokenizer, device = load_clip(self.options.clip)
        vectors = []
        with torch.inference_mode():
            for domain in self.taxonomy.domains.values():
                text = model.encode_text(tokenizer(domain.prompts).to(device)).float()
                text = text / text.norm(dim=-1, keepdim=True)
                mean = text.mean(dim=0)
                vectors.append((mean / mean.norm()).cpu().numpy())
            self.logit_scale = float(model.logit_scale.exp().cpu())
        self.prompt_vectors = np.stack(vectors)  # (domains, width)

    def _setup_imagenet(self) -> None:
        from torchvision.models import get_model_builder, get_weight

        resolve(self.weights()[0])  # the file must be staged: torchvision would otherwise download it
        # torchvision's loader reads $TORCH_HOME/hub/checkpoints; point it at the staged dir when unset
        os.environ.setdefault("TORCH_HOME", str(torch_home()))
        weights = get_weight(self.options.imagenet_weights)
        builder = get_model_builder(self.options.imagenet_weights.split("_Weights")[0].lower())
        self.device = pick_device(self.options.device)
        self.model = builder(weights=weights).eval().to(self.device)
        self.transform = weights.transforms()
        self.domain_matrix = self.taxonomy.imagenet_matrix()

    def _probabilities(self, batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
        """(rows, domains) domain probabilities and a valid mask."""
        if self.options.backend == "clip":
            embeddings, valid = arrow_to_embeddings(batch.column(schema.CLIP_IMAGE_EMBEDDING), what="concept")
            if valid.any() and embeddings.shape[1] != self.prompt_vectors.shape[1]:
                raise ScorerError(
                    f"concept: stored CLIP embeddings are {embeddings.shape[1]}-wide, the configured CLIP "
                    f"({self.options.clip.model}) is {self.prompt_vectors.shape[1]}-wide: configure the same CLIP as the clip scorer"
                )
            logits = self.logit_scale * (embeddings @ self.prompt_vectors.T) if valid.any() else np.zeros((len(valid), len(self.names)))
            logits -= logits.max(axis=1, keepdims=True)
            probabilities = np.exp(logits)
            return probabilities / probabilities.sum(axis=1, keepdims=True), valid
        import torch

        images = decode_thumbnails(batch)
        out = []
        for start in range(0, len(images), self.options.batch_size):
            x = torch.stack([self.transform(im) for im in images[start : start + self.options.batch_size]]).to(self.device)
            with torch.inference_mode():
                out.append(self.model(x).softmax(dim=1).float().cpu().numpy())
        return np.concatenate(out) @ self.domain_matrix, np.ones(len(images), dtype=bool)

    def score(self, batch: pa.RecordBatch) -> dict[str, Any]:
        probabilities, valid = self._probabilities(batch)
        best = probabilities.argmax(axis=1)
        confidence = probabilities[np.arange(len(best)), best]
        concepts = [
            None if not ok else self.names[b] if c >= self.options.threshold else schema.OTHER_CONCEPT
            for b, c, ok in zip(best, confidence, valid)
        ]
        return {
            schema.CONCEPT: concepts,
            schema.CONCEPT_CONFIDENCE: pa.array(confidence.astype(np.float32), mask=~valid),
        }
