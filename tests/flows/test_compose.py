"""docker-compose.yml is valid (Debian's docker-compose validates it; no Docker engine runs here) and
defines every service the flows need, with the ports and environment names the code reads."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (Debian package docker-compose; .ci/run installs it)")
    done = subprocess.run(["docker-compose", "--env-file", ".env.example", "config"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def _code_reads(name: str) -> bool:
    """The name appears as a string literal in the product's code (an os.environ key or a constant)."""
    quoted = re.compile(rf"""["']{name}["']""")
    return any(quoted.search(p.read_text()) for d in ("pipeline", "annotation", "flows", "model") for p in (ROOT / d).rglob("*.py"))


def test_every_service_the_flows_need_is_defined(compose):
    services = compose["services"]
    assert {"postgres", "prefect-server", "flows", "relay", "labelstudio", "ray-head", "ray-worker"} <= set(services)
    for name in ("postgres", "prefect-server", "labelstudio", "ray-head"):
        assert "healthcheck" in services[name], f"{name} has no healthcheck"


def test_environment_names_are_the_ones_the_code_reads(compose):
    flows_env = compose["services"]["flows"]["environment"]
    for name in ("PREFECT_API_URL", "RAY_ADDRESS", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY",
                 "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", "NEEDLES_WEIGHTS_DIR", "NEEDLES_OFFLINE"):
        assert name in flows_env, f"the flows service does not set {name}"
        if name not in ("PREFECT_API_URL", "RAY_ADDRESS"):  # these two are read by Prefect and Ray themselves
            assert _code_reads(name), f"no code reads {name}: the compose file and the code disagree"
    assert flows_env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert flows_env["LABEL_STUDIO_URL"] == "http://labelstudio:8080"
    assert flows_env["RAY_ADDRESS"].split(":")[0] == "ray-head"


def test_ports_match_the_local_stack(compose):
    from flows.stack import PREFECT_PORT

    ports = {name: [str(p) for p in svc.get("ports", [])] for name, svc in compose["services"].items()}
    assert any(str(PREFECT_PORT) in p for p in ports["prefect-server"])
    assert any("8080" in p for p in ports["labelstudio"])
    # the admin token the flows use is the one Label Studio is started with
    ls_env = compose["services"]["labelstudio"]["environment"]
    assert compose["services"]["flows"]["environment"]["LABEL_STUDIO_API_KEY"] == ls_env["LABEL_STUDIO_USER_TOKEN"]


def test_no_secret_is_committed():
    assert not (ROOT / ".env").exists() or ".env" in (ROOT / ".gitignore").read_text()
    assert ".env" in (ROOT / ".gitignore").read_text().split()
