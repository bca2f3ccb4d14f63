"""flagops' one HTTP client: httpx with a timeout on every request, and one SSE parser.

Readiness (deploy), status, verify's checks and ``verify --bench`` all talk to the
vLLM API through this module; verify's two OpenAI-client checks hand this module's
``httpx.Client`` to the openai SDK, so they share its transport and timeouts too.

- :func:`request` never raises for a network problem: ``status`` 0 means no answer
  (refused, timed out, reset) and ``text`` says why, so callers report instead of
  crashing. Every call has a timeout (connect, read, write and pool wait each bounded
  by it); there is no way to ask for none.
- :func:`stream` yields the response's lines as they arrive (SSE streams), with the
  same timeout between reads.
- :class:`SSEParser` / :func:`iter_sse` turn lines into the ``data`` payloads of
  server-sent events (the WHATWG rules that matter for OpenAI-style streams).
- :func:`async_client` is the asyncio client of the benchmark (no connection cap, so
  ``concurrency`` alone limits what is in flight).

``OPENAI_API_KEY``, when set, is sent as a bearer token (never logged or returned).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

DEFAULT_TIMEOUT = 10.0
USER_AGENT = "flagops"

_client: httpx.Client | None = None
_client_lock = threading.Lock()


@dataclass
class Response:
    status: int  # 0: no answer (connection refused, timeout, reset); the reason is in text
    text: str
    seconds: float
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.text)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def auth_headers() -> dict[str, str]:
    key = os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def timeout_of(seconds: float) -> httpx.Timeout:
    if seconds is None or seconds <= 0:
        raise ValueError(f"every request needs a positive timeout, got {seconds!r}")
    return httpx.Timeout(seconds)


def client() -> httpx.Client:
    """The process's shared client (thread-safe, keep-alive pool); no proxies from the
    environment: flagops talks to the nodes directly or through its own ssh tunnel."""
    global _client
    with _client_lock:
        if _client is None or _client.is_closed:
            _client = httpx.Client(timeout=timeout_of(DEFAULT_TIMEOUT), trust_env=False,
                                   headers={"User-Agent": USER_AGENT},
                                   limits=httpx.Limits(max_connections=64, max_keepalive_connections=16))
        return _client


def _no_answer(exc: Exception) -> str:
    kind = {httpx.ConnectTimeout: "connect timed out", httpx.ReadTimeout: "read timed out",
            httpx.WriteTimeout: "write timed out", httpx.PoolTimeout: "no free connection",
            httpx.ConnectError: "cannot connect"}.get(type(exc))
    text = str(exc) or type(exc).__name__
    return f"{kind}: {text}" if kind and kind not in text else text


def request(method: str, url: str, body: Any = None, timeout: float = DEFAULT_TIMEOUT,
            headers: dict[str, str] | None = None) -> Response:
    """One request; a JSON ``body`` when given. Network failures are status 0, never raised."""
    hdrs = {**auth_headers(), **(headers or {})}
    t0 = time.perf_counter()
    try:
        r = client().request(method, url, json=body, headers=hdrs, timeout=timeout_of(timeout))
        return Response(r.status_code, r.text, time.perf_counter() - t0, dict(r.headers))
    except httpx.HTTPError as exc:  # transport errors and timeouts (HTTP status errors are not raised)
        return Response(0, _no_answer(exc), time.perf_counter() - t0)


def get(url: str, timeout: float = DEFAULT_TIMEOUT) -> Response:
    return request("GET", url, timeout=timeout)


def post(url: str, body: Any, timeout: float = DEFAULT_TIMEOUT) -> Response:
    return request("POST", url, body, timeout=timeout)


@dataclass
class Stream:
    status: int
    headers: dict[str, str]
    lines: Iterator[str]


@contextlib.contextmanager
def stream(method: str, url: str, body: Any = None, timeout: float = DEFAULT_TIMEOUT) -> Iterator[Stream]:
    """The response's lines as they arrive; ``timeout`` bounds the connect and each read.
    Raises :class:`httpx.HTTPError` on a network failure (the caller decides what it means)."""
    hdrs = {**auth_headers(), "Accept": "text/event-stream"}
    with client().stream(method, url, json=body, headers=hdrs, timeout=timeout_of(timeout)) as r:
        yield Stream(r.status_code, dict(r.headers), r.iter_lines())


def async_client(timeout: float) -> httpx.AsyncClient:
    """The benchmark's client: keep-alive pool without a connection cap, bearer token."""
    return httpx.AsyncClient(timeout=timeout_of(timeout), trust_env=False,
                             headers={"User-Agent": USER_AGENT, **auth_headers()},
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))


# --------------------------------------------------------------------------- SSE


class SSEParser:
    """Incremental server-sent events: feed lines, get the ``data`` of each finished event.

    Multi-line data is joined by ``\\n``; comments (``:``) and other fields (``event``,
    ``id``, ``retry``) are ignored; one space after the colon is dropped; a field without
    a colon has an empty value; CR/LF line endings are stripped."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self._seen = False

    def feed(self, raw: str) -> str | None:
        line = raw.rstrip("\r\n")
        if not line:
            if not self._seen:
                return None
            event, self._data, self._seen = "\n".join(self._data), [], False
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
            self._seen = True
        return None

    def flush(self) -> str | None:
        """The last event when the stream ended without its blank line."""
        if not self._seen:
            return None
        event, self._data, self._seen = "\n".join(self._data), [], False
        return event


def iter_sse(lines: Iterable[str]) -> Iterator[str]:
    """The ``data`` payload of each server-sent event in ``lines`` (a final event
    without a blank line still counts)."""
    parser = SSEParser()
    for line in lines:
        event = parser.feed(line)
        if event is not None:
            yield event
    last = parser.flush()
    if last is not None:
        yield last
