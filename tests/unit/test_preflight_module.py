"""roles/preflight/library/flagops_preflight.py, run as Ansible runs it (a subprocess that
reads its arguments from a JSON file) on this machine, with temporary directories and a
real listening socket."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "roles" / "preflight" / "library" / "flagops_preflight.py"


def run_module(tmp_path: Path, **args: Any) -> dict[str, Any]:
    """The module's JSON result (old-style invocation: argv[1] is a file holding the args)."""
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    done = subprocess.run([sys.executable, str(MODULE), str(args_file)], capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"})
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert not result.get("failed"), result
    return result


def by_check(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["check"]: f for f in result["failures"]}


@pytest.fixture
def share(tmp_path: Path) -> Path:
    d = tmp_path / "share"
    d.mkdir()
    return d


@pytest.fixture
def fake_docker(tmp_path: Path) -> Path:
    """A `docker` on PATH that reports a server version, as the real client prints it."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "docker"
    exe.write_text("#!/bin/sh\n[ \"$1\" = version ] && { echo 24.0.7; exit 0; }\nexit 1\n")
    exe.chmod(0o755)
    return exe


def test_a_healthy_cpu_node_passes_and_reports_its_facts(tmp_path: Path, share: Path, fake_docker: Path) -> None:
    res = run_module(tmp_path, slot_type="cpu", slots=1, share_root=str(share), min_docker="20.10")
    assert res["failures"] == []
    assert res["changed"] is False
    facts = res["facts"]
    assert facts["docker"] == "24.0.7" and facts["gpu_count"] is None
    assert "skipped" in facts["gpu_checks"] and facts["share_free_bytes"] > 0


def test_every_problem_is_reported_at_once_with_found_required_fix(tmp_path: Path, share: Path,
                                                                   fake_docker: Path) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        res = run_module(tmp_path, slot_type="cpu", slots=1, share_root=str(share), min_docker="99.0",
                         required_bytes=10**18, ports=[port], nic="flagops-no-such-nic0")
    finally:
        holder.close()
    fails = by_check(res)
    assert {"docker", "share_free_space", f"port_{port}", "nic"} <= set(fails), fails
    assert fails["docker"]["found"] == "24.0.7" and fails["docker"]["required"] == ">= 99.0"
    assert "upgrade Docker" in fails["docker"]["fix"]
    assert f"pid {os.getpid()}" in str(fails[f"port_{port}"]["found"])
    for f in fails.values():
        assert f["fix"], f


def test_missing_docker_and_share_are_named(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()  # an empty PATH entry first; the real docker may exist later on PATH
    res = run_module(tmp_path, slot_type="cpu", slots=1, share_root=str(tmp_path / "nowhere"))
    fails = by_check(res)
    assert "share_root" in fails and "does not exist" in fails["share_root"]["found"]


def test_shared_storage_nonce_round_trip_leaves_nothing(tmp_path: Path, share: Path) -> None:
    nonce = {"path": str(share / ".flagops" / "preflight" / "nonce"), "content": "abc123"}
    run_module(tmp_path, slots=1, share_root=str(share), only_nonce=True, nonce_write=nonce)
    seen = run_module(tmp_path, slots=1, share_root=str(share), only_nonce=True, nonce_read=nonce)
    assert seen["facts"]["share_nonce_seen"] is True and seen["failures"] == []
    other = run_module(tmp_path, slots=1, share_root=str(share), only_nonce=True,
                       nonce_read={**nonce, "content": "different"})
    assert by_check(other)["share_is_shared"]["fix"].startswith("mount the same shared volume")
    run_module(tmp_path, slots=1, share_root=str(share), only_nonce=True, nonce_remove=nonce["path"])
    assert list(share.iterdir()) == []  # the nonce and the directories it needed are gone
