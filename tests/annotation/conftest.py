"""A real Label Studio for the annotation tests (started once per session, fresh data dir, stopped by
PID), and small pools of real photos (scikit-image's sample images) built in code."""

from __future__ import annotations

import hashlib
import io
import os
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import skimage.data
from PIL import Image

from annotation.client import DEV_MODE_VAR
from annotation.schema import GOLD_ANSWER
from pipeline import schema


POOL_PHOTOS = [
    "astronaut", "coffee", "chelsea", "rocket", "camera", "moon",
    "coins", "hubble_deep_field", "immunohistochemistry", "colorwheel", "page", "text",
]
GOLD_PHOTOS = {"brick": "reject", "grass": "keep"}


@pytest.fixture
def dev_mode(monkeypatch):
    """NEEDLES_DEV=1 for one test: scripted annotators may join the test server's organisation."""
    monkeypatch.setenv(DEV_MODE_VAR, "1")


@pytest.fixture
def no_dev_mode(monkeypatch):
    """As on a real server: no dev mode and no Label Studio token in the environment."""
    for name in (DEV_MODE_VAR, "LABEL_STUDIO_API_KEY", "LABEL_STUDIO_USER_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def _photo(name: str) -> bytes:
    array = getattr(skimage.data, name)()
    image = Image.fromarray(array)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _thumbnail(data: bytes) -> bytes:
    image = Image.open(io.BytesIO(data))
    image.thumbnail((schema.THUMBNAIL_SIZE, schema.THUMBNAIL_SIZE))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def photo_rows(names: list[str]) -> list[dict]:
    rows = []
    for i, name in enumerate(names):
        data = _photo(name)
        width, height = Image.open(io.BytesIO(data)).size
        rows.append(
            {
                schema.ID: hashlib.sha256(data).hexdigest(),
                schema.IMAGE: data,
                schema.IMAGE_PATH: None,
                schema.CAPTION: f"a photo: {name.replace('_', ' ')}",
                schema.WIDTH: width,
                schema.HEIGHT: height,
                schema.FORMAT: "JPEG",
                schema.THUMBNAIL: _thumbnail(data),
                schema.SOURCE: "skimage.data",
                schema.SOURCE_KEY: name,
                schema.ENGAGEMENT: None,
                schema.META: None,
                # a fixed, distinct automatic score per photo: the rank tie-break
                schema.AESTHETIC_SCORE: 4.0 + 0.25 * i,
            }
        )
    return rows


def pool_schema() -> pa.Schema:
    return schema.INGEST_SCHEMA.append(pa.field(schema.AESTHETIC_SCORE, pa.float64()))


@pytest.fixture(scope="session")
def photo_pool(tmp_path_factory) -> Path:
    """A pool of 12 real photos, one shard, as pipeline/ writes it (ingest columns + aesthetic_score)."""
    folder = tmp_path_factory.mktemp("pool") / "pool"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(photo_rows(POOL_PHOTOS), schema=pool_schema()), folder / "shard-00000.parquet")
    return folder


@pytest.fixture(scope="session")
def gold_table(tmp_path_factory) -> Path:
    """Two gold photos with their known generalist answer."""
    rows = photo_rows(list(GOLD_PHOTOS))
    for row in rows:
        row[GOLD_ANSWER] = GOLD_PHOTOS[row[schema.SOURCE_KEY]]
    path = tmp_path_factory.mktemp("gold") / "gold.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=pool_schema().append(pa.field(GOLD_ANSWER, pa.string()))), path)
    return path


def ids_of(path: Path) -> list[str]:
    return pq.read_table(path, columns=[schema.ID])[schema.ID].to_pylist()


CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))


def need_chromium() -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: apt-get install -y chromium")


@contextmanager
def admin_page(labelstudio):
    """A headless Chromium page (Debian's, driven by playwright; no browser download) logged in to the
    session's Label Studio as its admin, the way a person logs in."""
    from playwright.sync_api import sync_playwright

    need_chromium()
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"],
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{labelstudio.url}/user/login/")
            page.fill("input[name=email]", labelstudio.env["LABEL_STUDIO_USERNAME"])
            page.fill("input[name=password]", labelstudio.env["LABEL_STUDIO_PASSWORD"])
            page.click("button[type=submit]")
            page.wait_for_url(lambda url: "/user/login" not in url, timeout=60_000)
            yield page
        finally:
            browser.close()
