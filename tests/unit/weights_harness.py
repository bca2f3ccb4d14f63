"""Shared pieces of the weights module tests: a model on disk, the lab hub serving it, a module run."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "roles" / "weights" / "library" / "flagops_weights.py"
sys.path.insert(0, str(REPO / "flagops" / "lab"))
import hub as hubmod  # noqa: E402  (the lab hub runs as a plain script, so import it as one)


def make_model(root: Path, sizes: dict[str, int], seed: int = 1) -> list[dict]:
    """Files of pseudo-random bytes plus a manifest.json the hub and the http source read."""
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for i, (name, size) in enumerate(sorted(sizes.items())):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        block = hashlib.sha256(f"{seed}-{i}".encode()).digest() * 2048  # 64 KiB pattern per file
        with path.open("wb") as fh:
            left = size
            k = 0
            while left:
                chunk = (block[k % 7:] + block[: k % 7])[: min(len(block), left)]
                fh.write(chunk)
                left -= len(chunk)
                k += 1
        files.append({"path": name, "size": size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    (root / "manifest.json").write_text(json.dumps({"name": root.name, "files": files}))
    return files


class RunningHub:
    def __init__(self, models: dict[str, Path], **kw) -> None:
        self.hub = hubmod.Hub(("127.0.0.1", 0), models, **kw)
        self.thread = threading.Thread(target=self.hub.serve_forever, daemon=True)

    def __enter__(self) -> hubmod.Hub:
        self.thread.start()
        return self.hub

    def __exit__(self, *exc: object) -> None:
        self.hub.shutdown()
        self.hub.server_close()


def run_module(args: dict, tmp: Path, *, check: bool = False, diff: bool = False, wait: bool = True,
               env: dict | None = None, python: str | None = None):
    """The module as Ansible runs it: a process reading ANSIBLE_MODULE_ARGS from a file."""
    spec = dict(args, _ansible_check_mode=check, _ansible_diff=diff)
    argfile = tmp / f"args-{os.getpid()}-{id(spec)}.json"
    argfile.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": spec}))
    proc = subprocess.Popen([python or sys.executable, str(MODULE), str(argfile)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, **(env or {})))
    if not wait:
        return proc
    out, err = proc.communicate(timeout=300)
    try:
        return json.loads(out[out.index("{"):])
    except ValueError as exc:
        raise AssertionError(f"no JSON from the module:\n{out[-2000:]}\n{err[-3000:]}") from exc
