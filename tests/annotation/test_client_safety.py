"""Issue 12 against the real Label Studio: the development token and the scripted annotators only in dev mode
(scripted users with random per-run passwords), no connection left open after a call, waiting by polling."""

from __future__ import annotations

import gc
import logging
import re
import threading
import time

import psutil
import pytest

from annotation import simulated
from annotation.__main__ import main
from annotation.abtest import SharpnessVoter, get_criterion, simulate_ab
from annotation.client import (
    DEV_API_TOKEN,
    LabelStudioClient,
    LabelStudioConfigError,
    LabelStudioError,
    LabelStudioSettings,
)
from annotation.curation import push_round, round_projects, round_status, wait_for_round
from annotation.rounds import get_round
from annotation.simulated import SimulatedAnnotator, hash_rule, simulate_round


# -- the development token ----------------------------------------------------------------------------------
def test_without_a_token_outside_dev_mode_the_error_names_the_variable(no_dev_mode):
    with pytest.raises(LabelStudioConfigError, match="LABEL_STUDIO_API_KEY is not set"):
        LabelStudioSettings.from_env()


def test_the_development_token_only_in_dev_mode(no_dev_mode, monkeypatch):
    monkeypatch.setenv("NEEDLES_DEV", "1")
    assert LabelStudioSettings.from_env().api_key == DEV_API_TOKEN
    monkeypatch.setenv("NEEDLES_DEV", "0")
    with pytest.raises(LabelStudioConfigError, match="LABEL_STUDIO_API_KEY"):
        LabelStudioSettings.from_env()
    # start.sh's variable, set explicitly, is a token given on purpose: no dev mode needed
    monkeypatch.setenv("LABEL_STUDIO_USER_TOKEN", "token-from-start-sh")
    assert LabelStudioSettings.from_env().api_key == "token-from-start-sh"
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "the-admins-token")
    assert LabelStudioSettings.from_env().api_key == "the-admins-token"


