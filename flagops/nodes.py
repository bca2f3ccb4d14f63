"""Fast, parallel read access to the nodes for status, logs and verify.

Provisioning goes through Ansible; the commands here only *look* (docker
inspect, ray membership, a pid check, a log tail) and must answer within a
couple of seconds, so they use Fabric connections (one per host, in parallel)
over the connection settings Ansible uses for the host: address, user, port,
``ansible_ssh_private_key_file``, the known_hosts files and the ``ProxyJump``
(``-J``) hops of ``ansible_ssh_common_args``.  Unknown host keys are rejected,
for the jump hosts too: Fabric's default AutoAddPolicy would trust on first use.

A jump host is reached as OpenSSH reaches it for Ansible: the command-line options
apply to the destination only, the hop's own settings (its key files, its
known_hosts files) come from ssh_config, resolved by ``ssh -G`` (OpenSSH's own
resolver; it connects nowhere). Through a jump host the API is reached through a
local port forwarded over the master's ssh connection (:meth:`Nodes.http_base`).

Every remote command is an argv list, joined with ``shlex.join``: inventory
values never reach a shell unquoted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shlex
import shutil
import socket
import subprocess
import threading
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


def ssh_options(common_args: str | None) -> list[tuple[str, str]]:
    """(option, value) pairs of ``-o`` options and ``-J`` in ssh's argv order, options
    lower-cased, in every spelling ssh accepts: ``-o Opt=v``, ``-oOpt=v``, ``-o Opt v``,
    ``-o "Opt v"``, ``-J v``, ``-Jv`` (``-J`` is reported as ``proxyjump``)."""
    words = shlex.split(common_args or "")
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(words):
        w = words[i]
        arg: str | None = None
        if w in ("-o", "-J"):
            arg = words[i + 1] if i + 1 < len(words) else ""
            i += 1
        elif w.startswith(("-o", "-J")):
            arg = w[2:]
        if arg is not None:
            if w.startswith("-J"):
                out.append(("proxyjump", arg))
            else:
                key, sep, val = arg.partition("=")
                if not sep:
                    key, _, val = arg.strip().partition(" ")
                    if not val and i + 1 < len(words) and not words[i + 1].startswith("-"):
                        val = words[i + 1]
                        i += 1
                out.append((key.strip().lower(), val.strip()))
        i += 1
    return out


def _first(common_args: str | None, option: str) -> str | None:
    """ssh's rule: the first value given for an option wins."""
    return next((v for k, v in ssh_options(common_args) if k == option), None)


def _known_hosts_files(common_args: str) -> list[str]:
    """Known-hosts files named by ``-o UserKnownHostsFile=...`` in ansible_ssh_common_args."""
    val = _first(common_args, "userknownhostsfile")
    files = [os.path.expanduser(v) for v in val.split()] if val else []
    return files or [os.path.expanduser("~/.ssh/known_hosts")]


@dataclass(frozen=True)
class Hop:
    """One jump host of a ProxyJump chain; None user/port: ssh_config's or the default."""

    host: str
    user: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return (f"{self.user}@" if self.user else "") + host + (f":{self.port}" if self.port else "")


def parse_jump(spec: str) -> list[Hop]:
    """The hops of a ProxyJump value (``[user@]host[:port]`` or ``ssh://[user@]host[:port]``,
    comma-separated, first hop first); ``none`` is no jump. ValueError for a bad hop."""
    spec = spec.strip()
    if not spec or spec.lower() == "none":
        return []
    hops = []
    for part in spec.split(","):
        text = part.strip()
        if text.startswith("ssh://"):
            text = text[len("ssh://"):].rstrip("/")
        user, at, rest = text.rpartition("@")
        if not at:
            user, rest = "", text
        port: str | None = None
        if rest.startswith("["):  # [v6]:port
            host, close, tail = rest[1:].partition("]")
            if not close or (tail and not tail.startswith(":")):
                raise ValueError(f"ProxyJump hop {part.strip()!r}: unbalanced [ ] around the address")
            port = tail[1:] if tail else None
        elif rest.count(":") == 1:
            host, _, port = rest.partition(":")
        else:
            host = rest  # a plain name, IPv4 or a bare IPv6 address
        if not host or any(c.isspace() for c in host) or (at and not user):
            raise ValueError(f"ProxyJump hop {part.strip()!r}: expected [user@]host[:port]")
        if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"ProxyJump hop {part.strip()!r}: port {port!r} is not 1-65535")
        hops.append(Hop(host, user or None, int(port) if port else None))
    return hops


def proxy_jump(common_args: str | None) -> list[Hop]:
    """The jump hops ``ansible_ssh_common_args`` gives the host (``-J`` or ``-o ProxyJump``)."""
    val = _first(common_args, "proxyjump")
    return parse_jump(val) if val is not None else []


