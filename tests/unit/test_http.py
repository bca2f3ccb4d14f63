"""flagops.http against a real local HTTP server: status codes, JSON, timeouts, SSE."""

from __future__ import annotations

import asyncio
import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from flagops import http as fhttp
from flagops.verify import bench


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[dict] = []

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _chunk(self, text: str) -> None:
        data = text.encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        _Handler.seen.append({"path": self.path, "auth": self.headers.get("Authorization")})
        if self.path == "/ok":
            self._send(200, b'{"ok": true}')
        elif self.path == "/missing":
            self._send(404, b'{"error": "no such thing"}')
        elif self.path == "/slow":
            time.sleep(1.5)
            self._send(200, b"{}")
        elif self.path.startswith("/sse"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self._chunk(": a comment\n\n")
            self._chunk('data: {"n": 1}\n\n')
            self._chunk("event: x\r\ndata: two\r\ndata: lines\r\n\r\n")
            if self.path == "/sse-stall":
                time.sleep(1.5)  # longer than the client's timeout between reads
            self._chunk("data:[DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
        else:
            self._send(500, b"boom")

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Handler.seen.append({"path": self.path, "body": body})
        if self.path == "/v1/completions" and body.get("stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(body["max_tokens"]):
                self._chunk("data: " + json.dumps({"choices": [{"text": f"t{i}"}]}) + "\n\n")
                time.sleep(0.01)
            usage = {"choices": [], "usage": {"completion_tokens": body["max_tokens"], "prompt_tokens": 3}}
            self._chunk("data: " + json.dumps(usage) + "\n\n")
            self._chunk("data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
        else:
            self._send(200, json.dumps({"echo": body}).encode())


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that gave up (the timeout tests) is expected


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_get_json_and_status_codes(server: str) -> None:
    r = fhttp.get(server + "/ok")
    assert (r.status, r.json(), r.ok) == (200, {"ok": True}, True)
    assert r.seconds > 0
    r = fhttp.get(server + "/missing")
    assert (r.status, r.ok) == (404, False) and "no such thing" in r.text


def test_post_sends_json(server: str) -> None:
    r = fhttp.post(server + "/echo", {"a": [1, 2]})
    assert r.status == 200 and r.json() == {"echo": {"a": [1, 2]}}


def test_connection_refused_is_status_0(server: str) -> None:
    r = fhttp.get(f"http://127.0.0.1:{_free_port()}/health", timeout=2)
    assert r.status == 0 and "connect" in r.text.lower()


def test_read_timeout_is_status_0_within_the_timeout(server: str) -> None:
    t0 = time.monotonic()
    r = fhttp.get(server + "/slow", timeout=0.3)
    assert r.status == 0 and "timed out" in r.text
    assert time.monotonic() - t0 < 1.2  # the server answers only after 1.5 s


def test_every_request_needs_a_timeout(server: str) -> None:
    with pytest.raises(ValueError):
        fhttp.request("GET", server + "/ok", timeout=0)
    with pytest.raises(ValueError):
        fhttp.request("GET", server + "/ok", timeout=None)  # type: ignore[arg-type]


def test_bearer_token_from_environment(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-123")
    fhttp.get(server + "/ok")
    assert _Handler.seen[-1]["auth"] == "Bearer sk-test-123"
    monkeypatch.delenv("OPENAI_API_KEY")
    fhttp.get(server + "/ok")
    assert _Handler.seen[-1]["auth"] is None


def test_stream_sse_events(server: str) -> None:
    with fhttp.stream("GET", server + "/sse", timeout=5) as s:
        assert s.status == 200 and "text/event-stream" in s.headers["content-type"]
        events = list(fhttp.iter_sse(s.lines))
    assert events == ['{"n": 1}', "two\nlines", "[DONE]"]


def test_stream_read_timeout_raises(server: str) -> None:
    import httpx

    got: list[str] = []
    with pytest.raises(httpx.ReadTimeout), fhttp.stream("GET", server + "/sse-stall", timeout=0.3) as s:
        got.extend(fhttp.iter_sse(s.lines))
    assert got == ['{"n": 1}', "two\nlines"]  # the events before the stall arrived


def test_sse_parser_rules() -> None:
    lines = [": comment", "data: a", "data:b", "id: 7", "retry: 10", "", "", "data", "", "data:  two spaces", "",
             "data: tail"]
    assert list(fhttp.iter_sse(lines)) == ["a\nb", "", " two spaces", "tail"]
    p = fhttp.SSEParser()
    assert p.feed("data: x\r\n") is None and p.feed("\r\n") == "x" and p.flush() is None


def test_bench_streams_through_the_client(server: str) -> None:
    reqs = [bench.Request([1, 2, 3], 4, 3) for _ in range(3)]
    outcomes, duration, test = asyncio.run(bench._run(server, "m", reqs, 2, 30))
    assert test.success and duration > 0
    assert [o.success for o in outcomes] == [True] * 3
    assert all(o.output_tokens == 4 and len(o.itl) == 3 and o.ttft > 0 for o in outcomes)


def test_bench_reports_refused_connections() -> None:
    out = asyncio.run(bench._run(f"http://127.0.0.1:{_free_port()}", "m", [bench.Request([1], 2, 1)], None, 5))
    assert out[0] == [] and not out[2].success and "Connect" in out[2].error
