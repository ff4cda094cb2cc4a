"""The Label Studio that annotation/labelstudio/start.sh starts (the session server of tests/conftest.py)
never makes a request to a loopback or private address for a user: with SSRF protection on, a webhook, a
task import from a URL or an ML backend pointing at 127.0.0.1 (where the Prefect API of the local stack
listens), a private network or the cloud metadata address is refused before anything is fetched. In the
community edition every member of the organisation (any annotator who joined through the invite link)
may make these calls, so this is what stands between them and the services on this machine."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN

REFUSED = re.compile(r"reserved network address")
LABEL_CONFIG = '<View><Image name="image" value="$image"/><Choices name="c" toName="image"><Choice value="keep"/></Choices></View>'


@pytest.fixture
def loopback_target():
    """A live HTTP server on 127.0.0.1 that would answer with tasks: a refusal is not for want of an answer.
    Yields its URL and the list of requests it received."""
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(f"{self.command} {self.path}")
            body = json.dumps([{"image": "http://127.0.0.1/secret.jpg"}]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", hits
    server.shutdown()
    server.server_close()


@pytest.fixture
def project(labelstudio):
    http = httpx.Client(base_url=labelstudio.url, headers={"Authorization": f"Token {ADMIN_TOKEN}"}, timeout=60)
    created = http.post("/api/projects", json={"title": "ssrf-check", "label_config": LABEL_CONFIG})
    assert created.status_code == 201, created.text
    pid = created.json()["id"]
    yield http, pid
    http.delete(f"/api/projects/{pid}")
    http.close()


def _refused(response: httpx.Response) -> bool:
    return response.status_code in (400, 403) and bool(REFUSED.search(response.text))


def test_webhooks_to_loopback_or_private_addresses_are_refused(project, loopback_target):
    http, pid = project
    url, hits = loopback_target
    port = url.rsplit(":", 1)[1]
    for target in (f"{url}/hook", f"http://localhost:{port}/hook", "http://10.0.0.1/hook", "http://192.168.1.1/hook",
                   "http://169.254.169.254/latest/meta-data/"):
        answer = http.post("/api/webhooks/", json={"url": target, "project": pid, "send_payload": False,
                                                   "actions": ["ANNOTATION_CREATED"]})
        assert _refused(answer), f"webhook to {target} not refused: {answer.status_code} {answer.text[:300]}"
    # A public address is accepted: what refused the others is the protection, not broken webhooks.
    public = http.post("/api/webhooks/", json={"url": "http://93.184.216.34/hook", "project": pid,
                                               "send_payload": False, "actions": ["ANNOTATION_CREATED"]})
    assert public.status_code == 201, public.text
    http.delete(f"/api/webhooks/{public.json()['id']}/")
    listed = http.get("/api/webhooks/", params={"project": pid}).json()
    assert [h["url"] for h in listed] == [], listed
    assert hits == []


def test_importing_tasks_from_a_loopback_url_is_refused(project, loopback_target):
    http, pid = project
    url, hits = loopback_target
    answer = http.post(f"/api/projects/{pid}/import", data={"url": f"{url}/tasks.json"})
    assert _refused(answer), f"{answer.status_code} {answer.text[:300]}"
    assert hits == [], "Label Studio fetched the loopback URL"
    assert http.get(f"/api/projects/{pid}").json()["task_number"] == 0


def test_ml_backends_on_loopback_are_refused(project, loopback_target):
    http, pid = project
    url, hits = loopback_target
    answer = http.post("/api/ml", json={"url": url, "project": pid, "title": "local backend"})
    assert _refused(answer), f"{answer.status_code} {answer.text[:300]}"
    assert hits == []
    assert http.get("/api/ml", params={"project": pid}).json() == []
