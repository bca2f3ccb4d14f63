"""`flagops lab`: a real two-node cluster on one machine (Docker-in-Docker nodes).

Modules: `paths` (where everything lives), `rootfs` (mmdebstrap -> docker import),
`engine` (apt packages and the host Docker engine), `procs` (pid-recorded host
processes), `nodes` (node image, network, node containers, ssh), `services`
(registry, model server, git server), `lab` (up/down/status), `cli` (click group).
"""

from __future__ import annotations

from collections.abc import Callable

from flagops.errors import FlagopsError

Progress = Callable[[str], None]
"""Receives one human-readable line per step (the CLI prints or collects them)."""


class LabError(FlagopsError):
    """A lab step failed; the message says what was found and what is needed."""
