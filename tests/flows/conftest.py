"""A real Prefect server (127.0.0.1, SQLite, fresh PREFECT_HOME) and the process serving the
deployments, started once per session and stopped by PID; the flows talk to the session's Label Studio."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from flows.stack import Service, prefect_env, prefect_server, serve_process, wait_for_deployments
from tests.conftest import ADMIN_TOKEN, SHARED, free_port
from tests.model.conftest import MOBILENET


@dataclass
class Stack:
    env: dict[str, str]  # what a process needs to reach this Prefect and this Label Studio
    api: str
    workdir: Path  # the serve process's working directory: relative paths in parameters land here
    server: Service  # the Prefect server process, for tests that restart it

    def prefect(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        """The real `prefect` CLI against this server."""
        return subprocess.run(
            [str(Path(sys.executable).parent / "prefect"), *args],
            env={**os.environ, **self.env}, cwd=self.workdir, capture_output=True, text=True, timeout=timeout,
        )

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.api, timeout=30)


@pytest.fixture(scope="session")
def labelstudio_for_flows(labelstudio):
    """What a flow process needs to reach the session's Label Studio (tests/conftest.py)."""
    return {
        "LABEL_STUDIO_URL": labelstudio.url,
        "LABEL_STUDIO_API_KEY": ADMIN_TOKEN,
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(labelstudio.document_root),
    }


def _staged_weights(state: Path) -> dict[str, str]:
    """The evaluation's ImageNet MobileNetV2 (KID) from ../shared, staged where torchvision looks, as `make
    weights` would; nothing downloads (NEEDLES_OFFLINE). Without ../shared the judges skip KID, saying so."""
    env = {"NEEDLES_OFFLINE": "1"}
    source = SHARED / MOBILENET
    if source.is_file():
        checkpoints = state / "torch" / "hub" / "checkpoints"
        checkpoints.mkdir(parents=True, exist_ok=True)
        (checkpoints / source.name).symlink_to(source)
        env["TORCH_HOME"] = str(state / "torch")
    return env


@pytest.fixture(scope="session")
def prefect_stack(tmp_path_factory, labelstudio_for_flows):
    state = tmp_path_factory.mktemp("prefect-stack")
    workdir = tmp_path_factory.mktemp("flows-workdir")
    port = free_port()
    env = {**prefect_env(port, home=state / "home"), **labelstudio_for_flows, **_staged_weights(state)}
    server = prefect_server(port, state_dir=state)
    server.start(env)
    # The serve process runs from its own working directory, as a user's would from their checkout.
    serve = serve_process(state_dir=state, cwd=workdir)
    serve.start(env)
    stack = Stack(env=env, api=env["PREFECT_API_URL"], workdir=workdir, server=server)
    wait_for_deployments(stack.api, ["curate/quality-set", "train-qt/train-qt", "evaluate/ab-test"], timeout_s=180)
    yield stack
    serve.stop()
    server.stop()
