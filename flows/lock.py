"""One flow run per run directory. Two runs writing one run_dir overwrite each other's files (the second's
waiting.json once left the first suspended for ever), so a flow takes ``RUN/flow-run.lock`` when it starts
and gives it back when it ends:

- the lock file holds the holder's flow run id (JSON, written to a temporary name and renamed);
- a second run on the same run_dir fails at once, naming the holder and its state;
- a suspended run keeps its lock (it re-executes with the same id when the relay resumes it);
- a lock whose holder is finished, crashed, cancelled or unknown to Prefect is stale and is taken over.

The check-and-take is done under ``flock`` on a guard file beside the lock, so two runs starting at the
same moment cannot both take it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from pipeline.errors import UserError

log = logging.getLogger("flows.lock")

LOCK_FILE = "flow-run.lock"
GUARD_FILE = ".flow-run.lock.guard"  # dot-named: input fingerprints (flows/caching.py) skip it


class RunDirLocked(UserError):
    """Another live flow run holds this run directory."""


def lock_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / LOCK_FILE


def holder(run_dir: str | Path) -> dict | None:
    """The lock's record (flow_run_id, flow, run_name, taken_at), or None when there is none; a lock file
    that is not such a record (edited by hand, a disk full) reads as ``{"flow_run_id": None}``."""
    try:
        record = json.loads(lock_path(run_dir).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"flow_run_id": None}
    return record if isinstance(record, dict) else {"flow_run_id": None}


def prefect_state(flow_run_id: str):
    """The flow run's state according to the Prefect API, or None when the API does not know the run."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        run_id = uuid.UUID(str(flow_run_id))
    except ValueError:
        return None
    with get_client(sync_client=True) as client:
        try:
            return client.read_flow_run(run_id).state
        except ObjectNotFound:
            return None


@contextlib.contextmanager
def _guard(run_dir: Path) -> Iterator[None]:
    with open(run_dir / GUARD_FILE, "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)


def acquire(run_dir: str | Path, flow_run_id: str, flow: str = "", run_name: str = "",
            state_of: Callable[[str], object] = prefect_state) -> None:
    """Take ``run_dir`` for ``flow_run_id`` (again, if it holds it already), or raise ``RunDirLocked``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with _guard(run_dir):
        current = holder(run_dir)
        if current is not None and current.get("flow_run_id") != str(flow_run_id):
            other = current.get("flow_run_id")
            state = state_of(other) if other else None
            if state is not None and not state.is_final():
                raise RunDirLocked(
                    f"run_dir {run_dir} is in use by flow run {current.get('run_name') or '?'} ({other}, "
                    f"{current.get('flow') or 'flow'}, {state.name}): one run per run_dir; choose another run_dir, "
                    f"or wait for that run to end (or cancel it)")
            why = f"its run is {state.name}" if state is not None else "its run is unknown to Prefect"
            log.warning("run_dir %s: taking over the lock of flow run %s (%s)", run_dir, other or "(unreadable)", why)
        record = {"flow_run_id": str(flow_run_id), "flow": flow, "run_name": run_name,
                  "taken_at": datetime.now(UTC).isoformat(timespec="seconds")}
        tmp = run_dir / f".{LOCK_FILE}.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, lock_path(run_dir))


def release(run_dir: str | Path, flow_run_id: str) -> None:
    """Give ``run_dir`` back, if ``flow_run_id`` holds it."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    with _guard(run_dir):
        current = holder(run_dir)
        if current is not None and current.get("flow_run_id") == str(flow_run_id):
            lock_path(run_dir).unlink(missing_ok=True)


@contextlib.contextmanager
def run_dir_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold ``run_dir`` for the current flow run while the block runs; kept when the run suspends (Prefect's
    ``Pause``), given back when it ends in any other way."""
    from prefect.context import get_run_context
    from prefect.exceptions import Pause

    ctx = get_run_context()
    run_id = str(ctx.flow_run.id)
    acquire(run_dir, run_id, flow=ctx.flow.name if ctx.flow else "", run_name=ctx.flow_run.name)
    try:
        yield
    except Pause:
        raise
    except BaseException:
        release(run_dir, run_id)
        raise
    release(run_dir, run_id)
