"""What every verify check returns and gets: :class:`CheckResult`, :class:`Context`,
:class:`Options`, and the one API request helper. :mod:`flagops.verify.checks` and
:mod:`flagops.verify.output` both build on this module (neither imports the other at load).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from flagops import http as _http

# --------------------------------------------------------------------------- results


@dataclass
class CheckResult:
    name: str
    status: str  # pass | fail | skip
    reason: str
    values: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def passed(name: str, reason: str, **values: Any) -> CheckResult:
    return CheckResult(name, "pass", reason, values)


def failed(name: str, reason: str, **values: Any) -> CheckResult:
    return CheckResult(name, "fail", reason, values)


def skipped(name: str, reason: str, **values: Any) -> CheckResult:
    return CheckResult(name, "skip", reason, values)


@dataclass
class Options:
    reference: str | None = None  # a reference file (output.consistency)
    reference_endpoint: str | None = None  # or a second endpoint (native stack)
    min_agreement: float = 100.0  # percent of reference tokens that must match
    http_timeout: float = 30.0
    probe_timeout: float = 120.0


@dataclass
class Context:
    """What the checks need: the resolved config (None for a bare endpoint), the API
    base URL, the served model name and the SSH fan-out to the nodes."""

    cfg: Any
    base_url: str
    model: str
    nodes: Any = None
    options: Options = field(default_factory=Options)
    endpoint_overridden: bool = False  # --endpoint: the API is not the inventory's service

    @property
    def release(self) -> dict[str, Any]:
        return self.cfg.release if self.cfg is not None else {}


# --------------------------------------------------------------------------- HTTP


HttpResponse = _http.Response


def http(method: str, url: str, body: Any = None, timeout: float = 10.0) -> HttpResponse:
    """One API request through :mod:`flagops.http` (status 0 and the reason when no answer)."""
    r = _http.request(method, url, body, timeout=timeout)
    if not r.ok and r.status:
        r.text = r.text[:2000]
    return r


def _answer(r: HttpResponse) -> str:
    return f"HTTP {r.status}: {r.text.strip()[:200]}" if r.status else f"no answer ({r.text})"