@dataclass(frozen=True)
class HopSettings:
    """How OpenSSH would connect to a jump host: from ssh_config, not the inventory."""

    host: str
    user: str
    port: int
    identity_files: tuple[str, ...] = ()
    known_hosts: tuple[str, ...] = ()
    source: str = "defaults"


def resolve_hop(hop: Hop, ssh: str | None = None) -> HopSettings:
    """``ssh -G [-l user] [-p port] host``: the hop's HostName, User, Port, IdentityFile and
    UserKnownHostsFile/GlobalKnownHostsFile as ssh_config gives them (ssh -G only prints
    the resolved configuration; it connects nowhere). Without ssh: OpenSSH's defaults."""
    home = os.path.expanduser("~")
    default = HopSettings(hop.host, hop.user or os.environ.get("USER") or "root", hop.port or 22,
                          tuple(f"{home}/.ssh/{n}" for n in ("id_rsa", "id_ecdsa", "id_ed25519")),
                          (f"{home}/.ssh/known_hosts", "/etc/ssh/ssh_known_hosts"))
    exe = ssh or shutil.which("ssh")
    if not exe:
        return default
    argv = [exe, "-G"]
    if hop.user:
        argv += ["-l", hop.user]
    if hop.port:
        argv += ["-p", str(hop.port)]
    argv += ["--", hop.host]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return default
    conf: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, val = line.partition(" ")
        conf.setdefault(key.lower(), []).append(val.strip())
    known: list[str] = []
    for key in ("userknownhostsfile", "globalknownhostsfile"):
        for val in conf.get(key, []):
            known += [os.path.expanduser(f) for f in val.split() if f.lower() != "none"]
    return HopSettings(
        host=conf.get("hostname", [hop.host])[0],
        user=conf.get("user", [default.user])[0],
        port=int(conf.get("port", [default.port])[0]),
        identity_files=tuple(os.path.expanduser(f) for f in conf.get("identityfile", [])),
        known_hosts=tuple(known),
        source="ssh -G",
    )


class _Forward:
    """A local TCP port whose connections are carried to ``dest`` over an ssh transport
    (what ``ssh -L 127.0.0.1:PORT:dest`` does); the port is picked by the kernel."""

    def __init__(self, transport: Any, dest: tuple[str, int], timeout: float) -> None:
        self.transport, self.dest, self.timeout = transport, dest, timeout
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self._closed = threading.Event()
        threading.Thread(target=self._accept, name=f"forward-{self.port}", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, peer = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(client, peer), daemon=True).start()

    def _pipe(self, client: socket.socket, peer: tuple[str, int]) -> None:
        # no Nagle on the local leg: a response written in two pieces (headers, body) would
        # otherwise wait for the client's delayed ACK (~40 ms per request)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            chan = self.transport.open_channel("direct-tcpip", self.dest, peer, timeout=self.timeout)
        except Exception:  # nothing listens there, or the transport is gone: the client sees EOF
            client.close()
            return
        try:
            while not self._closed.is_set():
                ready, _, _ = select.select([client, chan], [], [], 0.5)
                if client in ready:
                    data = client.recv(65536)
                    if not data:
                        break
                    # An HTTP client writes headers and body separately; sshd on the far end
                    # writes each to the server as it comes, and Nagle holds the second until
                    # the server's delayed ACK (~40 ms). One ssh packet per request avoids it.
                    while len(data) < 65536 and select.select([client], [], [], 0.001)[0]:
                        more = client.recv(65536)
                        if not more:
                            break
                        data += more
                    chan.sendall(data)
                if chan in ready:
                    data = chan.recv(65536)
                    if not data:
                        break
                    client.sendall(data)
        except OSError:
            pass
        finally:
            chan.close()
            client.close()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self.sock.close()


