"""Integration tests run against the real lab (`flagops lab up`), over real ssh.

They use the developer's lab under ``$FLAGOPS_HOME`` (default ``~/.flagops``), the one
``inventories/lab.yaml`` points at, not the per-test home of the unit tests.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from flagops.lab.nodes import NODES, Node
from flagops.lab.paths import LabPaths


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "lab: needs the local lab (`flagops lab up`)")
    config.addinivalue_line("markers", "slow: minutes, not seconds (full serving proofs)")
    config.addinivalue_line("markers", "bastion: the lab in bastion mode (nodes only through a jump host)")


@dataclass(frozen=True)
class Lab:
    paths: LabPaths
    facts: dict[str, Any]

    @staticmethod
    def flagops(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """The real CLI in a subprocess, as a user's shell runs it."""
        argv = [sys.executable, "-m", "flagops", *args]
        done = subprocess.run(argv, capture_output=True, text=True)
        if check and done.returncode != 0:
            tail = done.stderr[-3000:]
            raise AssertionError(f"flagops {' '.join(args)} exited {done.returncode}:\n{tail}")
        return done

    def ssh_argv(self, node: Node, command: str) -> list[str]:
        """ssh as root to ``node`` with the lab key; host keys come only from the pinned file."""
        return [
            "ssh",
            "-i",
            str(self.paths.ssh_key),
            "-o",
            f"UserKnownHostsFile={self.paths.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=10",
            f"root@{node.ip}",
            command,
        ]

    def ssh(self, node: Node, command: str, timeout: float = 120, stdin: str | None = None) -> str:
        """Run ``command`` (a shell line; quote values with shlex.quote) on ``node``; its stdout.
        ``stdin``: what the command reads (secrets go here, never into the command line)."""
        argv = self.ssh_argv(node, command)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=stdin)
        assert done.returncode == 0, f"{node.hostname}$ {command}\n{done.stdout}{done.stderr}"
        return done.stdout

    def kill_stage_workers(self, node: Node) -> list[int]:
        """kill -9 the pipeline stage's Ray worker processes in ``node``'s FlagOS container
        (ray titles them ray::RayWorker...); the pids killed."""
        find = ('for p in /proc/[0-9]*; do c=$(tr "\\0" " " < $p/cmdline 2>/dev/null); '
                'case "$c" in "ray::RayWorker"*) echo ${p#/proc/};; esac; done; true')
        pids = [int(p) for p in self.ssh(node, f"docker exec flagos sh -c {shlex.quote(find)}").split()]
        assert pids, f"no Ray engine worker in {node.hostname}'s container"
        self.ssh(node, "docker exec flagos kill -9 " + " ".join(map(str, pids)))
        return pids

    def pull(self, node: Node, ref: str, timeout: float = 600) -> str:
        """``docker pull ref`` on ``node`` with the lab registry's login, as the image role
        pulls: a throwaway DOCKER_CONFIG, the password on stdin, the directory removed after."""
        from flagops.lab import services

        q = shlex.quote
        script = (f"d=$(mktemp -d /dev/shm/flagops-docker-XXXXXX) && trap 'rm -rf \"$d\"' EXIT && "
                  f"DOCKER_CONFIG=$d docker login -u {q(services.REGISTRY_USER)} --password-stdin "
                  f"{q(services.GATEWAY)}:{services.REGISTRY_PORT} >/dev/null && "
                  f"DOCKER_CONFIG=$d docker pull -q {q(ref)}")
        return self.ssh(node, script, timeout=timeout, stdin=services.registry_password(self.paths) + "\n")


@pytest.fixture
def flagops_home() -> Path:
    """Overrides the unit tests' isolated home: the lab lives in the real one."""
    home = Path(os.environ.get("FLAGOPS_HOME") or Path.home() / ".flagops").expanduser()
    os.environ["FLAGOPS_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def lab() -> Lab:
    """`flagops lab up` once per session; its --json report holds the facts the tests check."""
    done = Lab.flagops("lab", "up", "--json")
    report = json.loads(done.stdout)
    assert report["ok"], report
    # the lab inventory reads the hub token from the environment, as on a real cluster: with
    # it, every provision logs in to the lab's ModelScope hub through the SDK
    token_file = LabPaths.default().root / "hub" / "token"
    if token_file.is_file():
        os.environ.setdefault("MODELSCOPE_API_TOKEN", token_file.read_text().strip())
    # the lab registry needs a login: the lab inventory reads its password from the environment
    from flagops.lab import services

    os.environ.setdefault(services.REGISTRY_PASSWORD_ENV, services.registry_password(LabPaths.default()))
    return Lab(LabPaths.default(), report)


@pytest.fixture(params=NODES, ids=[n.hostname for n in NODES])
def node(request: pytest.FixtureRequest) -> Node:
    return request.param
