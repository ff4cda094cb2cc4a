"""Waiting for people without holding a worker: a flow run records which round it waits on (``waiting.json``
beside the round's files, read by flows/relay.py) and suspends; the relay resumes it when Label Studio says
the round is complete, and the run re-executes with its finished stages answered from Prefect's cache.

Where the record lies: ``ABLayout(work, criterion).waiting`` for an A/B round (annotation/layout.py),
``curation_waiting(work, round)`` = WORK/<round>/waiting.json for a curation round (RoundLayout has no
property for it yet), and RUN/round/waiting.json for a preference round (flows/preference.py: round_dir)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.context import get_run_context

WAITING_FILE = "waiting.json"


def curation_waiting(work: Path, round_name: str) -> Path:
    from annotation.layout import RoundLayout

    return RoundLayout(work, round_name).root / WAITING_FILE


def wait_for_people(waiting: Path, info: dict, tasks: int | None, remaining: int, timeout_s: int,
                    wait_here: Callable[[], object]) -> None:
    """Suspend the current flow run until the relay resumes it (``info`` says what it waits on: kind, round,
    campaign, ...). A run not started from a deployment cannot be re-executed after a suspension, so it
    waits in-process instead (``wait_here``: polling + webhook), holding this process."""
    ctx = get_run_context()
    waiting.parent.mkdir(parents=True, exist_ok=True)
    tmp = waiting.with_name(f".{waiting.name}.tmp")
    tmp.write_text(json.dumps({"flow_run_id": str(ctx.flow_run.id), **info}))
    tmp.replace(waiting)  # the relay never reads half a file
    name = info["round"]
    create_table_artifact(
        [{"round": name, "tasks": tasks, "remaining": remaining}],
        key=f"{name}-progress",
        description=f"{name} round open: waiting for annotators in Label Studio",
    )
    get_run_logger().info("%s round: %s tasks remain; suspending until the round completes", name, remaining)
    if ctx.flow_run.deployment_id is None:
        wait_here()
    else:
        from prefect.flow_runs import suspend_flow_run

        # a fresh key: a run resumed (e.g. by hand) while the round is still open suspends again
        suspend_flow_run(timeout=timeout_s, key=f"round-{name}-{uuid.uuid4().hex}")


def done_waiting(waiting: Path) -> None:
    """The round is pulled: the relay must not wake the run for it again."""
    waiting.unlink(missing_ok=True)
