#!/usr/bin/python
"""Fetch model weights into shared storage: parallel, resumable, retried, verified.

Files land as ``<file>.part`` and are renamed into place only after their size and sha256
match the source's listing, so a partial file is never taken for a complete one. Several
files download at once and a big file is split into ranges (``concurrency`` connections,
``part_bytes`` per range); each connection holds one ``chunk_bytes`` buffer, so memory stays
bounded whatever the model's size. The sha256 is computed while the bytes are written: the
range at the hash frontier is hashed from the buffer, ranges that finish ahead of it are
hashed once from the page cache when the frontier reaches them, so a file is never read
back in a separate pass. ``<file>.part.state`` records which byte ranges of the ``.part``
are on disk (checkpointed a few times a second), so a run killed at any point resumes with
Range requests for the rest, and hashes the part it already has once.

The module never deletes a complete file: a corrupted one is replaced by a verified download
(rename over it), and files it does not know are left alone. While it runs it rewrites
``progress_file`` (bytes done/total, rate, ETA) at most ``progress_interval_s`` apart, for the
driver to show.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import os
import socket
import ssl
import struct
import tempfile
import threading
import time
import urllib.parse

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: flagops_weights
short_description: Parallel, resumable, verified model download to shared storage
options:
  source:
    type: dict
    required: true
    description:
      - "{type: http, url: <base>/} reads <base>manifest.json ({files: [{path, size, sha256}]})."
      - "{type: modelscope, id: <org/name>, revision: master} lists files with the ModelScope SDK;
        domain sets MODELSCOPE_DOMAIN (the SDK's own setting), ca_bundle the CA file to trust."
  dest: {type: path, required: true, description: model directory on shared storage}
  token: {type: str, no_log: true, description: hub token (ModelScope), never logged}
  retries: {type: int, default: 5, description: attempts per request}
  backoff_s: {type: float, default: 2.0, description: first retry delay, doubled each time}
  verify: {type: str, default: quick, choices: [quick, full], description: quick trusts a file whose size and mtime match the last verified record}
  chunk_bytes: {type: int, default: 1048576, description: read buffer per connection}
  part_bytes: {type: int, default: 67108864, description: a file bigger than this is fetched as ranges of this size}
  concurrency: {type: int, default: 8, description: connections at once (files and ranges)}
  timeout_s: {type: float, default: 60, description: socket timeout per request}
  progress_file: {type: path, description: JSON progress record rewritten while downloading}
  progress_interval_s: {type: float, default: 0.5}
"""

MARKER = ".flagops-weights.json"
STATE = ".state"  # <file>.part.state


class Failure(Exception):
    pass


class Retry(Exception):
    pass


class DiskFull(Exception):
    def __init__(self, part, need):
        super().__init__(part)
        self.part, self.need = part, need


def _sha256(path, chunk):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


# ---------------------------------------------------------------- byte ranges
def _add(ext, s, e):
    """Merge [s, e) into the sorted, disjoint list ``ext`` (in place)."""
    if e <= s:
        return
    out = []
    placed = False
    for a, b in ext:
        if b < s:
            out.append([a, b])
        elif e < a:
            if not placed:
                out.append([s, e])
                placed = True
            out.append([a, b])
        else:
            s, e = min(a, s), max(b, e)
    if not placed:
        out.append([s, e])
    out.sort()
    ext[:] = out


def _end_from(ext, pos):
    """The end of the extent holding ``pos`` (``pos`` itself when none does)."""
    for a, b in ext:
        if a <= pos < b:
            return b
    return pos


def _gaps(ext, size):
    out, pos = [], 0
    for a, b in ext:
        if a > pos:
            out.append((pos, a))
        pos = max(pos, b)
    if pos < size:
        out.append((pos, size))
    return out


def _covered(ext):
    return sum(b - a for a, b in ext)


