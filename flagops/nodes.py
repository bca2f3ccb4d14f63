"""Fast, parallel read access to the nodes for status, logs and verify.

Provisioning goes through Ansible; the commands here only *look* (docker
inspect, ray membership, a pid check, a log tail) and must answer within a
couple of seconds, so they use Fabric's ThreadingGroup over the same SSH
identity and pinned known_hosts that Ansible uses.  Unknown host keys are
rejected: Fabric's default AutoAddPolicy would trust on first use.

Every remote command is an argv list, joined with ``shlex.join``: inventory
values never reach a shell unquoted.
"""

from __future__ import annotations

import contextlib
import os
import shlex
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flagops.config import Config, Host


@dataclass(frozen=True)
class Result:
    host: str
    rc: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.rc == 0


def _known_hosts_files(common_args: str) -> list[str]:
    """Known-hosts files named by ``-o UserKnownHostsFile=...`` in ansible_ssh_common_args."""
    files: list[str] = []
    words = shlex.split(common_args or "")
    for i, w in enumerate(words):
        opt = w[2:] if w.startswith("-o") and len(w) > 2 else (words[i + 1] if w == "-o" and i + 1 < len(words) else "")
        key, _, val = opt.partition("=")
        if key.strip().lower() == "userknownhostsfile":
            files += [os.path.expanduser(v) for v in val.split()]
    return files or [os.path.expanduser("~/.ssh/known_hosts")]


class Nodes:
    """SSH connections to every inventory host, opened lazily and in parallel."""

    def __init__(self, cfg: Config, timeout: float = 5.0) -> None:
        self.cfg = cfg
        self.timeout = timeout
        self.hosts: dict[str, Host] = {h.name: h for h in cfg.hosts}
        self._conns: dict[str, Any] = {}

    @property
    def master(self) -> Host:
        return next(h for h in self.cfg.hosts if h.role == "master")

    def _connection(self, host: Host) -> Any:
        if host.name in self._conns:
            return self._conns[host.name]
        import paramiko
        from fabric import Connection

        kwargs: dict[str, Any] = {"banner_timeout": self.timeout, "auth_timeout": self.timeout}
        if host.ssh_key_file:
            kwargs["key_filename"] = os.path.expanduser(host.ssh_key_file)
        conn = Connection(
            host.address, user=host.user or "root", port=host.port, connect_kwargs=kwargs, connect_timeout=self.timeout
        )
        conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        for f in _known_hosts_files(host.ssh_common_args or ""):
            if os.path.exists(f):
                conn.client.load_host_keys(f)
        self._conns[host.name] = conn
        return conn

    def run(
        self, argv: Sequence[str], hosts: Sequence[str] | None = None, timeout: float | None = None
    ) -> dict[str, Result]:
        """Run one argv on several hosts at once; connection errors become rc 255."""
        names = list(hosts) if hosts is not None else list(self.hosts)
        cmd = shlex.join(argv)

        def one(name: str) -> Result:
            try:
                r = self._connection(self.hosts[name]).run(
                    cmd, hide=True, warn=True, timeout=timeout or 30, in_stream=False
                )
                return Result(name, r.exited, r.stdout, r.stderr)
            except (TimeoutError, OSError, EOFError) as exc:
                return Result(name, 255, "", f"ssh to {self.hosts[name].address}:{self.hosts[name].port}: {exc}")
            except Exception as exc:  # paramiko/invoke raise many types; report, never crash status
                kind = type(exc).__name__
                return Result(
                    name, 255, "", f"ssh to {self.hosts[name].address}:{self.hosts[name].port}: {kind}: {exc}"
                )

        if len(names) == 1:
            return {names[0]: one(names[0])}
        with ThreadPoolExecutor(max_workers=len(names)) as pool:
            return dict(zip(names, pool.map(one, names), strict=True))

    def docker_exec(
        self, argv: Sequence[str], hosts: Sequence[str] | None = None, timeout: float | None = None
    ) -> dict[str, Result]:
        return self.run(["docker", "exec", self.cfg.container_name, *argv], hosts, timeout)

    def shell_in_container(
        self, script: str, *args: str, hosts: Sequence[str] | None = None, timeout: float | None = None
    ) -> dict[str, Result]:
        """``bash -c SCRIPT name ARGS...`` in the container: values travel as positional args."""
        return self.docker_exec(["bash", "-c", script, "flagops", *args], hosts, timeout)

    def fetch(self, host: str, remote: str, local: Path) -> bool:
        try:
            self._connection(self.hosts[host]).get(remote, str(local))
            return True
        except Exception:  # missing files are normal in a partial log bundle
            return False

    def close(self) -> None:
        for c in self._conns.values():
            with contextlib.suppress(Exception):
                c.close()
        self._conns.clear()

    def __enter__(self) -> Nodes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
