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

from flagops.lab import LabError, Progress

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
}
_PACKAGE_OF_PATH = {"nginx": "/usr/sbin/nginx", "dockerd": "/usr/sbin/dockerd"}


def _have(tool: str) -> bool:
    return shutil.which(tool) is not None or os.access(_PACKAGE_OF_PATH.get(tool, "/nonexistent"), os.X_OK)


def missing_tools(tools: list[str] | None = None) -> list[str]:
    """The host tools (keys of HOST_TOOLS) that are not installed."""
    return [t for t in (tools or list(HOST_TOOLS)) if not _have(t)]


def ensure_apt_packages(tools: list[str], progress: Progress) -> None:
    """Install the Debian packages that provide ``tools`` (executable names or package names) if any is missing.

    Runs ``apt-get update`` first, then ``apt-get install -y --no-install-recommends``.
    """
    packages = sorted({HOST_TOOLS.get(t, t) for t in tools if not _have(t)})
    if not packages:
        return
    if os.geteuid() != 0:
        raise LabError(f"missing host packages {', '.join(packages)}; install them (apt-get install) or run as root")
    progress(f"host: apt-get install {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *packages]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise LabError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