# ---------------------------------------------------------------- HTTP
class Client:
    """One keep-alive connection per host for one worker thread; follows redirects."""

    def __init__(self, headers, timeout, context):
        self.headers = headers
        self.timeout = timeout
        self.context = context
        self.conns = {}

    def close(self):
        for c in self.conns.values():
            with contextlib.suppress(Exception):
                c.close()
        self.conns.clear()

    def get(self, url, extra=None, method="GET", body=None):
        headers = dict(self.headers, **(extra or {}))
        origin = urllib.parse.urlsplit(url).netloc
        for _hop in range(6):
            u = urllib.parse.urlsplit(url)
            key = (u.scheme, u.netloc)
            conn = self.conns.get(key)
            if conn is None:
                cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
                kw = {"context": self.context} if u.scheme == "https" else {}
                conn = self.conns[key] = cls(u.netloc, timeout=self.timeout, **kw)
            target = (u.path or "/") + ("?" + u.query if u.query else "")
            if u.netloc != origin:  # never send the hub's credentials to another host
                headers = {k: v for k, v in headers.items() if k.lower() not in ("authorization", "cookie")}
            try:
                conn.request(method, target, body=body, headers=headers)
                resp = conn.getresponse()
            except Exception:
                conn.close()
                self.conns.pop(key, None)
                raise
            if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                resp.read()
                url = urllib.parse.urljoin(url, resp.getheader("Location"))
                continue
            return resp
        raise Failure(f"GET {url}: too many redirects")

    def drop(self, url):
        u = urllib.parse.urlsplit(url)
        conn = self.conns.pop((u.scheme, u.netloc), None)
        if conn is not None:
            conn.close()


def _status_failure(resp, what, url, hub_hint):
    code = resp.status
    if code in (401, 403):
        return Failure("%s: %s refused the credentials (HTTP %d); %s" % (what, urllib.parse.urlsplit(url).netloc, code, hub_hint))
    if code == 404:
        return Failure(f"{what}: not found on the source (HTTP 404 at {url})")
    return Failure("%s: HTTP %d %s at %s (not retried)" % (what, code, resp.reason, url))


RETRYABLE = (408, 425, 429, 500, 502, 503, 504)
NET_ERRORS = (OSError, http.client.HTTPException, ssl.SSLError, socket.timeout)


# ---------------------------------------------------------------- progress
class Progress:
    def __init__(self, path, interval, total, files_total):
        self.path = path
        self.interval = interval
        self.total = total
        self.done = 0
        self.files_total = files_total
        self.files_done = 0
        self.t0 = time.monotonic()
        self.last_write = 0.0
        self.samples = [(self.t0, 0)]
        self.lock = threading.Lock()
        self.current = ""
        self.write(force=True)

    def add(self, n, name):
        with self.lock:
            self.done += n
            self.current = name
        self.write()

    def file_done(self):
        with self.lock:
            self.files_done += 1
        self.write()

    def snapshot(self):
        now = time.monotonic()
        with self.lock:
            self.samples.append((now, self.done))
            while len(self.samples) > 2 and now - self.samples[0][0] > 5:
                self.samples.pop(0)
            t, d = self.samples[0]
            rate = (self.done - d) / (now - t) if now > t else 0.0
            left = self.total - self.done
            return {"bytes_done": self.done, "bytes_total": self.total, "rate_Bps": round(rate),
                    "eta_s": round(left / rate, 1) if rate > 0 else None, "files_done": self.files_done,
                    "files_total": self.files_total, "file": self.current, "elapsed_s": round(now - self.t0, 1),
                    "pid": os.getpid(), "finished": False}

    def write(self, force=False, finished=False):
        if not self.path:
            return
        now = time.monotonic()
        if not force and now - self.last_write < self.interval:
            return
        self.last_write = now
        snap = self.snapshot()
        snap["finished"] = finished
        tmp = "%s.%d.tmp" % (self.path, threading.get_ident())
        try:
            with open(tmp, "w") as fh:
                json.dump(snap, fh)
            os.replace(tmp, self.path)
        except OSError:
            pass  # progress is best effort; the download is what matters


