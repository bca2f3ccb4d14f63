"""Last of the suite: `flagops lab down` leaves nothing behind."""

from __future__ import annotations

import json
import socket
import subprocess
from typing import TYPE_CHECKING

import pytest

from flagops.lab import nodes, procs
from flagops.lab.nodes import NODES

if TYPE_CHECKING:
    from conftest import Lab

pytestmark = pytest.mark.lab


def test_down_leaves_nothing(lab: Lab) -> None:
    """Last: `lab down` removes containers, network, processes and cgroup dirs."""
    running = [procs.read(lab.paths.pids, name) for name in procs.names(lab.paths.pids)]
    ids = [(lab.paths.node_dir(n.hostname) / "container-id").read_text().strip() for n in NODES]
    report = json.loads(lab.flagops("lab", "down", "--json").stdout)
    assert report["left"] == {"containers": [], "networks": [], "processes": [], "cgroups": []}
    for record in running:
        assert not procs.alive(record), f"{record.name} (pid {record.pid}) still runs"
    for container_id in ids:
        assert nodes.stale_cgroup_dirs(container_id) == []
    assert subprocess.run(["ip", "link", "show", nodes.BRIDGE], capture_output=True).returncode != 0
    for port in (5000, 8090, 9418):
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
    status = json.loads(lab.flagops("lab", "status", "--json", check=False).stdout)
    # With the engine the lab started now stopped, status cannot even list the network.
    assert not status["ok"] and not status.get("network", {}).get("up", False)
    assert not status["engine"].get("started_by_lab"), "lab down left its own engine running"
