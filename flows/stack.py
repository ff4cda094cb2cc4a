"""The local stack for a newcomer: a Prefect server (127.0.0.1, SQLite), the process serving the
deployments, the relay that resumes suspended runs, and Label Studio. ``make up`` / ``make down``.

Every process is started in its own session with a PID file under ``.run/`` and stopped by that PID
(never by name), so tests and the Makefile can start and stop exactly what they started. The PID file also
records the process's start time (and the command): a PID reused by another process (after a reboot, say)
does not match it, and its file is removed as stale without signalling anything.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

log = logging.getLogger("flows.stack")

ROOT = Path(__file__).resolve().parents[1]
STATE = Path(os.environ.get("NEEDLES_STATE_DIR", ROOT / ".run"))
PREFECT_PORT = int(os.environ.get("PREFECT_PORT", "4200"))


class StackError(Exception):
    pass


def prefect_env(port: int = PREFECT_PORT, home: Path | None = None) -> dict[str, str]:
    """The environment every process of the stack shares to reach the same Prefect server."""
    home = home or STATE / "prefect"
    return {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        # Results are persisted so a resumed (re-executed) flow run finds its finished tasks' results.
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_LOCAL_STORAGE_PATH": str(home / "storage"),
        "PREFECT_LOGGING_LEVEL": os.environ.get("PREFECT_LOGGING_LEVEL", "INFO"),
        # the local stack is the development stack: it may use the simulated annotators and Label Studio's
        # development token (annotation/client.py: DEV_MODE_VAR); the compose stack never sets this
        "NEEDLES_DEV": "1",
    }


@dataclass
class Service:
    name: str
    argv: list[str]
    health_url: str | None = None
    start_timeout_s: float = 120.0
    state_dir: Path = STATE
    cwd: Path = ROOT  # the serve process's ./data is the flows' data root unless NEEDLES_DATA_DIR is set

    @property
    def pidfile(self) -> Path:
        return self.state_dir / f"{self.name}.pid"

    @property
    def log(self) -> Path:
        return self.state_dir / f"{self.name}.log"

    def pid(self) -> int | None:
        """The PID of the live process this service started, or None. A PID file naming a process that is
        not the one it recorded (another start time or command line: the PID was reused) is removed."""
        try:
            text = self.pidfile.read_text()
        except FileNotFoundError:
            return None
        record = _parse_pidfile(text)
        if record is None:
            log.warning("%s: removed the unreadable PID file %s", self.name, self.pidfile)
            self.pidfile.unlink(missing_ok=True)
            return None
        try:
            process = psutil.Process(record["pid"])
            if process.status() == psutil.STATUS_ZOMBIE:
                return None
            mismatch = self._mismatch(process, record)
        except psutil.NoSuchProcess:
            return None
        except psutil.AccessDenied:
            mismatch = "it belongs to another user"
        if mismatch:
            log.warning("%s: stale PID file %s: process %d is not the one it recorded (%s); removed the file, "
                        "signalled nothing", self.name, self.pidfile, record["pid"], mismatch)
            self.pidfile.unlink(missing_ok=True)
            return None
        return record["pid"]

    def _mismatch(self, process: psutil.Process, record: dict) -> str | None:
        """Why ``process`` is not the one the PID file recorded, or None when it is."""
        if "create_time" in record:
            if abs(process.create_time() - record["create_time"]) > 0.5:
                return (f"{' '.join(process.cmdline())!r} started at {process.create_time():.0f}, the recorded "
                        f"process at {record['create_time']:.0f}")
            return None
        # a PID file of an older version holds only the PID: trust it only if the command line matches
        tail = self.argv[1:]
        if process.cmdline()[len(process.cmdline()) - len(tail):] != tail:
            return f"its command line is {' '.join(process.cmdline())!r}, not {' '.join(self.argv)!r}"
        return None

    def start(self, env: dict[str, str]) -> int:
        if (pid := self.pid()) is not None:
            return pid
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            proc = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env={**os.environ, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stop() ends its children too
            )
        self._write_pidfile(proc.pid)
        if self.health_url:
            self._wait_healthy(proc)
        return proc.pid

    def _write_pidfile(self, pid: int) -> None:
        try:
            process = psutil.Process(pid)
            # the start time identifies the process (a PID is reused, never with the same start time)
            record = {"pid": pid, "create_time": process.create_time(), "argv": self.argv}
        except psutil.NoSuchProcess:  # exited at once: _wait_healthy reports it
            record = {"pid": pid}
        tmp = self.pidfile.with_name(f".{self.pidfile.name}.tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(self.pidfile)

    def _wait_healthy(self, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.pidfile.unlink(missing_ok=True)
                tail = self.log.read_text(errors="replace")[-2000:]
                raise StackError(f"{self.name} exited during start (code {proc.returncode}); log tail:\n{tail}")
            try:
                with urllib.request.urlopen(self.health_url, timeout=2):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        self.stop()
        raise StackError(f"{self.name} did not answer {self.health_url} within {self.start_timeout_s:.0f} s; see {self.log}")

    def stop(self, timeout_s: float = 20.0) -> None:
        pid = self.pid()
        if pid is None:
            self.pidfile.unlink(missing_ok=True)
            return
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.pid() is not None:
            time.sleep(0.2)
            _reap(pid)
        if self.pid() is not None:
            os.killpg(pid, signal.SIGKILL)
            _reap(pid)
        self.pidfile.unlink(missing_ok=True)


def _parse_pidfile(text: str) -> dict | None:
    """``{"pid", "create_time", "argv"}`` (or ``{"pid"}`` from an older plain-number file), None if neither."""
    try:
        record = json.loads(text)
    except ValueError:
        return None
    if isinstance(record, int):
        return {"pid": record}
    if isinstance(record, dict) and isinstance(record.get("pid"), int):
        return record
    return None


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def prefect_server(port: int = PREFECT_PORT, state_dir: Path = STATE) -> Service:
    return Service(
        "prefect-server",
        [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
         "--analytics-off"],
        health_url=f"http://127.0.0.1:{port}/api/health",
        state_dir=state_dir,
    )


def serve_process(state_dir: Path = STATE, cwd: Path = ROOT) -> Service:
    return Service("prefect-serve", [sys.executable, "-m", "flows", "serve"], state_dir=state_dir, cwd=cwd)


def relay_process(state_dir: Path = STATE) -> Service:
    return Service("round-relay", [sys.executable, "-m", "flows", "relay"], state_dir=state_dir)


def labelstudio(action: str) -> None:
    script = ROOT / "annotation" / "labelstudio" / f"{action}.sh"
    subprocess.run([str(script)], check=True, cwd=ROOT)


def wait_for_deployments(api_url: str, names: list[str], timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    for name in names:
        while True:
            try:
                with urllib.request.urlopen(f"{api_url}/deployments/name/{name}", timeout=5):
                    break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise StackError(f"deployment {name} was not served within {timeout_s:.0f} s; see {serve_process().log}")
                time.sleep(1)


def up(with_labelstudio: bool = True) -> None:
    env = prefect_env()
    prefect_server().start(env)
    serve_process().start(env)
    relay_process().start(env)
    wait_for_deployments(env["PREFECT_API_URL"], ["curate/quality-set", "train-qt/train-qt", "evaluate/ab-test"])
    if with_labelstudio:
        labelstudio("install")
        labelstudio("start")  # returns at once when it runs already
    print(f"Prefect UI: http://127.0.0.1:{PREFECT_PORT}   (export PREFECT_API_URL={env['PREFECT_API_URL']})")
    print(f"Label Studio: http://127.0.0.1:{os.environ.get('LABEL_STUDIO_PORT', '8080')}")


def down(with_labelstudio: bool = True) -> None:
    """Stop every process of the stack; one that cannot be stopped does not keep the others running."""
    failed = []
    for service in (relay_process(), serve_process(), prefect_server()):
        try:
            service.stop()
        except (OSError, StackError) as exc:
            log.error("%s: could not stop it: %s", service.name, exc)
            failed.append(service.name)
    if with_labelstudio:
        labelstudio("stop")
    if failed:
        raise StackError(f"could not stop {', '.join(failed)} (see above); the others are stopped")