class Nodes:
    """SSH connections to every inventory host, opened lazily and in parallel."""

    def __init__(self, cfg: Config, timeout: float = 5.0) -> None:
        # paramiko logs every failed handshake or refused forward; the caller reports it once
        logging.getLogger("paramiko").addHandler(logging.NullHandler())
        logging.getLogger("paramiko").propagate = False
        self.cfg = cfg
        self.timeout = timeout
        self.hosts: dict[str, Host] = {h.name: h for h in cfg.hosts}
        self._conns: dict[str, Any] = {}
        self._hops: dict[tuple[Hop, ...], Any] = {}  # jump connections, shared by the hosts behind them
        self._forwards: dict[tuple[str, str, int], _Forward] = {}
        self._lock = threading.RLock()
        self._opening: dict[str, threading.Lock] = {}  # one per host: its connection opens once

    @property
    def master(self) -> Host:
        return next(h for h in self.cfg.hosts if h.role == "master")

    def jumps(self, name: str) -> list[Hop]:
        """The ProxyJump hops of a host (ValueError for a malformed value)."""
        return proxy_jump(self.hosts[name].ssh_common_args)

    def _strict(self, conn: Any, known_hosts: Sequence[str]) -> Any:
        import paramiko

        conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        for f in known_hosts:
            if os.path.exists(f):
                conn.client.load_host_keys(f)
        return conn

    def _gateway(self, hops: list[Hop]) -> Any:
        """The opened connection to the last of ``hops`` (each hop through the ones before)."""
        from fabric import Connection

        gateway = None
        for i in range(len(hops)):
            key = tuple(hops[: i + 1])
            if key not in self._hops:
                hs = resolve_hop(hops[i])
                kwargs: dict[str, Any] = {"banner_timeout": self.timeout, "auth_timeout": self.timeout}
                keys = [f for f in hs.identity_files if os.path.exists(f)]
                if keys:
                    kwargs["key_filename"] = keys
                conn = Connection(hs.host, user=hs.user, port=hs.port, connect_kwargs=kwargs,
                                  connect_timeout=self.timeout, gateway=gateway)
                self._strict(conn, hs.known_hosts)
                try:
                    conn.open()
                except Exception as exc:  # name the hop: "ssh to node1" alone would mislead
                    raise OSError(f"jump host {hops[i]} ({hs.user}@{hs.host}:{hs.port}, settings from "
                                  f"{hs.source}): {type(exc).__name__}: {exc}") from exc
                # a hop that cannot reach the next host must say so within the timeout, not in an hour
                conn.transport.channel_timeout = self.timeout
                self._hops[key] = conn
            gateway = self._hops[key]
        return gateway

    def _connection(self, host: Host) -> Any:
        with self._lock:
            if host.name in self._conns:
                return self._conns[host.name]
            from fabric import Connection

            kwargs: dict[str, Any] = {"banner_timeout": self.timeout, "auth_timeout": self.timeout}
            if host.ssh_key_file:
                kwargs["key_filename"] = os.path.expanduser(host.ssh_key_file)
            hops = proxy_jump(host.ssh_common_args)
            conn = Connection(
                host.address, user=host.user or "root", port=host.port, connect_kwargs=kwargs,
                connect_timeout=self.timeout, gateway=self._gateway(hops) if hops else None,
            )
            self._strict(conn, _known_hosts_files(host.ssh_common_args or ""))
            self._conns[host.name] = conn
            return conn

    def _opened(self, name: str) -> Any:
        """The host's connection, open. Its callers run in parallel threads (status asks the
        master for containers, Ray and the serve process at once); Fabric's ``open()`` is not
        thread-safe: two threads both connect, the second replaces the client's transport
        while the first authenticates on it, and paramiko fails with "No existing session".
        So one thread per host opens it, the others wait; other hosts open in parallel."""
        conn = self._connection(self.hosts[name])
        with self._lock:
            opening = self._opening.setdefault(name, threading.Lock())
        with opening:
            if not conn.is_connected:
                conn.open()
        return conn

    def via(self, name: str) -> str | None:
        """How the host is reached, for reports: ``ssh via root@bastion:22`` or None (direct)."""
        hops = self.jumps(name)
        return "ssh via " + ",".join(map(str, hops)) if hops else None

    def http_base(self, name: str, address: str, port: int) -> str:
        """The base URL under which this process reaches ``address:port`` of host ``name``:
        the address itself, or, when the host sits behind jump hosts, a local port
        forwarded over the host's ssh connection (the request leaves from the host)."""
        shown = f"[{address}]" if ":" in address else address
        if not self.jumps(name):
            return f"http://{shown}:{port}"
        key = (name, address, port)
        with self._lock:
            fwd = self._forwards.get(key)
            if fwd is None or not fwd.transport.is_active():
                try:
                    conn = self._opened(name)
                except Exception:
                    # no ssh: an unreachable URL, so the HTTP checks report 'no answer'
                    return f"http://{shown}:{port}"
                fwd = self._forwards[key] = _Forward(conn.transport, (address, port), self.timeout)
        return f"http://127.0.0.1:{fwd.port}"

    def run(
        self, argv: Sequence[str], hosts: Sequence[str] | None = None, timeout: float | None = None
    ) -> dict[str, Result]:
        """Run one argv on several hosts at once; connection errors become rc 255."""
        names = list(hosts) if hosts is not None else list(self.hosts)
        cmd = shlex.join(argv)

        def one(name: str) -> Result:
            try:
                r = self._opened(name).run(
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
            self._opened(host).get(remote, str(local))
            return True
        except Exception:  # missing files are normal in a partial log bundle
            return False

    def close(self) -> None:
        for f in self._forwards.values():
            f.close()
        self._forwards.clear()
        for c in [*self._conns.values(), *reversed(self._hops.values())]:
            with contextlib.suppress(Exception):
                c.close()
        self._conns.clear()
        self._hops.clear()

    def __enter__(self) -> Nodes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
