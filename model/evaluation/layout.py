"""Where each step of one evaluation run reads and writes (issue 10):

    RUN/generate/manifest.parquet                      one row per generated image (schema.MANIFEST_SCHEMA)
    RUN/generate/settings.json                         sampling settings and checkpoints, checked on resume
    RUN/generate/images/<label>/<prompt_id>-s<seed>.png
    RUN/judges/judges.parquet                          manifest keys + per-image automatic scores
    RUN/judges/summary.json                            means with bootstrap CIs, KID/CMMD, skipped judges
    RUN/ab/<criterion>/...                             the human A/B rounds (annotation/layout.py: ABLayout)
    RUN/report/index.html
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# names inside RUN/generate: generate() is given that folder itself (``--out RUN/generate``)
MANIFEST_FILE = "manifest.parquet"
SETTINGS_FILE = "settings.json"
IMAGES_DIR = "images"


@dataclass(frozen=True)
class EvalLayout:
    run: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "run", Path(self.run))

    @property
    def generate(self) -> Path:
        return self.run / "generate"

    @property
    def manifest(self) -> Path:
        return self.generate / MANIFEST_FILE

    @property
    def images(self) -> Path:
        return self.generate / IMAGES_DIR

    @property
    def judges(self) -> Path:
        return self.run / "judges"

    @property
    def judges_table(self) -> Path:
        return self.judges / "judges.parquet"

    @property
    def judges_summary(self) -> Path:
        return self.judges / "summary.json"

    @property
    def ab(self) -> Path:
        return self.run / "ab"

    @property
    def report(self) -> Path:
        return self.run / "report"


def image_relpath(label: str, prompt_id: str, seed: int) -> str:
    """An image's path relative to RUN/generate (the manifest stores it so, and the folder can move)."""
    return f"{IMAGES_DIR}/{label}/{prompt_id}-s{seed}.png"
