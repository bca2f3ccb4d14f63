#!/usr/bin/python
"""Fetch model weights into shared storage: resumable, retried, verified.

Files land as ``<file>.part`` and are renamed into place only after their
size and sha256 match the source's manifest, so a partial file is never taken
for a complete one.  The module never deletes a complete file: a corrupted
one is replaced by a verified download (rename over it), and files it does
not know are left alone.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import time
import urllib.error
import urllib.request

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: flagops_weights
short_description: Resumable, verified model download to shared storage
options:
  source:
    type: dict
    required: true
    description:
      - "{type: http, url: <base>/} reads <base>manifest.json ({files: [{path, size, sha256}]})."
      - "{type: modelscope, id: <org/name>, revision: master} lists files with the ModelScope SDK."
  dest: {type: path, required: true, description: model directory on shared storage}
  token: {type: str, no_log: true, description: hub token (ModelScope), never logged}
  retries: {type: int, default: 5, description: attempts per request}
  backoff_s: {type: float, default: 2.0, description: first retry delay, doubled each time}
  verify: {type: str, default: quick, choices: [quick, full], description: quick trusts a file whose size and mtime match the last verified record}
  chunk_bytes: {type: int, default: 4194304}
"""

MARKER = ".flagops-weights.json"


class Failure(Exception):
    pass


def _sha256(path, chunk):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


class Fetcher:
    def __init__(self, params, headers):
        self.retries = max(1, params["retries"])
        self.backoff = params["backoff_s"]
        self.chunk = params["chunk_bytes"]
        self.headers = headers
        self.attempts = 0

    def _retrying(self, what, fn):
        delay = self.backoff
        for attempt in range(1, self.retries + 1):
            self.attempts += 1
            try:
                return fn()
            except (urllib.error.URLError, OSError, ConnectionError) as exc:
                if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                    raise
                if isinstance(exc, urllib.error.HTTPError) and 400 <= exc.code < 500 and exc.code not in (408, 429):
                    raise Failure("%s: HTTP %d %s (not retried)" % (what, exc.code, exc.reason))
                if attempt == self.retries:
                    raise Failure("%s: %s after %d attempts" % (what, exc, attempt))
                time.sleep(delay)
                delay *= 2

    def get_json(self, url):
        def go():
            req = urllib.request.Request(url, headers=self.headers)
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.load(r)
        return self._retrying(f"GET {url}", go)

    def download(self, url, part, size):
        """Append to ``part`` from where it stops until it holds ``size`` bytes."""
        def go():
            have = os.path.getsize(part) if os.path.exists(part) else 0
            if have > size:
                os.unlink(part)  # our own partial file, longer than the source: start over
                have = 0
            if have == size:
                return
            headers = dict(self.headers)
            if have:
                headers["Range"] = "bytes=%d-" % have
            req = urllib.request.Request(url, headers=headers)
            with urllib.request.urlopen(req, timeout=60) as r:
                if have and r.status != 206:
                    have = 0  # the server ignored Range: rewrite from the start
                with open(part, "ab" if have else "wb") as out:
                    while True:
                        b = r.read(self.chunk)
                        if not b:
                            break
                        out.write(b)
            if os.path.getsize(part) != size:
                raise ConnectionError("short read: %d of %d bytes" % (os.path.getsize(part), size))
        return self._retrying(f"download {url}", go)


def _http_listing(src, fetcher):
    base = src["url"] if src["url"].endswith("/") else src["url"] + "/"
    man = fetcher.get_json(base + "manifest.json")
    files = [{"path": f["path"], "size": int(f["size"]), "sha256": f["sha256"], "url": base + f["path"]} for f in man["files"]]
    return files


def _modelscope_listing(src, token):
    # Imported here: only the master needs the SDK, and only for this source.
    from modelscope.hub.api import HubApi
    from modelscope.hub.file_download import get_file_download_url

    api = HubApi()
    if token:
        api.login(token)
    rev = src.get("revision") or "master"
    out = []
    for f in api.get_model_files(src["id"], revision=rev, recursive=True):
        if f.get("Type") == "tree":
            continue
        out.append({"path": f["Path"], "size": int(f["Size"]), "sha256": f.get("Sha256") or "",
                    "url": get_file_download_url(src["id"], f["Path"], rev)})
    return out


