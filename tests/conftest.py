"""Session fixtures shared by every test area: ../shared, a local Ray, and one real Label Studio server
(fresh data dir, free port, stopped by PID) for the annotation and flows tests."""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from annotation.client import LabelStudioSettings

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SCRIPTS = ROOT / "annotation" / "labelstudio"
VENV = Path(os.environ.get("LABEL_STUDIO_VENV", ROOT / ".venv-labelstudio"))
ADMIN_TOKEN = "needles-test-token-5c1b0e7a9d"

# Ray workers inherit this environment: they must import the tests' own scorer classes too.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the checkout (real photos and weights); absent on a user's clone."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: tests that need the shared real data/weights are skipped")
    return SHARED


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray on this machine (2 CPUs), shut down afterwards so cluster tests can start their own."""
    import ray

    from pipeline.engine import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@dataclass
class Server:
    url: str
    env: dict[str, str]
    document_root: Path
    state_dir: Path

    def settings(self, **overrides) -> LabelStudioSettings:
        values = {"url": self.url, "api_key": ADMIN_TOKEN, "document_root": self.document_root}
        return LabelStudioSettings(**{**values, **overrides})

    def start(self) -> None:
        done = subprocess.run([SCRIPTS / "start.sh"], env=self.env, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, f"Label Studio did not start:\n{done.stdout}\n{done.stderr}"

    def stop(self) -> None:
        subprocess.run([SCRIPTS / "stop.sh"], env=self.env, check=True, capture_output=True, timeout=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def labelstudio(tmp_path_factory) -> Server:
    if not (VENV / "bin" / "label-studio").exists():
        pytest.skip(f"label-studio is not installed in {VENV}: run `make labelstudio-install`")
    state = tmp_path_factory.mktemp("labelstudio")
    port = free_port()
    env = {
        **os.environ,
        "LABEL_STUDIO_STATE_DIR": str(state),
        "LABEL_STUDIO_PORT": str(port),
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(state / "files"),
        "LABEL_STUDIO_USERNAME": "admin@needles.test",
        "LABEL_STUDIO_PASSWORD": "needles-test-password",
        "LABEL_STUDIO_USER_TOKEN": ADMIN_TOKEN,
    }
    server = Server(url=f"http://127.0.0.1:{port}", env=env, document_root=state / "files", state_dir=state)
    server.start()
    yield server
    server.stop()