def test_cli_without_a_token_is_one_line_naming_the_variable(no_dev_mode, capsys):
    assert main(["status", "--round", "generalist"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: LABEL_STUDIO_API_KEY is not set") and "Traceback" not in err


# -- scripted annotators --------------------------------------------------------------------------------------
def test_scripted_annotators_are_refused_outside_dev_mode(labelstudio, photo_pool, tmp_path, no_dev_mode,
                                                          monkeypatch, capsys):
    settings = labelstudio.settings()
    generalist = get_round("generalist")
    push_round(photo_pool, generalist, "nodev", tmp_path, settings)
    with LabelStudioClient(settings) as admin:
        members = set(admin.user_emails().values())
        with pytest.raises(LabelStudioConfigError, match="NEEDLES_DEV=1"):
            simulate_round(admin, generalist, "nodev", 2, 0.5)
        with pytest.raises(LabelStudioConfigError, match="NEEDLES_DEV=1"):
            simulate_ab(admin, get_criterion("appeal"), "nodev", 2)
        with pytest.raises(LabelStudioConfigError, match="NEEDLES_DEV=1"):
            SimulatedAnnotator("eve@needles.test", "eve-password-1", hash_rule(generalist, "eve", 0.5)).annotate(
                admin, generalist, "nodev")
        with pytest.raises(LabelStudioConfigError, match="NEEDLES_DEV=1"):
            SharpnessVoter("eve@needles.test", "eve-password-1").vote(admin, get_criterion("appeal"), "nodev")
        assert set(admin.user_emails().values()) == members, "a scripted user joined outside dev mode"
    monkeypatch.setenv("LABEL_STUDIO_URL", labelstudio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", settings.api_key)
    assert main(["simulate", "--round", "generalist", "--campaign", "nodev"]) == 2
    assert "NEEDLES_DEV=1" in capsys.readouterr().err
    assert round_status(generalist, "nodev", settings, per_annotator=False).annotations == 0


def test_simulated_round_makes_new_users_with_random_passwords_never_shown(
    labelstudio, photo_pool, tmp_path, dev_mode, monkeypatch, capsys, caplog
):
    settings = labelstudio.settings()
    generalist = get_round("generalist")
    push_round(photo_pool, generalist, "simdev", tmp_path, settings)
    passwords: list[str] = []
    real = simulated.one_time_password
    monkeypatch.setattr(simulated, "one_time_password", lambda: passwords.append(real()) or passwords[-1])
    caplog.set_level(logging.DEBUG)
    with LabelStudioClient(settings) as admin:
        first = simulate_round(admin, generalist, "simdev", 2, 0.5)
        second = simulate_round(admin, generalist, "simdev", 2, 0.5)  # a rerun: new users, nothing left to do
    assert all(re.fullmatch(r"simulated-[12]-[0-9a-f]{6}@needles\.local", e) for e in [*first, *second])
    assert list(first.values()) == [12, 12] and list(second.values()) == [0, 0]
    assert not set(first) & set(second)
    assert round_status(generalist, "simdev", settings, per_annotator=False).complete
    assert len(set(passwords)) == 4 and all(len(p) >= 32 for p in passwords)
    captured = capsys.readouterr()
    shown = captured.out + captured.err + caplog.text
    shown += repr(SimulatedAnnotator("x@needles.test", passwords[0], lambda d: None))
    shown += repr(SharpnessVoter("x@needles.test", passwords[1]))
    assert not any(p in shown for p in passwords)


# -- no connection left open ----------------------------------------------------------------------------------
def _connections_to(url: str) -> int:
    port = int(url.rsplit(":", 1)[1])
    return sum(1 for c in psutil.Process().net_connections(kind="tcp")
               if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED)


def test_no_connection_stays_open_after_a_call(labelstudio, photo_pool, tmp_path):
    settings = labelstudio.settings()
    generalist = get_round("generalist")
    push_round(photo_pool, generalist, "sockets", tmp_path, settings)
    gc.collect()  # clients earlier tests left to the garbage collector
    before = _connections_to(labelstudio.url)
    # the probe sees a client that is still open (a keep-alive connection in each pool) ...
    client = LabelStudioClient(settings)
    client.whoami()
    client.next_task(next(iter(round_projects(client, "sockets", generalist).values())))
    assert _connections_to(labelstudio.url) == before + 2
    client.close()
    assert client.closed and client.sdk._client_wrapper.httpx_client.httpx_client.is_closed  # the SDK's pool
    assert _connections_to(labelstudio.url) == before
    # ... and none after the calls a relay poll and the CLI make, each with its own client
    assert round_status(generalist, "sockets", settings).tasks == 12
    assert _connections_to(labelstudio.url) == before
    with LabelStudioClient(settings) as client:
        client.whoami()
    assert client.closed and _connections_to(labelstudio.url) == before


# -- waiting: polling by default ------------------------------------------------------------------------------
def test_waiting_polls_and_sees_the_round_complete(labelstudio, photo_pool, tmp_path, dev_mode):
    settings = labelstudio.settings()
    generalist = get_round("generalist")
    push_round(photo_pool, generalist, "polling", tmp_path, settings)
    with pytest.raises(TimeoutError, match="12 of 12 tasks remaining"):
        wait_for_round(generalist, "polling", settings, timeout_s=1, poll_s=0.5)

    result = {}
    waiter = threading.Thread(target=lambda: result.update(status=wait_for_round(
        generalist, "polling", settings, timeout_s=120, poll_s=0.5)))
    waiter.start()
    with LabelStudioClient(settings) as admin:
        time.sleep(1)
        projects = round_projects(admin, "polling", generalist).values()
        assert all(admin.sdk.webhooks.list(project=str(p)) == [] for p in projects)  # no webhook by default
        for who in ("hana", "ivan"):
            SimulatedAnnotator(f"{who}@needles.test", f"{who}-password-1", hash_rule(generalist, who, 0.5)).annotate(
                admin, generalist, "polling")
    waiter.join(timeout=60)
    assert not waiter.is_alive()
    assert result["status"].complete and result["status"].annotations == 24


def test_a_webhook_the_server_refuses_is_a_clear_error(labelstudio, photo_pool, tmp_path):
    """The opt-in webhook to a loopback receiver, with Label Studio's SSRF protection on."""
    settings = labelstudio.settings()
    generalist = get_round("generalist")
    push_round(photo_pool, generalist, "hooks", tmp_path, settings)
    with LabelStudioClient(settings) as admin:
        project = next(iter(round_projects(admin, "hooks", generalist).values()))
        try:
            hook = admin.create_webhook(project, "http://127.0.0.1:9/probe")
        except LabelStudioError:
            pass
        else:
            admin.delete_webhook(hook)
            pytest.skip("this Label Studio runs with SSRF protection off (annotation/labelstudio/start.sh)")
        with pytest.raises(LabelStudioError, match="SSRF protection refuses webhooks"):
            wait_for_round(generalist, "hooks", settings, timeout_s=5, poll_s=1, webhook=True)
        assert admin.sdk.webhooks.list(project=str(project)) == []
