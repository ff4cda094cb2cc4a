"""A person's view of the A/B rounds: headless Chromium (Debian's, driven by playwright; no browser download)
logs in and opens one task of each criterion; both images must render side by side (natural width > 0,
left of each other on screen), and the prompt must show exactly where the criterion shows it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq

from annotation import schema as S
from annotation.abtest import ab_projects, build_pairs, get_criterion, push_ab
from annotation.client import LabelStudioClient

from .conftest import admin_page, need_chromium
from .test_abtest import write_manifest

#: the appeal task's screenshot, kept where a person can look at it after the run
APPEAL_SHOT = Path("/tmp/ab-appeal-task.png")


def test_ab_tasks_render_in_the_browser(labelstudio, tmp_path):
    need_chromium()
    settings = labelstudio.settings()
    client = LabelStudioClient(settings)
    generate = write_manifest(tmp_path / "generate")
    opened = {}
    for name in ("appeal", "faithfulness", "flaws"):
        criterion = get_criterion(name)
        pairs = pq.read_table(build_pairs(generate, "tuned", "base", criterion, tmp_path / "ab")).to_pylist()
        push_ab(criterion, "browser", tmp_path / "ab", settings)
        project_id = next(iter(ab_projects(client, "browser", criterion).values()))
        # a comparison pair: what annotators see most (a gold pair shows one image damaged)
        shown = next(p[S.PAIR_ID] for p in pairs if p[S.KIND] == "comparison" and p[S.PROMPT_ID] == "p-chelsea")
        opened[name] = (project_id, client.pool_ids(project_id)[shown])

    with admin_page(labelstudio) as page:
        for name, (project_id, task_id) in opened.items():
            page.goto(f"{labelstudio.url}/projects/{project_id}/data?task={task_id}")
            # The task's images in the labeling editor (Label Studio fetches /data/local-files/ and shows a
            # blob; the data manager's thumbnails beside it are not what the annotator judges), loaded and
            # laid out: [[naturalWidth, left, top, width, height on screen], ...]
            images = page.wait_for_function(
                """() => {
                    const shown = [...document.querySelectorAll('.lsf-main-view__annotation .lsf-image img')]
                        .filter(i => i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 0);
                    return shown.length >= 2 ? shown.map(i => {
                        const box = i.getBoundingClientRect();
                        return [i.naturalWidth, box.left, box.top, box.width, box.height];
                    }) : null;
                }""",
                timeout=90_000,
            ).json_value()
            assert len(images) == 2 and all(image[0] == 128 for image in images), (name, images)
            (_, left_x, left_y, left_w, left_h), (_, right_x, right_y, _, right_h) = images
            # side by side: the second to the right of the first, on the same row (their heights overlap; the
            # two columns' captions may wrap differently, so their tops can differ by a line)
            overlap = min(left_y + left_h, right_y + right_h) - max(left_y, right_y)
            assert right_x >= left_x + left_w and overlap > 0.5 * min(left_h, right_h), f"{name}: not side by side: {images}"
            choices = ("A", "B", "Both", "Neither") if name == "faithfulness" else ("Left", "Tie", "Right")
            # the choice buttons may render after the images (this once failed the suite): wait for them
            page.wait_for_function("choices => choices.every(c => document.body.innerText.includes(c))",
                                   arg=list(choices), timeout=30_000)
            text = page.inner_text("body")
            assert ("a photo of the" in text) == (name == "faithfulness"), f"{name}: prompt shown wrongly"
            assert all(choice in text for choice in choices)
            shot = tmp_path / f"ab-{name}-task.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if name == "appeal":
                shutil.copyfile(shot, APPEAL_SHOT)
