"""docker-compose.yml is valid (Debian's docker-compose validates it; no Docker engine runs here), defines
every service the flows need with the ports and environment names the code reads, and keeps its security
promises: every secret guarded (a copy of .env.example left as it is refuses to start), the Prefect API
behind an auth string, Ray behind a token with no dashboard, Label Studio with SSRF protection on. The Ray
head and the Prefect server are then started here, on loopback, with the compose file's own command and
settings, to show that they refuse a client without the secret and serve one with it."""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ENV_EXAMPLE = ROOT / ".env.example"
#: what .env.example must leave empty for the user to fill in (and compose must refuse while empty)
SECRETS = ("POSTGRES_PASSWORD", "LABEL_STUDIO_PASSWORD", "LABEL_STUDIO_USER_TOKEN", "PREFECT_API_AUTH_STRING",
           "RAY_AUTH_TOKEN")
NEEDLES_SERVICES = ("flows", "relay", "ray-head", "ray-worker")


def _env_example() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def _compose_config(values: dict[str, str], tmp: Path) -> subprocess.CompletedProcess:
    """`docker-compose --env-file F config` with F holding exactly ``values`` (nothing from this process's
    environment leaks in: compose lets the environment override the env file)."""
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (Debian package docker-compose; .ci/run installs it)")
    env_file = tmp / "test.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    clean = {k: v for k, v in os.environ.items() if k not in _env_example()}
    return subprocess.run(["docker-compose", "-f", "docker-compose.yml", "--env-file", str(env_file), "config"],
                          cwd=ROOT, env=clean, capture_output=True, text=True, timeout=120)


def _filled() -> dict[str, str]:
    """.env.example with every secret set, as a user's .env would be."""
    values = _env_example()
    values.update({name: secrets.token_hex(16) for name in SECRETS})
    values["PREFECT_API_AUTH_STRING"] = f"needles:{secrets.token_hex(16)}"
    return values


@pytest.fixture(scope="module")
def filled_env() -> dict[str, str]:
    return _filled()


@pytest.fixture(scope="module")
def compose(filled_env, tmp_path_factory) -> dict:
    done = _compose_config(filled_env, tmp_path_factory.mktemp("compose"))
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
                 "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", "NEEDLES_WEIGHTS_DIR", "NEEDLES_DATA_DIR", "NEEDLES_OFFLINE"):
        assert name in flows_env, f"the flows service does not set {name}"
        if name not in ("PREFECT_API_URL", "RAY_ADDRESS"):  # these two are read by Prefect and Ray themselves
            assert _code_reads(name), f"no code reads {name}: the compose file and the code disagree"
    assert flows_env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert flows_env["LABEL_STUDIO_URL"] == "http://labelstudio:8080"
    assert flows_env["RAY_ADDRESS"].split(":")[0] == "ray-head"
    # the flows' data root is the shared volume: relative run_dirs must not land in the container
    assert flows_env["NEEDLES_DATA_DIR"] == "/data"
    assert "/data" in [str(v).split(":")[1] for v in compose["services"]["flows"]["volumes"]]


def test_ports_match_the_local_stack(compose):
    from flows.stack import PREFECT_PORT

    ports = {name: [str(p) for p in svc.get("ports", [])] for name, svc in compose["services"].items()}
    assert any(str(PREFECT_PORT) in p for p in ports["prefect-server"])
    assert any("8080" in p for p in ports["labelstudio"])
    # the admin token the flows use is the one Label Studio is started with
    ls_env = compose["services"]["labelstudio"]["environment"]
    assert compose["services"]["flows"]["environment"]["LABEL_STUDIO_API_KEY"] == ls_env["LABEL_STUDIO_USER_TOKEN"]


def test_no_port_is_published_beyond_loopback(compose):
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            published = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port.get('published')}"
            assert str(published).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_no_secret_is_committed():
    assert not (ROOT / ".env").exists() or ".env" in (ROOT / ".gitignore").read_text()
    assert ".env" in (ROOT / ".gitignore").read_text().split()