# ---------------------------------------------------------------- one file
HEADER = 4096  # the state file: a JSON header padded to 4 KiB, then one u64 per cell


class FileJob:
    """One file being fetched into ``<path>.part``: its cells on disk and its running hash.

    The file is a grid of cells of ``cell`` bytes; each cell is fetched by one request,
    front to back. ``<path>.part.state`` holds, per cell, how many of its bytes are on
    disk, updated (one 8-byte pwrite) after every data write, so after a SIGKILL the
    next run knows exactly which bytes it has and asks only for the rest.
    """

    def __init__(self, f, dest, chunk, cell):
        self.f = f
        self.size = f["size"]
        self.path = os.path.join(dest, f["path"])
        self.part = self.path + ".part"
        self.state = self.part + STATE
        self.chunk = chunk
        self.lock = threading.Lock()
        self.open_lock = threading.Lock()
        self.pending = 0
        self.finished = False
        self.restarted = False
        self.fd = self.sfd = None
        self.cell, self.counts = self._load(cell)
        self.resumed_bytes = sum(self.counts)

    def _grid(self, cell):
        cell = max(1, min(cell, self.size or 1))
        return cell, [0] * max(1, -(-self.size // cell))

    def _load(self, cell):
        if not os.path.exists(self.part):
            return self._grid(cell)
        have = os.path.getsize(self.part)
        try:
            with open(self.state, "rb") as fh:
                raw = fh.read()
            head = json.loads(raw[:HEADER].split(b"\n", 1)[0])
            if head.get("size") == self.size and head.get("sha256") == self.f["sha256"]:
                c, counts = self._grid(int(head["cell"]))
                body = raw[HEADER:HEADER + 8 * len(counts)]
                for i in range(min(len(counts), len(body) // 8)):
                    n = struct.unpack_from("<Q", body, 8 * i)[0]
                    lo = i * c
                    counts[i] = max(0, min(n, min(c, self.size - lo), have - lo))
                return c, counts
            return self._grid(cell)  # the source changed: start over
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            pass
        c, counts = self._grid(cell)  # a sequential .part (no state): its bytes are a prefix
        if have <= self.size:
            for i in range(len(counts)):
                counts[i] = max(0, min(c, self.size - i * c, have - i * c))
        return c, counts

    def start_over(self, cell):
        self.cell, self.counts = self._grid(cell)
        self.resumed_bytes = 0

    def _write_state(self):
        head = json.dumps({"size": self.size, "sha256": self.f["sha256"], "cell": self.cell}).encode() + b"\n"
        blob = head.ljust(HEADER, b" ") + b"".join(struct.pack("<Q", n) for n in self.counts)
        tmp = self.state + ".tmp"
        with open(tmp, "wb") as fh:
            fh.write(blob)
        os.replace(tmp, self.state)
        self.sfd = os.open(self.state, os.O_RDWR)

    def pieces(self):
        """The (start, end) ranges still to fetch: the rest of each cell."""
        return [(i * self.cell + n, min(self.size, (i + 1) * self.cell))
                for i, n in enumerate(self.counts) if i * self.cell + n < min(self.size, (i + 1) * self.cell)]

    def ensure_open(self):
        """Opened by the first worker that needs it: files not reached yet are not touched."""
        with self.open_lock:
            if self.fd is None and not self.finished:
                self.open()

    def open(self):
        """Open the .part, hash the prefix already on disk once."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._write_state()
        self.fd = os.open(self.part, os.O_RDWR | os.O_CREAT, 0o644)
        if not any(self.counts):
            os.ftruncate(self.fd, 0)
        self.h = hashlib.sha256()
        self.hash_pos = 0
        self.hashing = False
        self.written = []
        for i, n in enumerate(self.counts):
            _add(self.written, i * self.cell, i * self.cell + n)
        self._catch_up(0)

    def _catch_up(self, pos):
        """Hash from ``pos`` over every byte already on disk (by the frontier's owner)."""
        while True:
            with self.lock:
                self.hash_pos = pos
                end = _end_from(self.written, pos)
                if end <= pos:
                    self.hashing = False
                    return
                self.hashing = True
            while pos < end:
                b = os.pread(self.fd, min(self.chunk, end - pos), pos)
                if not b:
                    raise Failure("%s: short read at %d" % (self.part, pos))
                self.h.update(b)
                pos += len(b)

    def wrote(self, off, mv):
        """``mv`` is on disk at ``off``: record it (state), hash it if it is at the frontier."""
        n = len(mv)
        i = off // self.cell
        self.counts[i] = off + n - i * self.cell
        os.pwrite(self.sfd, struct.pack("<Q", self.counts[i]), HEADER + 8 * i)
        with self.lock:
            _add(self.written, off, off + n)
            if self.hashing or off != self.hash_pos:
                return
            self.hashing = True
        self.h.update(mv)
        self._catch_up(off + n)

    def complete(self):
        with self.lock:
            return self.pending == 0 and not self.hashing and self.hash_pos == self.size and not self.finished

    def reset(self):
        """A bad download of ours: forget its bytes and fetch it whole once more."""
        with self.lock:
            self.counts = [0] * len(self.counts)
            self.written = []
            self.h = hashlib.sha256()
            self.hash_pos = 0
            self.restarted = True
        os.ftruncate(self.fd, 0)
        os.close(self.sfd)
        self._write_state()

    def close(self):
        for name in ("fd", "sfd"):
            fd = getattr(self, name, None)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)


# ---------------------------------------------------------------- the pool
class Downloader:
    def __init__(self, p, headers, context, hub_hint, dest):
        self.retries = max(1, p["retries"])
        self.backoff = p["backoff_s"]
        self.chunk = max(64 << 10, p["chunk_bytes"])
        self.part_bytes = max(self.chunk, p["part_bytes"])
        self.workers = max(1, p["concurrency"])
        self.timeout = p["timeout_s"]
        self.headers = headers
        self.context = context
        self.hub_hint = hub_hint
        self.dest = dest
        self.attempts = 0
        self.fetched = 0
        self.lock = threading.Lock()
        self.abort = threading.Event()
        self.error = None
        self.queue = []
        self.cv = threading.Condition(self.lock)
        self.active = 0
        self.ranges_ok = True
        self.notes = []

    def client(self):
        return Client(self.headers, self.timeout, self.context)

    def retrying(self, what, fn):
        delay = self.backoff
        for attempt in range(1, self.retries + 1):
            with self.lock:
                self.attempts += 1
            try:
                return fn()
            except (Retry, *NET_ERRORS) as exc:
                if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                    raise
                if attempt == self.retries or self.abort.is_set():
                    raise Failure("%s: %s after %d attempts" % (what, exc or type(exc).__name__, attempt)) from None
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def get_json(self, url):
        cl = self.client()

        def go():
            resp = cl.get(url)
            body = resp.read()
            if resp.status in RETRYABLE:
                raise Retry("HTTP %d" % resp.status)
            if resp.status != 200:
                raise _status_failure(resp, "GET " + url, url, self.hub_hint)
            return json.loads(body)
        try:
            return self.retrying(f"GET {url}", go)
        finally:
            cl.close()

    def probe_ranges(self, url):
        """Does the server answer Range requests with 206?  (One tiny request per run.)"""
        cl = self.client()

        def go():
            resp = cl.get(url, {"Range": "bytes=0-0"})
            if resp.status in RETRYABLE:
                resp.read()
                raise Retry("HTTP %d" % resp.status)
            if resp.status not in (200, 206):
                raise _status_failure(resp, "GET " + url, url, self.hub_hint)
            ok = resp.status == 206
            cl.close()  # do not read a whole file the server sent instead of one byte
            return ok
        try:
            return self.retrying(f"GET {url}", go)
        finally:
            cl.close()

    # ---- scheduling
    def run(self, jobs, progress):
        for job in jobs:
            pieces = job.pieces()
            job.pending = len(pieces)
            self.queue += [(job, a, b) for a, b in pieces]
            if not pieces:  # every byte is on disk already (a run killed before its rename)
                job.open()
                self.try_finish(job, progress)
        threads = [threading.Thread(target=self.worker, args=(progress,), daemon=True) for _ in range(self.workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for job in jobs:
            job.close()
        if self.error is not None:
            raise self.error

    def fail(self, exc):
        with self.lock:
            if self.error is None:
                self.error = exc
        self.abort.set()

    def worker(self, progress):
        cl = self.client()
        try:
            while not self.abort.is_set():
                with self.lock:
                    if not self.queue:
                        return
                    job, s, e = self.queue.pop(0)
                try:
                    job.ensure_open()
                    self.fetch(cl, job, s, e, progress)
                    with job.lock:
                        job.pending -= 1
                    self.try_finish(job, progress)
                except Exception as exc:  # the first failure stops every worker
                    self.fail(exc)
        finally:
            cl.close()

    def fetch(self, cl, job, s, e, progress):
        pos = [s]
        buf = bytearray(self.chunk)
        mv = memoryview(buf)
        name = job.f["path"]

        def go():
            start = pos[0]
            if start >= e:
                return
            whole = start == 0 and e == job.size
            extra = {} if (whole and start == 0 and not self.ranges_ok) else {
                "Range": "bytes=%d-%s" % (start, "" if e == job.size else e - 1)}
            resp = cl.get(job.f["url"], extra)
            if resp.status in RETRYABLE:
                resp.read()
                raise Retry("HTTP %d" % resp.status)
            skip = 0
            if resp.status == 200 and extra:
                skip = start  # the server ignored Range: read past what we have
                if start:
                    self.note("%s: the server ignored Range; read %d bytes it had already sent" % (name, start))
            elif resp.status not in (200, 206):
                resp.read()
                raise _status_failure(resp, "download " + name, job.f["url"], self.hub_hint)
            try:
                while skip:
                    n = resp.readinto(mv[:min(len(buf), skip)])
                    if not n:
                        raise Retry("connection closed after %d of %d bytes" % (pos[0] - s, e - s))
                    skip -= n
                while pos[0] < e:
                    if self.abort.is_set():
                        cl.drop(job.f["url"])
                        raise Failure("stopped")
                    want = min(len(buf), e - pos[0])
                    n = 0
                    while n < want:  # a full buffer per write: fewer syscalls and hash calls
                        got = resp.readinto(mv[n:want])
                        if not got:
                            break
                        n += got
                    if not n:
                        raise Retry("connection closed after %d of %d bytes" % (pos[0] - s, e - s))
                    try:
                        os.pwrite(job.fd, mv[:n], pos[0])
                    except OSError as exc:
                        if exc.errno == errno.ENOSPC:
                            raise DiskFull(job.part, job.size - sum(job.counts)) from None
                        raise
                    job.wrote(pos[0], mv[:n])
                    pos[0] += n
                    with self.lock:
                        self.fetched += n
                    progress.add(n, name)
            except NET_ERRORS:
                cl.drop(job.f["url"])
                raise
            if resp.length:  # the server sent more than this range: do not reuse the connection
                cl.drop(job.f["url"])
        self.retrying("download {}".format(job.f["url"]), go)

    def note(self, text):
        with self.lock:
            if text not in self.notes:
                self.notes.append(text)

    def try_finish(self, job, progress):
        if not job.complete():
            return
        with job.lock:
            if job.finished:
                return
            job.finished = True
        digest = job.h.hexdigest()
        if job.f["sha256"] and digest != job.f["sha256"]:
            if job.restarted:
                raise Failure("{}: sha256 mismatch twice; the source may be corrupt".format(job.f["url"]))
            job.reset()
            with job.lock:
                job.finished = False
                job.pending = 1
            with self.lock:
                self.queue.append((job, 0, job.size))
            return
        os.fsync(job.fd)
        os.replace(job.part, job.path)
        with contextlib.suppress(OSError):
            os.unlink(job.state)
        job.close()
        progress.file_done()


# ---------------------------------------------------------------- listings
def _http_listing(src, dl):
    base = src["url"] if src["url"].endswith("/") else src["url"] + "/"
    man = dl.get_json(base + "manifest.json")
    return [{"path": f["path"], "size": int(f["size"]), "sha256": f["sha256"],
             "url": base + "/".join(urllib.parse.quote(x) for x in f["path"].split("/"))} for f in man["files"]]


def _modelscope_listing(src, token, tmpdir):
    """List with the SDK itself (login, revision, files), as ``modelscope download`` does."""
    if src.get("domain"):
        os.environ["MODELSCOPE_DOMAIN"] = src["domain"]
    if src.get("ca_bundle"):
        os.environ["REQUESTS_CA_BUNDLE"] = src["ca_bundle"]
    # the SDK saves login cookies and tokens; keep them in a private temp dir, removed after
    os.environ["MODELSCOPE_CREDENTIALS_PATH"] = os.path.join(tmpdir, "credentials")
    os.environ.setdefault("MODELSCOPE_CACHE", os.path.join(tmpdir, "cache"))
    import requests
    from modelscope.hub.api import HubApi
    from modelscope.hub.file_download import get_file_download_url

    api = HubApi()
    endpoint = api.endpoint
    hint = f"set MODELSCOPE_API_TOKEN (flagops_hub_token) to a valid ModelScope SDK token for {endpoint}"
    try:
        if token:
            api.login(token)
        cookies = api.get_cookies(access_token=token or None)
        rev = api.get_valid_revision(src["id"], revision=src.get("revision") or "master", cookies=cookies)
        listing = api.get_model_files(src["id"], revision=rev, recursive=True,
                                      use_cookies=False if cookies is None else cookies)
    except requests.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else None
        if code in (401, 403):
            raise Failure("the hub %s refused the token (HTTP %d); %s" % (endpoint, code, hint)) from None
        if code == 404:
            raise Failure("the hub {} has no model {} (HTTP 404)".format(endpoint, src["id"])) from None
        raise Failure(f"the hub {endpoint} answered HTTP {code}") from None  # never exc's text: it may hold the token
    except requests.RequestException as exc:
        raise Failure(f"cannot reach the hub {endpoint}: {type(exc).__name__}") from None
    except Exception as exc:  # the SDK's own errors (NotExistError, RequestError)
        text = str(exc).replace(token, "***") if token else str(exc)
        raise Failure(f"the hub {endpoint}: {text}") from None
    out = []
    for f in listing:
        if f.get("Type") == "tree":
            continue
        out.append({"path": f["Path"], "size": int(f["Size"]), "sha256": f.get("Sha256") or "",
                    "url": get_file_download_url(src["id"], f["Path"], rev, endpoint=endpoint)})
    return out, hint


def _fail_msg_partial(exc):
    return f"weights: {exc} (partial data kept as .part, the next run resumes)"


def main():
    started = time.monotonic()
    module = AnsibleModule(
        argument_spec=dict(
            source=dict(type="dict", required=True),
            dest=dict(type="path", required=True),
            token=dict(type="str", no_log=True),
            retries=dict(type="int", default=5),
            backoff_s=dict(type="float", default=2.0),
            verify=dict(type="str", default="quick", choices=["quick", "full"]),
            chunk_bytes=dict(type="int", default=1 << 20),
            part_bytes=dict(type="int", default=64 << 20),
            concurrency=dict(type="int", default=8),
            timeout_s=dict(type="float", default=60.0),
            progress_file=dict(type="path"),
            progress_interval_s=dict(type="float", default=0.5),
            plan_only=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )
    p = module.params
    src, dest, token = p["source"], p["dest"], p["token"] or ""
    headers = {"User-Agent": "flagops-weights"}
    context = ssl.create_default_context(cafile=src.get("ca_bundle") or None)
    result = {"changed": False, "dest": dest, "downloaded": [], "resumed": [], "replaced_corrupt": [], "verified": 0}
    tmpdir = tempfile.mkdtemp(prefix="flagops-weights-")
    try:
        hint = "set MODELSCOPE_API_TOKEN (flagops_hub_token) to a token the source accepts"
        if src.get("type") == "http":
            if token:
                headers["Authorization"] = "Bearer " + token
            dl = Downloader(p, headers, context, hint, dest)
            files = _http_listing(src, dl)
        elif src.get("type") == "modelscope":
            files, hint = _modelscope_listing(src, token, tmpdir)
            if token:
                headers["Cookie"] = "m_session_id=" + token  # what HubApi.get_cookies sends
            dl = Downloader(p, headers, context, hint, dest)
        else:
            raise Failure("source.type must be http or modelscope, got {!r}".format(src.get("type")))
    except Failure as exc:
        module.fail_json(msg="weights: cannot list {}: {}".format(src.get("url") or src.get("id"), exc), **result)
    except ImportError:
        module.fail_json(msg="weights: the ModelScope SDK is not importable on this host; the role installs it into a venv first", **result)
    finally:
        _rmtree(tmpdir)

    marker_path = os.path.join(dest, MARKER)
    try:
        with open(marker_path) as fh:
            record = json.load(fh)
    except (OSError, ValueError):
        record = {"files": {}}
    record_before = json.dumps(record, sort_keys=True)

    # Decide per file: ok, resume (a .part exists), fetch, or corrupt (complete file, wrong bytes).
    todo = []
    for f in files:
        path = os.path.join(dest, f["path"])
        rec = record["files"].get(f["path"])
        if os.path.exists(path):
            st = os.stat(path)
            if st.st_size == f["size"]:
                trusted = (p["verify"] == "quick" and rec and rec.get("sha256") == f["sha256"]
                           and rec.get("size") == st.st_size and rec.get("mtime") == int(st.st_mtime))
                if not trusted and p["plan_only"]:  # hashing it is the background job's work
                    todo.append(dict(f, why="unverified"))
                    continue
                if trusted or not f["sha256"] or _sha256(path, p["chunk_bytes"]) == f["sha256"]:
                    record["files"][f["path"]] = {"size": st.st_size, "sha256": f["sha256"], "mtime": int(st.st_mtime)}
                    result["verified"] += 1
                    continue
            todo.append(dict(f, why="corrupt"))
        elif os.path.exists(path + ".part"):
            todo.append(dict(f, why="resume"))
        else:
            todo.append(dict(f, why="missing"))

    if p["plan_only"] and todo:
        # The quick synchronous look found work (bytes to fetch or files to hash): say so and
        # leave everything as it is; the role then starts the download as a background job.
        result.update(needs_job=True, files_total=len(files), files_pending=len(todo),
                      msg="%d of %d files to fetch or verify in %s" % (len(todo), len(files), dest))
        module.exit_json(**result)
    result["needs_job"] = False
    jobs = [FileJob(f, dest, dl.chunk, dl.part_bytes) for f in todo]
    need = sum(j.size - j.resumed_bytes for j in jobs)
    result["bytes_to_fetch"] = need
    result["files_total"] = len(files)
    if module._diff:
        result["diff"] = {"before": "", "after": "".join("%s %s (%d bytes)\n" % (f["why"], f["path"], f["size"]) for f in todo)}
    if not todo:
        result["msg"] = "complete: %d files verified in %s" % (len(files), dest)
    elif module.check_mode:
        result["changed"] = True
        result["msg"] = "would fetch %d files (%d bytes)" % (len(todo), need)
    else:
        os.makedirs(dest, exist_ok=True)
        st = os.statvfs(dest)
        free = st.f_bavail * st.f_frsize
        if free < need:
            module.fail_json(msg="weights: not enough space on %s: %d bytes free, %d bytes needed; free space or move flagops_share_root" % (dest, free, need), **result)
        t0 = time.monotonic()
        try:
            split = [j for j in jobs if len(j.counts) > 1]
            if split:  # bounded ranges ahead: does the server answer them?
                dl.ranges_ok = dl.probe_ranges(split[0].f["url"])
        except Failure as exc:
            module.fail_json(msg=f"weights: {exc}", **result)
        if not dl.ranges_ok:
            dl.note("the source ignores Range requests: files are fetched whole, partial files start over")
            for j in jobs:
                j.start_over(j.size)
            result["bytes_to_fetch"] = need = sum(j.size for j in jobs)
        for j in jobs:
            (result["resumed"] if j.resumed_bytes else result["downloaded"]).append(j.f["path"])
        progress = Progress(p["progress_file"], p["progress_interval_s"], need, len(jobs))
        try:
            dl.run(jobs, progress)
        except DiskFull as exc:
            module.fail_json(msg="weights: disk full on %s while writing %s: %d more bytes needed; the partial file stays as .part and is resumed next run" % (dest, exc.part, exc.need), **_done(result, dl))
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                module.fail_json(msg=f"weights: disk full on {dest}: {exc}; the partial files stay as .part and are resumed next run", **_done(result, dl))
            module.fail_json(msg=_fail_msg_partial(exc), **_done(result, dl))
        except Failure as exc:
            module.fail_json(msg=_fail_msg_partial(exc), **_done(result, dl))
        progress.write(force=True, finished=True)
        for j in jobs:
            if j.f["why"] == "corrupt":
                result["replaced_corrupt"].append(j.f["path"])
            st = os.stat(j.path)
            record["files"][j.f["path"]] = {"size": st.st_size, "sha256": j.f["sha256"], "mtime": int(st.st_mtime)}
        result["changed"] = True
        secs = time.monotonic() - t0
        result["seconds"] = round(secs, 2)
        result["rate_Bps"] = round(dl.fetched / secs) if secs > 0 else None
        result["msg"] = "fetched %d files (%d bytes) into %s in %.1fs" % (len(todo), dl.fetched, dest, secs)
    result["bytes_fetched"] = dl.fetched
    if dl.notes:
        result["notes"] = dl.notes

    # Every shard the safetensors index names must be present.
    index = os.path.join(dest, "model.safetensors.index.json")
    if os.path.exists(index) and not (module.check_mode and todo):
        with open(index) as fh:
            shards = sorted(set(json.load(fh)["weight_map"].values()))
        missing = [s for s in shards if not os.path.exists(os.path.join(dest, s))]
        if missing:
            module.fail_json(msg="weights: shards named in model.safetensors.index.json are missing: {}".format(", ".join(missing)), **result)
        result["shards"] = len(shards)
    if not module.check_mode:
        listed = {f["path"] for f in files}
        record["files"] = {k: v for k, v in record["files"].items() if k in listed}
        record["complete"] = True
        if json.dumps(record, sort_keys=True) != record_before:
            tmp = marker_path + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(record, fh, indent=1, sort_keys=True)
            os.replace(tmp, marker_path)
    result["attempts"] = dl.attempts
    result["job_seconds"] = round(time.monotonic() - started, 2)
    module.exit_json(**result)


def _done(result, dl):
    return dict(result, bytes_fetched=dl.fetched, attempts=dl.attempts, notes=dl.notes)


def _rmtree(path):
    for root, dirs, names in os.walk(path, topdown=False):
        for n in names:
            os.unlink(os.path.join(root, n))
        for d in dirs:
            os.rmdir(os.path.join(root, d))
    os.rmdir(path)


if __name__ == "__main__":
    main()
