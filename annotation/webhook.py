"""A small receiver for Label Studio's webhooks, so a waiter (``curation.wait_for_round(webhook=True)``)
wakes at each annotation instead of only on its polling interval. It only needs to know *that* something
changed: the waiter then reads the counters through the API (webhooks carry no guarantee of delivery, so
polling stays on).

An opt-in, off by default: Label Studio's SSRF protection refuses webhooks to loopback and private
addresses, so the receiver is useful only where it listens on an address the server is allowed to reach
(``public_url`` is the address Label Studio is given, when it differs from the one bound)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class WebhookReceiver:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, public_url: str | None = None) -> None:
        self._event = threading.Event()
        self._public_url = public_url
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver._event.set()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:  # one line per annotation would flood the log
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="labelstudio-webhook", daemon=True)

    @property
    def url(self) -> str:
        """The address Label Studio calls: ``public_url``, or the bound host and port."""
        if self._public_url:
            return self._public_url
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/labelstudio"

    def start(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def wait(self, timeout: float) -> bool:
        """True when a notification arrived within ``timeout`` seconds (then re-armed)."""
        arrived = self._event.wait(timeout)
        self._event.clear()
        return arrived

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
