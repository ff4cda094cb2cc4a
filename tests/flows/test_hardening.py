"""Issue 12, the flows' share: paths inside the data root, parameters checked up front, one run per run_dir
(lock + deployment concurrency limits), `python -m flows run` saying why a run failed, and PID files that
never lead `make down` to signal a process the stack did not start. The relay's isolation of a broken
suspended run is tested beside the real suspended run in test_flows.py."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from flows.params import CurateParams, EvalParams, ParameterError, TrainParams, data_path, output_dir

# --- paths: inside the data root ---------------------------------------------------------------------


def test_relative_paths_resolve_inside_the_data_root_and_outside_paths_are_refused(tmp_path, monkeypatch):
    root = tmp_path / "volume"
    (root / "sample").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # the serve process's directory: without NEEDLES_DATA_DIR, ./data is the root
    monkeypatch.delenv("NEEDLES_DATA_DIR", raising=False)
    assert output_dir("data/runs/a") == tmp_path / "data" / "runs" / "a"

    monkeypatch.setenv("NEEDLES_DATA_DIR", str(root))  # as the compose stack sets it to its /data volume
    params = CurateParams.parse({"sources": ["data/sample"], "run_dir": "data/runs/mine"})
    assert params.run_dir == str(root / "runs" / "mine") and params.sources == [str(root / "sample")]
    assert CurateParams.parse({"sources": ["sample"]}).run_dir == str(root / "runs" / "quality-set")  # the default
    assert output_dir("runs/mine") == output_dir(root / "runs" / "mine") == root / "runs" / "mine"
    assert TrainParams.parse({}).out_dir == str(root / "train-qt")
    assert data_path("/elsewhere/haystack") == Path("/elsewhere/haystack")  # inputs may live anywhere

    for outside in ["/tmp/elsewhere", "../escape", "data/runs/../../../escape", "data", str(root)]:
        with pytest.raises(ParameterError, match=r"run_dir: .* is not inside the data root .*NEEDLES_DATA_DIR"):
            CurateParams.parse({"sources": ["sample"], "run_dir": outside})
    with pytest.raises(ParameterError, match="out_dir: .* is not inside the data root"):
        TrainParams.parse({"out_dir": "/tmp/elsewhere"})


# --- parameters: checked before any work, one line each ------------------------------------------------


@pytest.mark.parametrize("extra, message", [
    ({"backend": "spark"}, r"backend: Input should be 'ray' or 'local'"),
    ({"preset": "no-such-preset"}, r"preset 'no-such-preset' .*no config 'no-such-preset'.*tiny"),
    ({"train_overrides": ["quality_tune.max_stepz=3"]}, r"quality_tune\.max_stepz"),
    ({"train_overrides": ["quality_tune.max_steps"]}, r"not key=value"),
    ({"train_overrides": ["pretrain.9.max_steps=3"]}, r"pretrain\.9\.max_steps"),
])
def test_backend_preset_and_overrides_fail_up_front_in_one_line(tmp_path, monkeypatch, extra, message):
    (tmp_path / "sample").mkdir()
    monkeypatch.setenv("NEEDLES_DATA_DIR", str(tmp_path))
    with pytest.raises(ParameterError, match=message) as failure:
        CurateParams.parse({"sources": ["sample"], **extra})
    assert "\n" not in str(failure.value)


def test_each_flow_takes_its_params_models_fields_with_the_same_defaults():
    """The parameters and their defaults are written once (flows/params.py); Prefect's schema, which the
    deployment form and `--params` validation use, is built from the same signature."""
    from prefect.utilities.callables import parameter_schema

    from flows.curate import curate
    from flows.evaluate import evaluate
    from flows.train import train_qt

    for flow, model in ((curate, CurateParams), (evaluate, EvalParams), (train_qt, TrainParams)):
        signature = inspect.signature(flow.fn).parameters
        assert list(signature) == list(model.model_fields)
        for name, field in model.model_fields.items():
            default = signature[name].default
            expected = inspect.Parameter.empty if field.is_required() else field.get_default(call_default_factory=True)
            assert default == expected, (flow.name, name)
        schema = parameter_schema(flow).model_dump()
        assert schema["required"] == [n for n, f in model.model_fields.items() if f.is_required()]
        assert all(schema["properties"][n].get("description") for n in model.model_fields), flow.name
    assert parameter_schema(curate).model_dump()["properties"]["backend"]["enum"] == ["ray", "local"]


# --- PID files: a reused PID is never signalled ------------------------------------------------------------


@pytest.fixture
def unrelated_process():
    """A process the stack did not start (stopped by its PID at the end)."""
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_stale_pid_file_naming_an_unrelated_live_process_is_removed_and_nothing_signalled(
        tmp_path, unrelated_process, caplog):
    import psutil

    from flows.stack import Service

    serve = Service("prefect-serve", [sys.executable, "-m", "flows", "serve"], state_dir=tmp_path)
    started = psutil.Process(unrelated_process.pid).create_time()
    # after a reboot the recorded PID belongs to another process, started at another time
    serve.pidfile.write_text(json.dumps({"pid": unrelated_process.pid, "create_time": started - 3600,
                                         "argv": serve.argv}))
    with caplog.at_level("WARNING", logger="flows.stack"):
        serve.stop(timeout_s=2)
    assert unrelated_process.poll() is None, "make down signalled a process the stack did not start"
    assert not serve.pidfile.exists()
    assert any("stale PID file" in r.getMessage() and str(unrelated_process.pid) in r.getMessage()
               for r in caplog.records)

    # a PID file of the older format (the number alone): trusted only if the command line is the service's
    serve.pidfile.write_text(str(unrelated_process.pid))
    assert serve.pid() is None and not serve.pidfile.exists()
    serve.stop(timeout_s=2)
    assert unrelated_process.poll() is None


def test_a_service_records_its_process_identity_and_stop_ends_it(tmp_path):
    import psutil

    from flows.stack import Service

    service = Service("sleeper", [sys.executable, "-c", "import time; time.sleep(300)"], state_dir=tmp_path)
    pid = service.start({})
    try:
        record = json.loads(service.pidfile.read_text())
        assert record["pid"] == pid and record["argv"] == service.argv
        assert abs(record["create_time"] - psutil.Process(pid).create_time()) < 0.01
        assert service.pid() == pid and service.start({}) == pid  # running: not started twice
    finally:
        service.stop(timeout_s=5)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not service.pidfile.exists()


# --- one run per run_dir: the lock, against the real Prefect server --------------------------------------


def _flow_run_in(http, state: dict) -> str:
    flow = http.post("/flows/", json={"name": "lock-holder"}).json()
    run = http.post("/flow_runs/", json={"flow_id": flow["id"], "state": state}).json()
    return run["id"]


def _set_state(http, run_id: str, state: dict) -> None:
    response = http.post(f"/flow_runs/{run_id}/set_state", json={"state": state, "force": True})
    assert response.json()["status"] == "ACCEPT", response.text


@pytest.mark.prefect
@pytest.mark.labelstudio
def test_run_dir_lock_refuses_a_live_holder_and_takes_over_an_ended_one(prefect_stack, tmp_path, caplog):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.lock import RunDirLocked, acquire, holder, release

    run_dir = tmp_path / "run"
    with prefect_stack.http() as http, temporary_settings({PREFECT_API_URL: prefect_stack.api}):
        first = _flow_run_in(http, {"type": "RUNNING"})
        acquire(run_dir, first, flow="curate", run_name="first")
        acquire(run_dir, first, flow="curate", run_name="first")  # a resumed run re-executes with its id
        second = str(uuid.uuid4())
        for state in ({"type": "RUNNING"}, {"type": "PAUSED", "name": "Suspended"}):
            _set_state(http, first, state)
            with pytest.raises(RunDirLocked, match=rf"in use by flow run first \({first}, curate, "
                                                   rf"{state.get('name', 'Running')}\)"):
                acquire(run_dir, second, flow="curate")
        assert holder(run_dir)["flow_run_id"] == first
        release(run_dir, second)  # not the holder: nothing happens
        assert holder(run_dir)["flow_run_id"] == first

        _set_state(http, first, {"type": "CRASHED"})  # its process died holding the lock: stale
        with caplog.at_level("WARNING", logger="flows.lock"):
            acquire(run_dir, second, flow="curate")
        assert holder(run_dir)["flow_run_id"] == second
        assert any("taking over" in r.getMessage() and first in r.getMessage() for r in caplog.records)

        (run_dir / "flow-run.lock").write_text('{"flow_run_id": "')  # half a file: no live holder named
        acquire(run_dir, first, flow="curate")
        assert holder(run_dir)["flow_run_id"] == first
        release(run_dir, first)
        assert holder(run_dir) is None


@pytest.mark.prefect
@pytest.mark.labelstudio
def test_every_deployment_has_a_concurrency_limit(prefect_stack):
    from flows.__main__ import CONCURRENCY

    with prefect_stack.http() as http:
        for deployment, name in (("curate/quality-set", "quality-set"), ("train-qt/train-qt", "train-qt"),
                                 ("evaluate/ab-test", "ab-test")):
            served = http.get(f"/deployments/name/{deployment}").json()
            assert served["global_concurrency_limit"]["limit"] == CONCURRENCY[name] >= 1, deployment


# --- `python -m flows run`: the reason a run failed, in the terminal ----------------------------------------


def _flows_run(stack, deployment: str, params: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows", "run", deployment, "--params", json.dumps(params)],
                          env={**os.environ, **stack.env}, cwd=stack.workdir, capture_output=True, text=True,
                          timeout=300, check=False)


@pytest.mark.prefect
@pytest.mark.labelstudio
def test_flows_run_prints_why_a_run_failed_and_exits_non_zero(prefect_stack):
    (prefect_stack.workdir / "data" / "hardening-src").mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    bad = _flows_run(prefect_stack, "curate/quality-set", {
        "sources": ["data/hardening-src"], "run_dir": "/tmp/not-the-data-root", "preset": "no-such-preset"})
    assert bad.returncode == 1, bad.stdout + bad.stderr
    error = bad.stderr.strip().splitlines()[-1]  # one line, naming every bad parameter
    assert error.startswith("error: flow run ") and "ended Failed" in error
    assert "run_dir: '/tmp/not-the-data-root' is not inside the data root" in error
    assert "preset 'no-such-preset'" in error and "no config 'no-such-preset'" in error
    assert "started" in bad.stdout and ": Failed" in bad.stdout  # the states it went through
    assert not Path("/tmp/not-the-data-root").exists()

    # refused by the deployment's parameter schema before a run exists
    schema = _flows_run(prefect_stack, "curate/quality-set", {"sources": ["data/hardening-src"], "backend": "spark"})
    assert schema.returncode == 2 and "error: curate/quality-set:" in schema.stderr and "spark" in schema.stderr
    missing = _flows_run(prefect_stack, "curate/no-such-deployment", {})
    assert missing.returncode == 2 and "no deployment 'curate/no-such-deployment'" in missing.stderr
    assert time.monotonic() - started < 240  # each fails at once, not after ingest


@pytest.mark.prefect
def test_the_relay_sends_the_api_auth_string_a_prefect_server_requires(tmp_path, monkeypatch):
    """The compose Prefect server requires PREFECT_API_AUTH_STRING; the relay talks to its REST API itself."""
    import httpx

    from flows.relay import api_client, suspended_runs
    from flows.stack import prefect_env, prefect_server
    from tests.conftest import free_port

    port = free_port()
    env = {**prefect_env(port, home=tmp_path / "home"), "PREFECT_SERVER_API_AUTH_STRING": "needles:s3cret"}
    server = prefect_server(port, state_dir=tmp_path)
    server.start(env)
    try:
        monkeypatch.setenv("PREFECT_API_URL", env["PREFECT_API_URL"])
        monkeypatch.delenv("PREFECT_API_AUTH_STRING", raising=False)
        with api_client() as http, pytest.raises(httpx.HTTPStatusError, match="401"):
            suspended_runs(http)
        monkeypatch.setenv("PREFECT_API_AUTH_STRING", "needles:s3cret")
        with api_client() as http:
            assert suspended_runs(http) == []
    finally:
        server.stop()
