"""flagops.nodes opens each host's ssh connection once, however many threads ask at once."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

from flagops.config import Host
from flagops.nodes import Nodes


class FakeConnection:
    """Fabric's Connection as far as Nodes uses it; ``open`` is slow and not reentrant."""

    def __init__(self) -> None:
        self.opens = 0
        self.is_connected = False
        self.inside = 0
        self.overlapped = False
        self.guard = threading.Lock()

    def open(self) -> None:
        with self.guard:
            self.inside += 1
            self.overlapped |= self.inside > 1
        time.sleep(0.05)  # a handshake: another thread connecting now would replace the transport
        with self.guard:
            self.inside -= 1
            self.opens += 1
        self.is_connected = True

    def run(self, cmd: str, **_kw: Any) -> Any:
        assert self.is_connected, "run on a connection that is not open"
        return SimpleNamespace(exited=0, stdout=cmd, stderr="")


def test_parallel_callers_open_a_host_once() -> None:
    hosts = (Host("node1", "192.0.2.1", "master", 1, 22, "root", None),
             Host("node2", "192.0.2.2", "worker", 1, 22, "root", None))
    nodes = Nodes(SimpleNamespace(hosts=hosts, container_name="flagos"))
    conns = {h.name: FakeConnection() for h in hosts}
    nodes._connection = lambda host: conns[host.name]  # type: ignore[method-assign]
    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(nodes.run(["true"]))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6 and all(r[n].rc == 0 for r in results for n in ("node1", "node2"))
    assert {n: (c.opens, c.overlapped) for n, c in conns.items()} == {"node1": (1, False), "node2": (1, False)}
