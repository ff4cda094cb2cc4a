"""The relay between Label Studio and Prefect: every ``poll_s`` seconds it looks at the suspended runs of
the flows that wait on people (``curate``: the curation rounds; ``evaluate``: the A/B rounds), asks Label
Studio whether the round each one waits on is complete, and resumes those through Prefect's REST API
(retrying on 503, which Prefect's SQLite answers while "database is locked").

Which round a run waits on is written by the flow itself in a ``waiting.json`` beside the round's files:
RUN/annotation/<round>/waiting.json (curation, ``"kind": "curation"``) or
RUN/ab/<candidate>-vs-<baseline>/<criterion>/waiting.json (evaluation, ``"kind": "ab"``).

Each suspended run is checked on its own: one that cannot be checked (its run_dir gone, its waiting.json
unreadable, its Label Studio projects deleted) is logged with its id and the reason, and the others are
still resumed.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from pathlib import Path

import httpx

from flows.params import output_dir
from flows.waiting import WAITING_FILE

log = logging.getLogger("flows.relay")


class RelayError(Exception):
    """A suspended run the relay cannot check (the reason names what is missing)."""


def api_url() -> str:
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        raise RuntimeError("PREFECT_API_URL is not set: the relay needs the Prefect server's API address")
    return url.rstrip("/")


def api_client() -> httpx.Client:
    """An HTTP client for the Prefect API at PREFECT_API_URL, sending PREFECT_API_AUTH_STRING (``user:password``)
    as Basic auth when it is set, as Prefect's own client does (the compose server requires it)."""
    headers = {}
    if auth := os.environ.get("PREFECT_API_AUTH_STRING"):
        headers["Authorization"] = f"Basic {base64.b64encode(auth.encode()).decode()}"
    return httpx.Client(base_url=api_url(), timeout=30, headers=headers)


#: the flows whose runs suspend while people annotate
WAITING_FLOWS = ["curate", "evaluate", "preference"]


def waiting_files(run_dir: Path) -> list[Path]:
    """Every waiting.json under a run_dir: a curate run's rounds (RUN/annotation/<round>/), an evaluate
    run's A/B rounds (RUN/ab/<comparison>/<criterion>/) or a preference run's round (RUN/round/)."""
    from flows.preference import round_dir
    from model.evaluation.layout import EvalLayout
    from pipeline.layout import RunLayout

    return [*RunLayout(run_dir).annotation.glob(f"*/{WAITING_FILE}"),
            *EvalLayout(run_dir).ab.glob(f"*/*/{WAITING_FILE}"),
            *round_dir(run_dir).glob(WAITING_FILE)]


def suspended_runs(http: httpx.Client) -> list[dict]:
    body = {
        "flows": {"name": {"any_": WAITING_FLOWS}},
        "flow_runs": {"state": {"type": {"any_": ["PAUSED"]}}},
        "limit": 200,
    }
    response = _with_retry(lambda: http.post("/flow_runs/filter", json=body))
    return response.json()


def _with_retry(call, attempts: int = 10, delay_s: float = 1.0) -> httpx.Response:
    """``call()`` again on a 503 (SQLite busy) or a dropped connection (a keep-alive connection the server
    closed as the request went out: "Connection reset by peer"); the last attempt's error is raised."""
    for attempt in range(attempts):
        try:
            response = call()
        except httpx.TransportError as exc:
            if attempt == attempts - 1:
                raise
            log.info("Prefect request failed (%s: %s); retry %d/%d", type(exc).__name__, exc, attempt + 1, attempts)
        else:
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
    """What the run waits on, from its waiting.json; None when it has none (it is not waiting on a round).
    A run_dir that is gone or outside the data root raises ``RelayError``; an unreadable waiting.json is
    skipped with a warning (the flow writes it whole, by rename, so that is a hand edit or a disk fault)."""
    run_dir = (run.get("parameters") or {}).get("run_dir")
    if not run_dir:
        return None
    try:
        root = output_dir(run_dir)  # resolved as the flow resolved it
    except ValueError as exc:
        raise RelayError(str(exc)) from None
    if not root.is_dir():
        raise RelayError(f"its run_dir {root} does not exist")
    records = []
    for waiting in waiting_files(root):
        try:
            info = json.loads(waiting.read_text())
            if not isinstance(info, dict) or not {"round", "campaign"} <= set(info):
                raise ValueError("not a waiting record (needs round and campaign)")
            records.append((waiting.stat().st_mtime, info))
        except (OSError, ValueError) as exc:
            log.warning("run %s: skipped %s: %s", run["id"], waiting, exc)
    # The flow removes a round's record once it has pulled it; newest first in case one was left.
    for _, info in sorted(records, key=lambda r: -r[0]):
        if info.get("flow_run_id") == run["id"]:
            return info
    return None


def round_complete(info: dict) -> tuple[bool, int]:
    from annotation.client import LabelStudioSettings

    settings = LabelStudioSettings.from_env()
    if info.get("kind") == "ab":
        from annotation.abtest import ab_status, get_criterion

        status = ab_status(get_criterion(info["round"], votes_per_pair=info.get("votes")), info["campaign"], settings)
    elif info.get("kind") == "preference":
        from annotation.preference import PreferenceRound, preference_status

        round_ = PreferenceRound(candidates=info["candidates"], votes_per_task=info["votes"])
        status = preference_status(info["campaign"], settings, round_)
    else:
        from annotation.curation import round_status
        from annotation.rounds import get_round

        status = round_status(get_round(info["round"], target_size=info["target"]), info["campaign"], settings,
                              per_annotator=False)
    return status.complete, status.remaining


def check_once(http: httpx.Client) -> list[str]:
    """Resume every suspended run whose round is complete; returns their ids. A run that cannot be checked
    is logged (id, name, reason) and left suspended; the others are checked all the same."""
    resumed = []
    for run in suspended_runs(http):
        try:
            info = waiting_round(run)
            if info is None:
                continue
            complete, remaining = round_complete(info)
            if not complete:
                log.info("run %s waits on the %s round: %d tasks remain", run["id"], info["round"], remaining)
                continue
            status = resume(http, run["id"])
        except Exception as exc:  # this run's problem: log it, go on with the others
            log.error("run %s (%s): cannot check or resume it: %s: %s", run["id"], run.get("name"),
                      type(exc).__name__, exc)
            continue
        log.info("run %s: %s round complete, resume -> %s", run["id"], info["round"], status)
        resumed.append(run["id"])
    return resumed


def run_forever(poll_s: float = 15.0) -> None:
    with api_client() as http:
        while True:
            try:
                check_once(http)
            except Exception as exc:  # a server restarting must not end the relay: try again next poll
                log.warning("relay check failed (%s); retrying in %.0f s", exc, poll_s)
            time.sleep(poll_s)