# -- secrets: a copy of .env.example cannot start --------------------------------------------------------
def test_env_example_leaves_every_secret_empty_and_compose_refuses_it(tmp_path):
    values = _env_example()
    for name in SECRETS:
        assert name in values, f".env.example does not list {name}"
        assert values[name] == "", f".env.example sets {name}={values[name]!r}: a copied file would run with it"
    assert "change-me" not in ENV_EXAMPLE.read_text()
    done = _compose_config(values, tmp_path)
    assert done.returncode != 0, "compose accepted .env.example with its secrets empty"
    assert re.search(r"set \w+ .*in \.env", done.stderr), done.stderr


@pytest.mark.parametrize("name", SECRETS)
def test_each_secret_is_guarded(name, tmp_path):
    """Every secret on its own: left empty (the others set), compose stops and names it."""
    values = _filled()
    values[name] = ""
    done = _compose_config(values, tmp_path)
    assert done.returncode != 0, f"compose started with {name} empty"
    assert f"set {name}" in done.stderr, done.stderr
    del values[name]  # unset, not just empty
    done = _compose_config(values, tmp_path)
    assert done.returncode != 0 and f"set {name}" in done.stderr, done.stderr


def test_every_compose_variable_is_in_env_example():
    lines = [line for line in (ROOT / "docker-compose.yml").read_text().splitlines() if not line.lstrip().startswith("#")]
    used = set(re.findall(r"(?<!\$)\$\{(\w+)", "\n".join(lines)))  # $${X} is the container's own variable
    assert used <= set(_env_example()), f"not in .env.example: {sorted(used - set(_env_example()))}"


# -- Label Studio --------------------------------------------------------------------------------------------
def test_label_studio_runs_with_ssrf_protection(compose):
    svc = compose["services"]["labelstudio"]
    env = svc["environment"]
    assert env["LABEL_STUDIO_SSRF_PROTECTION_ENABLED"] == "true"
    assert env["LABEL_STUDIO_USE_DEFAULT_BANNED_SUBNETS"] == "true"
    assert env["LABEL_STUDIO_ML_BLOCK_LOCAL_IP"] == "true"
    assert env["LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK"] == "true"
    assert env["LABEL_STUDIO_SVG_SECURITY_CLEANUP"] == "true"
    assert "LABEL_STUDIO_USER_ADDITIONAL_BANNED_SUBNETS" not in env
    # no unprefixed or HEARTEX_ spelling that would say otherwise (Label Studio reads the prefixed one first)
    for prefix in ("", "HEARTEX_"):
        assert env.get(f"{prefix}SSRF_PROTECTION_ENABLED", "true") == "true"
    # 1.23.1 is the release with SSRF-guarded connections and tighter permission checks
    version = tuple(int(x) for x in svc["image"].rsplit(":", 1)[1].split("."))
    assert version >= (1, 23, 1), svc["image"]


def test_local_start_script_turns_ssrf_protection_on():
    """start.sh exports the protection unconditionally (a caller's LABEL_STUDIO_SSRF_PROTECTION_ENABLED=false
    cannot turn it off); tests/annotation/test_labelstudio_security.py checks the running server."""
    exports = dict(re.findall(r"\b(LABEL_STUDIO_\w+)=(\S+)", "\n".join(
        line for line in (ROOT / "annotation/labelstudio/start.sh").read_text().splitlines()
        if line.startswith("export "))))
    assert exports["LABEL_STUDIO_SSRF_PROTECTION_ENABLED"] == "true"
    assert exports["LABEL_STUDIO_ML_BLOCK_LOCAL_IP"] == "true"
    assert exports["LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK"] == "true"


