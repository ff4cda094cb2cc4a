"""A person's view: headless Chromium (Debian's, driven by playwright; no browser download) logs in
and opens one task of each round; the photo must actually render (natural width > 0)."""

from __future__ import annotations

import pytest

from annotation.client import LabelStudioClient
from annotation.curation import push_round, round_projects
from annotation.rounds import get_round

from .conftest import admin_page, need_chromium

@pytest.mark.parametrize("round_name", ["generalist", "specialist"])
def test_task_renders_in_the_browser(labelstudio, photo_pool, tmp_path, round_name):
    need_chromium()
    settings = labelstudio.settings()
    round_ = get_round(round_name)
    push_round(photo_pool, round_, "browser", tmp_path, settings)
    client = LabelStudioClient(settings)
    project_id = next(iter(round_projects(client, "browser", round_).values()))
    task_id = min(client.pool_ids(project_id).values())

    with admin_page(labelstudio) as page:
        page.goto(f"{labelstudio.url}/projects/{project_id}/data?task={task_id}")
        width = page.wait_for_function(
            """() => {
                // the labeling editor's photo (a blob of /data/local-files/), not the data manager's thumbnails
                const img = [...document.querySelectorAll('.lsf-main-view__annotation .lsf-image img')].find(
                    i => i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 0);
                return img ? img.naturalWidth : 0;
            }""",
            timeout=90_000,
        ).json_value()
        shot = tmp_path / f"{round_name}-task.png"
        page.screenshot(path=str(shot), full_page=True)
    assert width > 0
    assert shot.stat().st_size > 10_000
