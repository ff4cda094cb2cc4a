"""Concept scorer: the ImageNet backend with torchvision's real MobileNetV2 weights on real COCO photos,
and the CLIP backend's plumbing with tiny-random-clip (random weights: its concepts are meaningless)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pipeline import schema
from pipeline.scorer import ScorerError
from pipeline.scorers import build_scorer
from pipeline.scorers.concept import DEFAULT_TAXONOMY, Taxonomy
from pipeline.weights import WeightsError
from tests.pipeline.scorers.images import photo, table

FOOD = {"banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake"}
ANIMAL = {"bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe"}
ROOMS = {"oven", "refrigerator", "sink", "bed", "couch", "toilet", "microwave"}  # kitchens, bathrooms, bedrooms, living rooms


def test_taxonomy_file_is_valid():
    taxonomy = Taxonomy.load(DEFAULT_TAXONOMY)
    assert {"portrait", "food", "animal", "landscape", "car", "architecture", "interior"} <= set(taxonomy.domains)
    matrix = taxonomy.imagenet_matrix()
    assert matrix.sum(axis=1).max() == 1  # every ImageNet class in at most one domain
    assert matrix[963, list(taxonomy.domains).index("food")] == 1  # pizza


INDOOR_SCENES = ["restaurant", "bookshop", "library", "barbershop", "bakery", "butcher shop", "confectionery", "grocery store",
                 "tobacco shop", "toyshop", "shoe shop", "cinema", "home theater", "altar", "dining table", "studio couch",
                 "four-poster", "bookcase", "wardrobe", "washbasin", "refrigerator", "stove"]
BUILDINGS = ["church", "castle", "palace", "mosque", "monastery", "barn", "boathouse", "dome", "suspension bridge", "viaduct"]


def imagenet_domains(taxonomy: Taxonomy) -> dict[str, str]:
    """ImageNet class name (torchvision's categories) -> the domain the imagenet backend sums it into."""
    from torchvision.models import MobileNet_V2_Weights

    categories = MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]  # names only: no weights are read
    matrix, names = taxonomy.imagenet_matrix(), list(taxonomy.domains)
    return {categories[i]: names[int(row.argmax())] for i, row in enumerate(matrix) if row.any()}


def test_indoor_scenes_are_interior_and_buildings_architecture():
    domains = imagenet_domains(Taxonomy.load(DEFAULT_TAXONOMY))
    assert {name: domains.get(name) for name in INDOOR_SCENES} == dict.fromkeys(INDOOR_SCENES, "interior")
    assert {name: domains.get(name) for name in BUILDINGS} == dict.fromkeys(BUILDINGS, "architecture")
    assert (domains["pizza"], domains["seashore"], domains["sports car"]) == ("food", "landscape", "car")


def test_imagenet_backend_finds_food_animals_and_interiors_in_coco(shared_dir, tmp_path, monkeypatch):
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "mobilenet_v2-b0353104.pth").symlink_to(shared_dir / "weights" / "imagenet" / "mobilenet_v2-b0353104.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    coco = shared_dir / "data" / "coco-mini"
    rows = [json.loads(line) for line in (coco / "metadata.jsonl").read_text().splitlines()]

    def pick(categories: set[str], unless: frozenset[str] = frozenset()) -> list[dict]:
        # photos showing these categories and no person (a person would make "portrait"/"other" fair answers)
        return [r for r in rows if set(r.get("coco_categories") or []) & categories
                and not set(r.get("coco_categories") or []) & (unless | {"person"})][:10]

    food, animal, rooms = pick(FOOD), pick(ANIMAL), pick(ROOMS, unless=frozenset(FOOD | ANIMAL))
    images = []
    for r in food + animal + rooms:
        image = Image.open(coco / r["file_name"]).convert("RGB")
        image.thumbnail((schema.THUMBNAIL_SIZE, schema.THUMBNAIL_SIZE))
        images.append(image)
    scorer = build_scorer("concept", {"backend": "imagenet", "device": "cpu", "threshold": 0.3})
    scorer.setup()
    out = scorer(table(images))
    concepts = out.column(schema.CONCEPT).to_pylist()
    confidence = np.array(out.column(schema.CONCEPT_CONFIDENCE).to_pylist())
    assert np.all((confidence > 0) & (confidence <= 1 + 1e-6))
    food_rate = sum(c == "food" for c in concepts[: len(food)]) / len(food)
    animal_rate = sum(c == "animal" for c in concepts[len(food) : len(food) + len(animal)]) / len(animal)
    room_concepts = concepts[len(food) + len(animal) :]
    assert food_rate >= 0.6, concepts[: len(food)]
    assert animal_rate >= 0.6, concepts[len(food) : len(food) + len(animal)]
    # kitchens, bathrooms and bedrooms are interiors (7 of 10 here; the rest "other"), never buildings
    assert sum(c == "interior" for c in room_concepts) / len(rooms) >= 0.6 and "architecture" not in room_concepts, room_concepts


def test_imagenet_backend_refuses_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match="mobilenet_v2-b0353104.pth"):
        build_scorer("concept", {"backend": "imagenet"}).setup()


def test_clip_backend_reads_stored_embeddings(tiny_clip):
    clip = build_scorer("clip", tiny_clip)
    clip.setup()
    scored = clip(table([photo("astronaut"), photo("chelsea"), photo("coffee")], ["an astronaut", "a cat", "coffee"]))
    concept = build_scorer("concept", {"clip": tiny_clip, "threshold": 0.0})
    concept.setup()
    out = concept(scored.select([schema.CLIP_IMAGE_EMBEDDING]))
    names = set(Taxonomy.load(DEFAULT_TAXONOMY).domains)
    assert set(out.column(schema.CONCEPT).to_pylist()) <= names
    confidence = np.array(out.column(schema.CONCEPT_CONFIDENCE).to_pylist())
    assert np.all((confidence >= 1 / len(names) - 1e-6) & (confidence <= 1))

    strict = build_scorer("concept", {"clip": tiny_clip, "threshold": 1.0})
    strict.setup()
    assert strict(scored).column(schema.CONCEPT).to_pylist() == ["other"] * 3


def test_clip_backend_refuses_embeddings_of_another_clip(tiny_clip):
    import pyarrow as pa

    from pipeline.scorers.common import embeddings_to_arrow

    concept = build_scorer("concept", {"clip": tiny_clip})
    concept.setup()
    with pytest.raises(ScorerError, match="768-wide"):
        concept(pa.table({schema.CLIP_IMAGE_EMBEDDING: embeddings_to_arrow(np.ones((2, 768), np.float32))}))