# -- Prefect ------------------------------------------------------------------------------------------------
def test_prefect_api_asks_for_the_auth_string(compose):
    server = compose["services"]["prefect-server"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"]
    assert ":" in server
    for name in ("flows", "relay"):
        assert compose["services"][name]["environment"]["PREFECT_API_AUTH_STRING"] == server, name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prefect_client_reads(api: str, auth: str | None) -> list:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    updates = {PREFECT_API_URL: api, **({PREFECT_API_AUTH_STRING: auth} if auth else {})}
    with temporary_settings(updates=updates, restore_defaults=set() if auth else {PREFECT_API_AUTH_STRING}):
        with get_client(sync_client=True) as client:
            return client.read_flow_runs(limit=1)


def test_prefect_server_with_the_auth_string_refuses_other_clients(compose, tmp_path, monkeypatch):
    """The real Prefect server with the compose file's PREFECT_SERVER_API_AUTH_STRING: its health check
    stays open (compose's healthcheck), the API refuses a client without the string or with a wrong one,
    and the clients the compose services run (Prefect's own client, the relay) get in with it."""
    from flows import relay
    from flows.stack import prefect_env, prefect_server

    auth = compose["services"]["prefect-server"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"]
    port = _free_port()
    env = {**prefect_env(port, home=tmp_path / "home"), "PREFECT_SERVER_API_AUTH_STRING": auth}
    server = prefect_server(port, state_dir=tmp_path)
    server.start(env)
    try:
        api = env["PREFECT_API_URL"]
        assert httpx.get(f"{api}/health", timeout=10).status_code == 200
        body = {"limit": 1}
        assert httpx.post(f"{api}/flow_runs/filter", json=body, timeout=10).status_code == 401
        assert httpx.post(f"{api}/flow_runs/filter", json=body, auth=("needles", "wrong"), timeout=10).status_code == 401
        user, password = auth.split(":", 1)
        assert httpx.post(f"{api}/flow_runs/filter", json=body, auth=(user, password), timeout=10).status_code == 200

        # Prefect's own client (the serve process and the flow runs use it) with and without the string
        with pytest.raises(httpx.HTTPStatusError, match="401"):
            _prefect_client_reads(api, auth=None)
        assert _prefect_client_reads(api, auth=auth) == []

        monkeypatch.setenv("PREFECT_API_URL", api)
        monkeypatch.delenv("PREFECT_API_AUTH_STRING", raising=False)
        with relay.api_client() as http, pytest.raises(httpx.HTTPStatusError, match="401"):
            relay.check_once(http)
        monkeypatch.setenv("PREFECT_API_AUTH_STRING", auth)
        with relay.api_client() as http:
            assert relay.check_once(http) == []  # nothing suspended, and no 401
    finally:
        server.stop()


# -- Ray ----------------------------------------------------------------------------------------------------
def test_ray_needs_the_token_and_has_no_dashboard(compose):
    services = compose["services"]
    token = services["ray-head"]["environment"]["RAY_AUTH_TOKEN"]
    for name in NEEDLES_SERVICES:
        env = services[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token", name
        assert env["RAY_AUTH_TOKEN"] == token, f"{name} has another Ray token than the head"
    head = services["ray-head"]
    assert "--include-dashboard=false" in shlex.split(head["command"])
    assert "--dashboard-host" not in head["command"]
    assert not head.get("ports"), "the Ray head publishes ports"
    assert (ROOT / "Dockerfile").read_text().count("RAY_AUTH_MODE=token") == 1


class _RayHead:
    """The compose file's `ray start --head ... --block`, moved to free loopback ports and a short temp dir
    (Ray's socket paths must stay short), in its own process group, stopped by that group's id."""

    def __init__(self, command: str, env: dict[str, str], state: Path):
        self.port = _free_port()
        argv = [a for a in shlex.split(command) if not a.startswith("--port=")]
        assert argv[:3] == ["ray", "start", "--head"] and "--block" in argv, command
        self.argv = [str(Path(sys.executable).parent / "ray"), *argv[1:], f"--port={self.port}",
                     "--node-ip-address=127.0.0.1", "--num-cpus=1", "--object-store-memory=100000000",
                     f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
                     f"--temp-dir={state / 't'}"]
        self.env, self.state, self.proc = env, state, None

    def start(self) -> subprocess.Popen:
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=open(self.state / "head.log", "ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        return self.proc

    def log(self) -> str:
        return (self.state / "head.log").read_text(errors="replace")[-3000:]

    def listening(self) -> set[str]:
        """The addresses the head's processes listen on."""
        import psutil

        group = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        return {c.laddr.ip for p in group for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}

    def stop(self) -> None:
        if self.proc is None:
            return
        for sig, wait_s in ((signal.SIGTERM, 2), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and _group_alive(self.proc.pid):
                self.proc.poll()
                time.sleep(0.2)
        self.proc.wait(timeout=10)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_ray_head_from_compose_serves_only_clients_with_the_token(compose):
    """The compose file's Ray head command and token settings, started for real: without RAY_AUTH_TOKEN it
    refuses to start; started with it, the compose healthcheck (`ray status`) and a driver with the token
    work, while a driver with another token is refused."""
    head_env = compose["services"]["ray-head"]["environment"]
    token = head_env["RAY_AUTH_TOKEN"]
    state = Path(tempfile.mkdtemp(prefix="rayauth", dir="/tmp"))
    # HOME: no ~/.ray/auth_token of this machine's user may stand in for the token. Ray's single-machine
    # mode binds every Ray process to 127.0.0.1 (as pipeline.engine does for its local Ray).
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base.update(HOME=str(state), RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                RAY_AUTH_MODE=head_env["RAY_AUTH_MODE"])
    with_token = {**base, "RAY_AUTH_TOKEN": token}
    try:
        tokenless = _RayHead(compose["services"]["ray-head"]["command"], base, state)
        try:
            assert tokenless.start().wait(timeout=120) != 0, "the Ray head started without a token"
        finally:
            tokenless.stop()
        assert "token" in tokenless.log().lower(), tokenless.log()

        head = _RayHead(compose["services"]["ray-head"]["command"], with_token, state)
        head.start()
        try:
            address = f"127.0.0.1:{head.port}"
            # the compose healthcheck, ["CMD", "ray", "status", "--address", "127.0.0.1:6379"], on this port
            health = [address if a == "127.0.0.1:6379" else a
                      for a in compose["services"]["ray-head"]["healthcheck"]["test"][1:]]
            assert health[:2] == ["ray", "status"], health
            deadline = time.monotonic() + 120
            while True:
                status = subprocess.run([str(Path(sys.executable).parent / "ray"), *health[1:]], env=with_token,
                                        capture_output=True, text=True, timeout=60)
                if status.returncode == 0:
                    break
                assert head.proc.poll() is None, f"the Ray head exited:\n{head.log()}"
                assert time.monotonic() < deadline, f"ray status never answered:\n{status.stderr[-2000:]}"
                time.sleep(1)
            assert head.listening() <= {"127.0.0.1", "::ffff:127.0.0.1"}, head.listening()

            driver = (f"import ray; ray.init(address={address!r}, log_to_driver=False); "
                      "print('answer', ray.get(ray.remote(lambda: 6 * 7).remote()))")
            ok = subprocess.run([sys.executable, "-c", driver], env=with_token, capture_output=True, text=True,
                                timeout=180)
            assert ok.returncode == 0 and "answer 42" in ok.stdout, ok.stderr[-3000:]
            # a driver that does not know the token cannot run anything (2 tries, not Ray's 20, to fail fast)
            refused = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, timeout=180,
                                     env={**with_token, "RAY_AUTH_TOKEN": "not-it", "RAY_NUM_REDIS_GET_RETRIES": "2"})
            assert refused.returncode != 0 and "answer" not in refused.stdout, refused.stdout
            assert re.search(r"Unauthenticated|InvalidAuthToken", refused.stderr), refused.stderr[-3000:]
        finally:
            head.stop()
    finally:
        shutil.rmtree(state, ignore_errors=True)
