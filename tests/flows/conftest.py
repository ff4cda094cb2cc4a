"""A real Prefect server (127.0.0.1, SQLite, fresh PREFECT_HOME) and the process serving the
deployments, started once per session and stopped by PID; plus a real Label Studio for the flows."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from flows.stack import ROOT, prefect_env, prefect_server, serve_process

LS_SCRIPTS = ROOT / "annotation" / "labelstudio"
LS_VENV = Path(os.environ.get("LABEL_STUDIO_VENV", ROOT / ".venv-labelstudio"))
LS_TOKEN = "needles-flows-test-token-8e2f"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    env: dict[str, str]  # what a process needs to reach this Prefect and this Label Studio
    api: str
    workdir: Path  # the serve process's working directory: relative paths in parameters land here

    def prefect(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        """The real `prefect` CLI against this server."""
        return subprocess.run(
            [str(Path(sys.executable).parent / "prefect"), *args],
            env={**os.environ, **self.env}, cwd=self.workdir, capture_output=True, text=True, timeout=timeout,
        )

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.api, timeout=30)


@pytest.fixture(scope="session")
def labelstudio_for_flows(tmp_path_factory):
    if not (LS_VENV / "bin" / "label-studio").exists():
        pytest.skip(f"label-studio is not installed in {LS_VENV}: run `make labelstudio-install`")
    state = tmp_path_factory.mktemp("flows-labelstudio")
    port = free_port()
    env = {
        "LABEL_STUDIO_STATE_DIR": str(state),
        "LABEL_STUDIO_PORT": str(port),
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(state / "files"),
        "LABEL_STUDIO_USERNAME": "admin@needles.test",
        "LABEL_STUDIO_PASSWORD": "needles-flows-test-password",
        "LABEL_STUDIO_USER_TOKEN": LS_TOKEN,
    }
    done = subprocess.run([LS_SCRIPTS / "start.sh"], env={**os.environ, **env}, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, f"Label Studio did not start:\n{done.stdout}\n{done.stderr}"
    client_env = {
        "LABEL_STUDIO_URL": f"http://127.0.0.1:{port}",
        "LABEL_STUDIO_API_KEY": LS_TOKEN,
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(state / "files"),
    }
    yield client_env
    subprocess.run([LS_SCRIPTS / "stop.sh"], env={**os.environ, **env}, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def prefect_stack(tmp_path_factory, labelstudio_for_flows):
    state = tmp_path_factory.mktemp("prefect-stack")
    workdir = tmp_path_factory.mktemp("flows-workdir")
    port = free_port()
    env = {**prefect_env(port, home=state / "home"), **labelstudio_for_flows}
    server = prefect_server(port, state_dir=state)
    server.start(env)
    # The serve process runs from its own working directory, as a user's would from their checkout.
    serve = serve_process(state_dir=state, cwd=workdir)
    serve.start(env)
    stack = Stack(env=env, api=env["PREFECT_API_URL"], workdir=workdir)
    deadline = time.monotonic() + 120
    with stack.http() as http:
        while http.get("/deployments/name/curate/quality-set").status_code != 200:
            assert serve.pid() is not None, f"serve process died:\n{serve.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "deployments not registered within 120 s"
            time.sleep(1)
    yield stack
    serve.stop()
    server.stop()
