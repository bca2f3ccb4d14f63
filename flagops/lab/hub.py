"""The lab's ModelScope hub stand-in: the HTTP API the pinned ``modelscope`` SDK calls.

ModelScope itself cannot be reached from here, so the lab serves its models through the
same endpoints, read from the SDK's own source (``modelscope.hub.api.HubApi`` and
``modelscope.hub.file_download``), over HTTPS with a lab CA the nodes trust. The SDK is
pointed here with its own setting, ``MODELSCOPE_DOMAIN=172.30.0.1:8443``:

- ``POST /api/v1/login`` ``{"AccessToken": t}``: 200 with ``Data.AccessToken/Username/Email``
  and an ``m_session_id`` cookie, or 401 for a token the hub does not know (``HubApi.login``)
- ``GET /api/v1/models/<owner>/<name>``: the repo exists (``repo_exists``, ``get_model``)
- ``GET /api/v1/models/<id>/revisions``: ``Data.RevisionMap.Branches/Tags``
  (``get_valid_revision_detail``)
- ``GET /api/v1/models/<id>/repo/files?Revision=&Recursive=``: ``Data.Files``, each with
  ``Name, Path, Type, Size, Sha256`` (``get_model_files``)
- ``GET /api/v1/models/<id>/repo?Revision=&FilePath=``: the file's bytes, single ``Range``
  requests answered 206 (``get_file_download_url``, ``http_get_model_file``)

Authentication is the SDK's: a cookie ``m_session_id=<token>`` (``HubApi.get_cookies``) or
``Authorization: Bearer <token>``. Models are public: anonymous reads work, a wrong token is
refused with 401. Every body is a file of ``--model ID=DIR``; sizes and sha256 come from the
directory's ``manifest.json`` (``{"files": [{path, size, sha256}]}``) when it has one.

Bandwidth is capped per connection (``--rate-conn``) and for all connections together
(``--rate-total``), token buckets in bytes/s, so a benchmark can measure a client against a
known ceiling. ``Hub.faults`` lets tests inject the faults a real hub shows (5xx, a server that
ignores Range, a connection cut mid-file). Stdlib only: the lab starts it as a script.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import secrets
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MANIFEST = "manifest.json"
BLOCK = 256 * 1024


class Bucket:
    """A token bucket of ``rate`` bytes/s (burst: 1/20 s worth); ``rate`` 0 = unlimited."""

    def __init__(self, rate: float) -> None:
        self.rate = float(rate)
        self.burst = max(BLOCK, self.rate / 20)
        self.tokens = self.burst
        self.stamp = time.monotonic()
        self.lock = threading.Lock()

    def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        while True:
            with self.lock:
                now = time.monotonic()
                self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.tokens >= n or self.tokens >= self.burst:
                    self.tokens -= n
                    return
                wait = (n - self.tokens) / self.rate
            time.sleep(min(wait, 0.05))


class Model:
    """One repo: a directory, listed from its manifest (or hashed once, cached by mtime)."""

    def __init__(self, model_id: str, root: Path) -> None:
        self.id = model_id
        self.root = root
        self._files: list[dict] | None = None
        self._key: tuple | None = None
        self.lock = threading.Lock()

    def files(self) -> list[dict]:
        man = self.root / MANIFEST
        try:
            key = (man.stat().st_mtime_ns,) if man.is_file() else tuple(
                (p.as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                for p in sorted(self.root.rglob("*")) if p.is_file())
        except OSError:
            return []
        with self.lock:
            if self._files is not None and key == self._key:
                return self._files
            if man.is_file():
                entries = [{"path": f["path"], "size": int(f["size"]), "sha256": f["sha256"]}
                           for f in json.loads(man.read_text())["files"]]
            else:
                entries = [{"path": p.relative_to(self.root).as_posix(), "size": p.stat().st_size, "sha256": _sha256(p)}
                           for p in sorted(self.root.rglob("*")) if p.is_file()]
            self._files, self._key = entries, key
            return entries


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Faults:
    """What the hub does wrong, for tests: each counter is used up by matching requests."""

    def __init__(self) -> None:
        self.status: dict[str, list[int]] = {}  # file path -> HTTP codes to answer first, in turn
        self.ignore_range = False              # answer Range requests with 200 and the whole file
        self.cut_after: dict[str, int] = {}    # file path -> close the connection after N body bytes (once)
        self.lock = threading.Lock()

    def next_status(self, path: str) -> int | None:
        with self.lock:
            codes = self.status.get(path)
            return codes.pop(0) if codes else None

    def take_cut(self, path: str) -> int | None:
        with self.lock:
            return self.cut_after.pop(path, None)


class Hub(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, addr: tuple[str, int], models: dict[str, Path], *, tokens: set[str] | None = None,
                 context: ssl.SSLContext | None = None, rate_conn: float = 0, rate_total: float = 0) -> None:
        self.models = {k: Model(k, Path(v)) for k, v in models.items()}
        self.tokens = set(tokens or ())
        self.sessions: set[str] = set()
        self.context = context
        self.rate_conn = rate_conn
        self.total = Bucket(rate_total)
        self.faults = Faults()
        self.log: list[tuple[str, str, str | None, int]] = []  # method, path, Range, status
        self.bytes_sent = 0
        self.stat_lock = threading.Lock()
        super().__init__(addr, Handler)

    def get_request(self):  # TLS per connection, the handshake in the handler's thread
        sock, addr = super().get_request()
        if self.context is not None:
            sock = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def valid(self, token: str) -> bool:
        return token in self.tokens or token in self.sessions

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"{'https' if self.context else 'http'}://{host}:{port}"

    @property
    def domain(self) -> str:
        """What ``MODELSCOPE_DOMAIN`` must hold to reach this hub (host:port)."""
        host, port = self.server_address[:2]
        return f"{host}:{port}"


_MODEL = re.compile(r"^/api/v1/models/([^/]+)/([^/]+)(/revisions|/repo/files|/repo)?/?$")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Hub

    def log_message(self, fmt: str, *args: object) -> None:  # quiet; the hub keeps its own log
        pass

    def setup(self) -> None:
        super().setup()
        self.bucket = Bucket(self.server.rate_conn)

    def handle(self) -> None:
        try:
            if isinstance(self.connection, ssl.SSLSocket):
                self.connection.do_handshake()
            super().handle()
        except (ssl.SSLError, ConnectionError, TimeoutError, OSError):
            self.close_connection = True

    # --------------------------------------------------------------- helpers
    def _json(self, code: int, body: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self._record(code)
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, code: int, message: str) -> None:
        self._json(code, {"Code": code, "Success": False, "Message": message, "RequestId": secrets.token_hex(8)})

    def _record(self, code: int) -> None:
        with self.server.stat_lock:
            self.server.log.append((self.command, self.path, self.headers.get("Range"), code))

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        for part in self.headers.get("Cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == "m_session_id" and value:
                return value
        return None

    def _authorized(self) -> bool:
        token = self._token()
        if token is not None and not self.server.valid(token):
            self._error(401, "the access token is invalid or expired")
            return False
        return True

    # --------------------------------------------------------------- routes
    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if urllib.parse.urlsplit(self.path).path.rstrip("/") != "/api/v1/login":
            return self._error(404, f"no such endpoint: POST {self.path}")
        try:
            token = json.loads(raw or b"{}").get("AccessToken", "")
        except ValueError:
            return self._error(400, "body must be JSON {\"AccessToken\": ...}")
        if not token or token not in self.server.tokens:
            return self._error(401, "login failed: the access token is invalid")
        session = secrets.token_hex(16)
        self.server.sessions.add(session)
        data = {"AccessToken": "git-" + secrets.token_hex(8), "Username": "flagops-lab", "Email": "lab@flagops.invalid"}
        self._json(200, {"Code": 200, "Success": True, "Data": data, "Message": "success"},
                   {"Set-Cookie": f"m_session_id={session}; Path=/; HttpOnly; Secure"})

    def do_HEAD(self) -> None:
        self.do_GET(head=True)

    def do_GET(self, head: bool = False) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        m = _MODEL.match(url.path)
        if not m:
            return self._error(404, f"no such endpoint: GET {url.path}")
        model_id = f"{m.group(1)}/{m.group(2)}"
        if not self._authorized():
            return None
        model = self.server.models.get(model_id)
        if model is None:
            return self._error(404, f"The model: {model_id} does not exist")
        what = m.group(3) or ""
        revision = query.get("Revision") or "master"
        if what != "/revisions" and revision != "master":
            return self._error(404, f"The model: {model_id} has no revision: {revision}")
        if what == "":
            return self._json(200, {"Code": 200, "Success": True, "Data": {
                "Name": m.group(2), "Path": m.group(1), "ChineseName": "", "Visibility": 5, "Revision": "master"}})
        created = int(model.root.stat().st_mtime) if model.root.exists() else 0
        if what == "/revisions":
            branch = {"Revision": "master", "CreatedAt": created, "CreatedBy": "flagops-lab", "Message": "lab"}
            return self._json(200, {"Code": 200, "Success": True,
                                    "Data": {"RevisionMap": {"Branches": [branch], "Tags": []}}})
        files = model.files()
        if what == "/repo/files":
            root = query.get("Root") or ""
            out = [{"Name": f["path"].rsplit("/", 1)[-1], "Path": f["path"], "Type": "blob", "Size": f["size"],
                    "Sha256": f["sha256"], "Revision": "master", "Mode": "33188", "IsLFS": f["size"] > 1 << 20,
                    "CommittedDate": created}
                   for f in files if not root or f["path"].startswith(root.rstrip("/") + "/")]
            return self._json(200, {"Code": 200, "Success": True, "Data": {"Files": out, "LatestCommitter": None}})
        return self._file(model, files, query.get("FilePath", ""), head)

    def _file(self, model: Model, files: list[dict], rel: str, head: bool) -> None:
        entry = next((f for f in files if f["path"] == rel), None)
        path = (model.root / rel).resolve()
        if entry is None or not path.is_file() or model.root.resolve() not in path.parents:
            return self._error(404, f"file {rel!r} not found in {model.id}")
        forced = self.server.faults.next_status(rel)
        if forced:
            return self._error(forced, f"injected HTTP {forced}")
        size = path.stat().st_size
        start, end, code = 0, size - 1, 200
        rng = self.headers.get("Range")
        if rng and not self.server.faults.ignore_range:
            mr = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if not mr or (not mr.group(1) and not mr.group(2)):
                return self._error(416, f"bad Range {rng!r}")
            if mr.group(1):
                start = int(mr.group(1))
                end = min(int(mr.group(2)), size - 1) if mr.group(2) else size - 1
            else:
                start = max(0, size - int(mr.group(2)))
            if start >= size or start > end:
                self._record(416)
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            code = 206
        length = end - start + 1 if size else 0
        self._record(code)
        self.send_response(code)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Disposition", f"attachment; filename={rel.rsplit('/', 1)[-1]}")
        if code == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if head or not length:
            return None
        cut = self.server.faults.take_cut(rel)
        sent = 0
        with path.open("rb") as fh:
            fh.seek(start)
            left = length
            while left:
                n = min(BLOCK, left)
                if cut is not None and sent + n > cut:
                    n = cut - sent
                self.bucket.take(n)
                self.server.total.take(n)
                block = fh.read(n)
                if not block:
                    break
                self.wfile.write(block)
                sent += len(block)
                left -= len(block)
                with self.server.stat_lock:
                    self.server.bytes_sent += len(block)
                if cut is not None and sent >= cut:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return None
        return None


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def make_ca(out: Path, hosts: list[str], openssl: str = "openssl") -> None:
    """A lab CA (``ca.crt``) and a server certificate (``hub.crt``/``hub.key``) for ``hosts``.

    Kept when present and still naming every host; the CA key stays 0600 under ``out``.
    """
    import subprocess

    out.mkdir(parents=True, exist_ok=True)
    want = ",".join(f"IP:{h}" if re.fullmatch(r"[0-9.]+", h) else f"DNS:{h}" for h in hosts)
    san_file = out / "hub.san"
    if all((out / n).is_file() for n in ("ca.crt", "ca.key", "hub.crt", "hub.key")) and \
            san_file.is_file() and san_file.read_text().strip() == want:
        return

    def run(*argv: str) -> None:
        res = subprocess.run([openssl, *argv], capture_output=True, text=True, cwd=out)
        if res.returncode:
            raise RuntimeError(f"openssl {argv[0]} failed: {res.stderr.strip()[-500:]}")

    old = os.umask(0o077)
    try:
        run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "ca.key", "-out", "ca.crt", "-days", "3650", "-subj", "/CN=flagops lab CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "hub.key", "-out", "hub.csr", "-subj", f"/CN={hosts[0]}")
        (out / "hub.ext").write_text(
            f"subjectAltName={want}\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
            "extendedKeyUsage=serverAuth\nauthorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n")
        run("x509", "-req", "-in", "hub.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "hub.crt", "-days", "825", "-extfile", "hub.ext")
    finally:
        os.umask(old)
    (out / "ca.crt").chmod(0o644)
    san_file.write_text(want + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--listen", action="append", required=True, help="host:port (repeatable)")
    ap.add_argument("--model", action="append", default=[], help="owner/name=DIR (repeatable)")
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--token-file", help="file with one valid access token per line")
    ap.add_argument("--rate-conn", type=float, default=0, help="bytes/s per connection (0: unlimited)")
    ap.add_argument("--rate-total", type=float, default=0, help="bytes/s for all connections (0: unlimited)")
    args = ap.parse_args(argv)
    models = dict(m.split("=", 1) for m in args.model)
    tokens = set()
    if args.token_file:
        tokens = {t.strip() for t in Path(args.token_file).read_text().splitlines() if t.strip()}
    ctx = server_context(Path(args.cert), Path(args.key)) if args.cert else None
    hubs = []
    total = None
    for spec in args.listen:
        host, _, port = spec.rpartition(":")
        hub = Hub((host, int(port)), models, tokens=tokens, context=ctx,
                  rate_conn=args.rate_conn, rate_total=args.rate_total)
        if total is None:
            total = hub.total
        hub.total = total  # one aggregate cap across every listening address
        hubs.append(hub)
    for hub in hubs[1:]:
        threading.Thread(target=hub.serve_forever, daemon=True).start()
    print(f"hub: {', '.join(h.url for h in hubs)} models {sorted(models)}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        hubs[0].serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
