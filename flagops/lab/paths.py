"""Where the lab keeps its files: everything lives under ``$FLAGOPS_HOME/lab``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def flagops_home() -> Path:
    """``$FLAGOPS_HOME`` (default ``~/.flagops``); prefers ``flagops.state.home()``."""
    try:
        from flagops.state import home
    except ImportError:
        return Path(os.environ.get("FLAGOPS_HOME") or Path.home() / ".flagops").expanduser()
    return Path(home())


@dataclass(frozen=True)
class LabPaths:
    """The lab's directory layout (see docs/DESIGN.md, "Lab")."""

    root: Path

    @classmethod
    def default(cls) -> LabPaths:
        return cls(flagops_home() / "lab")

    @property
    def ssh(self) -> Path:
        return self.root / "ssh"

    @property
    def ssh_key(self) -> Path:
        return self.ssh / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.ssh / "known_hosts"

    @property
    def share(self) -> Path:
        return self.root / "share"

    @property
    def nodes(self) -> Path:
        return self.root / "nodes"

    def node_dir(self, name: str) -> Path:
        return self.nodes / name

    @property
    def registry(self) -> Path:
        return self.root / "registry"

    @property
    def published(self) -> Path:
        return self.root / "published"

    @property
    def git(self) -> Path:
        return self.root / "git"

    @property
    def pids(self) -> Path:
        return self.root / "pids"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def run(self) -> Path:
        """Generated configs of host services (nginx, registry, dockerd)."""
        return self.root / "run"

    @property
    def cache(self) -> Path:
        """Build caches kept across `lab down` (rootfs tarballs are transient)."""
        return self.root / "cache"
