"""The host side: Debian packages the lab needs and the host Docker engine.

A Docker engine that already answers is used as it is and never reconfigured. When
none answers, the lab starts ``dockerd`` itself (log, pid and data under the lab dir
are recorded) and `lab down` stops only that one, by its recorded pid.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import docker
import docker.errors

from flagops.lab import LabError, Progress, procs
from flagops.lab.paths import LabPaths

# Executable -> the Debian package that provides it.
HOST_TOOLS = {
    "dockerd": "docker.io",
    "docker-registry": "docker-registry",
    "mmdebstrap": "mmdebstrap",
    "socat": "socat",
    "git": "git",
    "nginx": "nginx-light",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "openssl": "openssl",  # the lab CA and the hub's certificate (hub_lab.py)
}
# Executables in sbin, which a non-root PATH may lack.
_SBIN_PATHS = {"nginx": "/usr/sbin/nginx", "dockerd": "/usr/sbin/dockerd"}


def _have(tool: str) -> bool:
    return shutil.which(tool) is not None or os.access(_SBIN_PATHS.get(tool, "/nonexistent"), os.X_OK)


def missing_tools(tools: list[str] | None = None) -> list[str]:
    """The host tools (keys of HOST_TOOLS) that are not installed."""
    return [t for t in (tools or list(HOST_TOOLS)) if not _have(t)]


def ensure_apt_packages(tools: list[str], progress: Progress) -> None:
    """Install the Debian packages providing ``tools`` (executables or package names) if missing.

    Runs ``apt-get update`` first, then ``apt-get install -y --no-install-recommends``.
    """
    packages = sorted({HOST_TOOLS.get(t, t) for t in tools if not _have(t)})
    if not packages:
        return
    if os.geteuid() != 0:
        raise LabError(f"missing host packages {', '.join(packages)}; apt-get install them or run as root")
    progress(f"host: apt-get install {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", *packages],
    ):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise LabError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


DEFAULT_SOCKET = "unix:///var/run/docker.sock"
ENGINE_PROC = "dockerd"


def _answers(client: docker.DockerClient) -> bool:
    try:
        return bool(client.ping())
    except (docker.errors.DockerException, OSError):
        return False


def connect() -> docker.DockerClient | None:
    """A client of the engine ``DOCKER_HOST`` (or the default socket) names, if it answers."""
    try:
        client = docker.from_env(timeout=300)
    except docker.errors.DockerException:
        return None
    return client if _answers(client) else None


def engine_argv(paths: LabPaths) -> list[str]:
    """dockerd as it works on this machine kind (no iptables, no default bridge).

    On the default socket it uses the default data root, so images survive the engine;
    on another ``DOCKER_HOST`` socket it keeps data and exec roots under the lab dir,
    so it can run beside an engine that already owns the defaults.
    """
    argv = [
        "dockerd",
        "--iptables=false",
        "--bridge=none",
        f"--pidfile={paths.run / 'dockerd.pid'}",
    ]
    host = os.environ.get("DOCKER_HOST") or DEFAULT_SOCKET
    if host != DEFAULT_SOCKET:
        if not host.startswith("unix://"):
            raise LabError(f"DOCKER_HOST={host} answers nothing and is not a local socket the lab could serve")
        argv += [
            f"--host={host}",
            f"--data-root={paths.root / 'engine' / 'data'}",
            f"--exec-root={paths.root / 'engine' / 'exec'}",
        ]
    return argv


def ensure_engine(paths: LabPaths, progress: Progress, timeout: float = 60.0) -> docker.DockerClient:
    """The engine to use: the one that answers, or a dockerd the lab starts and records."""
    client = connect()
    if client is not None:
        return client
    ensure_apt_packages(["dockerd"], progress)
    paths.run.mkdir(parents=True, exist_ok=True)
    record = procs.start(paths.pids, paths.logs, ENGINE_PROC, engine_argv(paths))
    progress(f"engine: started dockerd (pid {record.pid}, log {record.log})")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not procs.alive(record):
            raise LabError(f"dockerd exited; see {record.log}")
        client = connect()
        if client is not None:
            return client
        time.sleep(0.5)
    raise LabError(f"dockerd did not answer within {timeout:.0f}s; see {record.log}")


def lab_started_engine(paths: LabPaths) -> bool:
    return procs.alive(procs.read(paths.pids, ENGINE_PROC))


def stop_engine(paths: LabPaths, client: docker.DockerClient | None, progress: Progress) -> None:
    """Stop the dockerd the lab started, unless containers the lab does not own still run on it."""
    if not lab_started_engine(paths):
        procs.stop(paths.pids, ENGINE_PROC)  # drop a stale record
        return
    if client is not None:
        foreign = [c.name for c in client.containers.list() if c.labels.get("io.flagops.lab") != "1"]
        if foreign:
            progress(f"engine: left running, it has other containers: {', '.join(foreign)}")
            return
    procs.stop(paths.pids, ENGINE_PROC, timeout=30)
    progress("engine: stopped the dockerd the lab started")


def engine_status(paths: LabPaths, client: docker.DockerClient | None) -> dict[str, object]:
    record = procs.read(paths.pids, ENGINE_PROC)
    entry: dict[str, object] = {"up": client is not None, "started_by_lab": procs.alive(record)}
    if client is not None:
        version = client.version()
        entry["detail"] = f"{version.get('Version')} at {client.api.base_url}"
    if procs.alive(record) and record is not None:
        entry["pid"] = record.pid
    return entry
