"""A person's view: headless Chromium (Debian's, driven by playwright; no browser download) logs in
and opens one task of each round; the photo must actually render (natural width > 0)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from annotation.client import LabelStudioClient
from annotation.curation import push_round, round_projects
from annotation.rounds import get_round

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))


@pytest.mark.parametrize("round_name", ["generalist", "specialist"])
def test_task_renders_in_the_browser(labelstudio, photo_pool, tmp_path, round_name):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    settings = labelstudio.settings()
    round_ = get_round(round_name)
    push_round(photo_pool, round_, "browser", tmp_path, settings)
    client = LabelStudioClient(settings)
    project_id = next(iter(round_projects(client, "browser", round_).values()))
    task_id = min(client.pool_ids(project_id).values())

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{labelstudio.url}/user/login/")
        page.fill("input[name=email]", labelstudio.env["LABEL_STUDIO_USERNAME"])
        page.fill("input[name=password]", labelstudio.env["LABEL_STUDIO_PASSWORD"])
        page.click("button[type=submit]")
        page.wait_for_url(lambda url: "/user/login" not in url, timeout=60_000)
        page.goto(f"{labelstudio.url}/projects/{project_id}/data?task={task_id}")
        width = page.wait_for_function(
            """() => {
                const img = [...document.querySelectorAll('img')].find(
                    i => i.src.includes('/data/local-files/') && i.complete && i.naturalWidth > 0
                    && i.getBoundingClientRect().width > 0);
                return img ? img.naturalWidth : 0;
            }""",
            timeout=90_000,
        ).json_value()
        shot = tmp_path / f"{round_name}-task.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert width > 0
    assert shot.stat().st_size > 10_000
