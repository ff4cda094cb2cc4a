"""The relay between Label Studio and Prefect: every ``poll_s`` seconds it looks at the suspended runs of
the flows that wait on people (``curate``: the curation rounds; ``evaluate``: the A/B rounds), asks Label
Studio whether the round each one waits on is complete, and resumes those through Prefect's REST API
(retrying on 503, which Prefect's SQLite answers while "database is locked").

Which round a run waits on is written by the flow itself in a ``waiting.json`` beside the round's files:
RUN/annotation/<round>/waiting.json (curation, ``"kind": "curation"``) or
RUN/ab/<candidate>-vs-<baseline>/<criterion>/waiting.json (evaluation, ``"kind": "ab"``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import httpx

log = logging.getLogger("flows.relay")


def api_url() -> str:
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        raise RuntimeError("PREFECT_API_URL is not set: the relay needs the Prefect server's API address")
    return url.rstrip("/")


#: flows whose runs suspend while people annotate, and where under their run_dir they say what they wait on
WAITING_GLOBS = {"curate": "annotation/*/waiting.json", "evaluate": "ab/*/*/waiting.json"}


def suspended_runs(http: httpx.Client) -> list[dict]:
    body = {
        "flows": {"name": {"any_": sorted(WAITING_GLOBS)}},
        "flow_runs": {"state": {"type": {"any_": ["PAUSED"]}}},
        "limit": 200,
    }
    response = _with_retry(lambda: http.post("/flow_runs/filter", json=body))
    return response.json()


def _with_retry(call, attempts: int = 10, delay_s: float = 1.0) -> httpx.Response:
    for attempt in range(attempts):
        response = call()
        if response.status_code != 503:
            response.raise_for_status()
            return response
        log.info("Prefect answered 503 (SQLite busy); retry %d/%d", attempt + 1, attempts)
        time.sleep(delay_s * (attempt + 1))
    response.raise_for_status()
    return response


def resume(http: httpx.Client, flow_run_id: str) -> str:
    response = _with_retry(lambda: http.post(f"/flow_runs/{flow_run_id}/resume", json={}))
    return response.json().get("status", "")


def waiting_round(run: dict) -> dict | None:
    run_dir = (run.get("parameters") or {}).get("run_dir")
    if not run_dir:
        return None
    # The flow removes a round's record once it has pulled it; newest first in case one was left.
    files = [f for pattern in WAITING_GLOBS.values() for f in Path(run_dir).glob(pattern)]
    for waiting in sorted(files, key=lambda p: -p.stat().st_mtime):
        info = json.loads(waiting.read_text())
        if info.get("flow_run_id") == run["id"]:
            return info
    return None


def round_complete(info: dict) -> tuple[bool, int]:
    from annotation.client import LabelStudioSettings

    settings = LabelStudioSettings.from_env()
    if info.get("kind") == "ab":
        from annotation.abtest import ab_status, get_criterion

        status = ab_status(get_criterion(info["round"], votes_per_pair=info.get("votes")), info["campaign"], settings)
    else:
        from annotation.curation import round_status
        from annotation.rounds import get_round

        status = round_status(get_round(info["round"], target_size=info["target"]), info["campaign"], settings,
                              per_annotator=False)
    return status.complete, status.remaining


def check_once(http: httpx.Client) -> list[str]:
    """Resume every suspended run whose round is complete; returns their ids."""
    resumed = []
    for run in suspended_runs(http):
        info = waiting_round(run)
        if info is None:
            continue
        complete, remaining = round_complete(info)
        if not complete:
            log.info("run %s waits on the %s round: %d tasks remain", run["id"], info["round"], remaining)
            continue
        status = resume(http, run["id"])
        log.info("run %s: %s round complete, resume -> %s", run["id"], info["round"], status)
        resumed.append(run["id"])
    return resumed


def run_forever(poll_s: float = 15.0) -> None:
    with httpx.Client(base_url=api_url(), timeout=30) as http:
        while True:
            try:
                check_once(http)
            except Exception as exc:  # a server restarting must not end the relay: try again next poll
                log.warning("relay check failed (%s); retrying in %.0f s", exc, poll_s)
            time.sleep(poll_s)