def main():
    module = AnsibleModule(
        argument_spec=dict(
            source=dict(type="dict", required=True),
            dest=dict(type="path", required=True),
            token=dict(type="str", no_log=True),
            retries=dict(type="int", default=5),
            backoff_s=dict(type="float", default=2.0),
            verify=dict(type="str", default="quick", choices=["quick", "full"]),
            chunk_bytes=dict(type="int", default=4 << 20),
        ),
        supports_check_mode=True,
    )
    p = module.params
    src, dest = p["source"], p["dest"]
    headers = {"User-Agent": "flagops-weights"}
    if p["token"]:
        headers["Authorization"] = "Bearer " + p["token"]
    fetcher = Fetcher(p, headers)
    result = {"changed": False, "dest": dest, "downloaded": [], "resumed": [], "replaced_corrupt": [], "verified": 0}
    try:
        if src.get("type") == "http":
            files = _http_listing(src, fetcher)
        elif src.get("type") == "modelscope":
            files = _modelscope_listing(src, p["token"])
        else:
            raise Failure("source.type must be http or modelscope, got {!r}".format(src.get("type")))
    except Failure as exc:
        module.fail_json(msg="weights: cannot list {}: {}".format(src.get("url") or src.get("id"), exc), **result)
    except ImportError:
        module.fail_json(msg="weights: the ModelScope SDK is not importable on this host; the role installs it into a venv first", **result)

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
                if trusted or not f["sha256"] or _sha256(path, p["chunk_bytes"]) == f["sha256"]:
                    record["files"][f["path"]] = {"size": st.st_size, "sha256": f["sha256"], "mtime": int(st.st_mtime)}
                    result["verified"] += 1
                    continue
            todo.append(dict(f, why="corrupt"))
        elif os.path.exists(path + ".part"):
            todo.append(dict(f, why="resume"))
        else:
            todo.append(dict(f, why="missing"))

    need = sum(f["size"] - (os.path.getsize(os.path.join(dest, f["path"]) + ".part")
                            if os.path.exists(os.path.join(dest, f["path"]) + ".part") else 0) for f in todo)
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
        for f in todo:
            path = os.path.join(dest, f["path"])
            part = path + ".part"
            os.makedirs(os.path.dirname(path), exist_ok=True)
            (result["resumed"] if f["why"] == "resume" else result["downloaded"]).append(f["path"])
            for _attempt in (1, 2):
                try:
                    fetcher.download(f["url"], part, f["size"])
                except OSError as exc:
                    if exc.errno == errno.ENOSPC:
                        module.fail_json(msg="weights: disk full on %s while writing %s: %d more bytes needed; the partial file stays as .part and is resumed next run" % (dest, part, f["size"] - os.path.getsize(part)), **result)
                    raise
                except Failure as exc:
                    module.fail_json(msg=f"weights: {exc} (partial data kept in {part}, the next run resumes)", **result)
                if not f["sha256"] or _sha256(part, p["chunk_bytes"]) == f["sha256"]:
                    break
                os.unlink(part)  # our own bad download: fetch once more from scratch
            else:
                module.fail_json(msg="weights: {}: sha256 mismatch twice; the source may be corrupt".format(f["url"]), **result)
            if f["why"] == "corrupt":
                result["replaced_corrupt"].append(f["path"])
            os.replace(part, path)
            st = os.stat(path)
            record["files"][f["path"]] = {"size": st.st_size, "sha256": f["sha256"], "mtime": int(st.st_mtime)}
            result["changed"] = True
        result["msg"] = "fetched %d files into %s" % (len(todo), dest)

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
    result["attempts"] = fetcher.attempts
    module.exit_json(**result)


if __name__ == "__main__":
    main()
