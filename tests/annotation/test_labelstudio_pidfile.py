"""annotation/labelstudio/stop.sh and start.sh trust their PID file only while it names the very process
start.sh started (PID and start time): a PID reused by another process is never signalled nor taken for a
running Label Studio. Real processes, no Label Studio needed (the running-server case is covered by every
test that uses the session's server: tests/conftest.py starts and stops it with these scripts)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "annotation" / "labelstudio"


def _bystander():
    """An unrelated long-lived process: what a recycled PID would name."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def _start_time(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[19]


def _stop(state: Path) -> subprocess.CompletedProcess:
    return subprocess.run([SCRIPTS / "stop.sh"], env={**os.environ, "LABEL_STUDIO_STATE_DIR": str(state)},
                          capture_output=True, text=True, timeout=60)


def test_stop_never_signals_a_process_that_reuses_the_pid(tmp_path):
    bystander = _bystander()
    try:
        for record in (f"{bystander.pid} 1", f"{bystander.pid}"):  # another start time; an old one-number file
            pidfile = tmp_path / "labelstudio.pid"
            pidfile.write_text(record + "\n")
            done = _stop(tmp_path)
            assert done.returncode == 0, done.stderr
            assert "is now another process" in done.stderr and "signalled nothing" in done.stderr
            assert bystander.poll() is None, "stop.sh killed a process that was not Label Studio"
            assert not pidfile.exists()  # the stale file is gone
    finally:
        bystander.kill()
        bystander.wait()


def test_stop_signals_the_recorded_process(tmp_path):
    # the same process and start time as recorded: stop.sh stops it (what it does to Label Studio)
    target = _bystander()
    try:
        (tmp_path / "labelstudio.pid").write_text(f"{target.pid} {_start_time(target.pid)}\n")
        done = _stop(tmp_path)
        assert done.returncode == 0, done.stderr
        assert f"stopped Label Studio (pid {target.pid})" in done.stdout
        assert target.wait(timeout=20) is not None
    finally:
        target.kill()


def test_start_does_not_take_a_recycled_pid_for_a_running_server(tmp_path):
    """start.sh's "already running" answer must come from the recorded process: with a stale file it goes on
    to start. The venv here holds a stand-in `label-studio` that exits at once, so start.sh reports that."""
    import socket

    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").symlink_to(sys.executable)
    (venv / "label-studio").write_text("#!/bin/sh\necho stand-in label-studio exits >&2\nexit 3\n")
    (venv / "label-studio").chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    state = tmp_path / "state"
    state.mkdir()
    bystander = _bystander()
    try:
        (state / "labelstudio.pid").write_text(f"{bystander.pid} 1\n")
        env = {**os.environ, "LABEL_STUDIO_STATE_DIR": str(state), "LABEL_STUDIO_VENV": str(tmp_path / "venv"),
               "LABEL_STUDIO_PORT": str(port), "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path / "files")}
        done = subprocess.run([SCRIPTS / "start.sh"], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 1
        assert "already running" not in done.stderr, done.stderr
        assert "stale Label Studio PID file" in done.stderr, done.stderr
        assert "Label Studio exited during start" in done.stderr and "stand-in label-studio exits" in done.stderr
        assert bystander.poll() is None
        assert not (state / "labelstudio.pid").exists()
    finally:
        bystander.kill()
        bystander.wait()
