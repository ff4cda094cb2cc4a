"""The relay's requests survive a connection the server resets (a keep-alive connection closed as the request
went out) and a 503 (Prefect's SQLite busy): a real socket server on 127.0.0.1 that resets the first
connection, answers 503 on the second and 200 on the third."""

from __future__ import annotations

import socket
import struct
import threading

import httpx
import pytest

from flows.relay import _with_retry


def _serve(listener: socket.socket, answers: list[bytes | None]) -> None:
    for answer in answers:
        conn, _ = listener.accept()
        conn.recv(65536)
        if answer is None:  # RST instead of an answer: "Connection reset by peer" on the client
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            conn.sendall(answer)
        conn.close()


def _response(status: str, body: bytes = b"{}") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode() + body


@pytest.fixture
def server():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    yield listener
    listener.close()


def test_a_reset_connection_and_a_503_are_retried(server):
    answers = [None, _response("503 Service Unavailable"), _response("200 OK", b'{"ok": true}')]
    thread = threading.Thread(target=_serve, args=(server, answers), daemon=True)
    thread.start()
    with httpx.Client(base_url=f"http://127.0.0.1:{server.getsockname()[1]}", timeout=10) as http:
        response = _with_retry(lambda: http.delete("/flow_runs/x"), delay_s=0.01)
    thread.join(timeout=10)
    assert response.json() == {"ok": True}


def test_the_last_attempts_error_is_raised(server):
    thread = threading.Thread(target=_serve, args=(server, [None, None]), daemon=True)
    thread.start()
    with httpx.Client(base_url=f"http://127.0.0.1:{server.getsockname()[1]}", timeout=10) as http:
        with pytest.raises(httpx.TransportError):
            _with_retry(lambda: http.delete("/flow_runs/x"), attempts=2, delay_s=0.01)
    thread.join(timeout=10)
