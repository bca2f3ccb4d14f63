"""ProxyJump as flagops reads it from the inventory, the ssh port forward, the bastion inventory."""

from __future__ import annotations

import http.server
import shutil
import socket
import threading
from pathlib import Path

import pytest

from flagops import http as fhttp
from flagops.nodes import Hop, Nodes, _Forward, _known_hosts_files, parse_jump, proxy_jump, resolve_hop, ssh_options

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("spec", "hops"), [
    ("bastion", [Hop("bastion")]),
    ("root@172.30.0.10", [Hop("172.30.0.10", "root")]),
    ("ops@jump.example.com:2222", [Hop("jump.example.com", "ops", 2222)]),
    ("ssh://ops@jump:2200", [Hop("jump", "ops", 2200)]),
    ("a@j1:22,j2,ssh://b@j3:2022", [Hop("j1", "a", 22), Hop("j2"), Hop("j3", "b", 2022)]),
    ("[fe80::1]:2222", [Hop("fe80::1", None, 2222)]),
    ("root@[2001:db8::5]", [Hop("2001:db8::5", "root")]),
    ("2001:db8::5", [Hop("2001:db8::5")]),
    ("user.name@host", [Hop("host", "user.name")]),
    ("none", []),
    ("", []),
])
def test_parse_jump(spec: str, hops: list[Hop]) -> None:
    assert parse_jump(spec) == hops


@pytest.mark.parametrize("spec", ["root@", "@host", "host:0", "host:70000", "host:ssh", "[fe80::1", "[::1]x",
                                  "a@j1,,j2"])
def test_parse_jump_rejects(spec: str) -> None:
    with pytest.raises(ValueError, match="ProxyJump hop"):
        parse_jump(spec)


@pytest.mark.parametrize("args", [
    "-o ProxyJump=root@10.0.0.9:2222",
    "-oProxyJump=root@10.0.0.9:2222",
    "-o proxyjump=root@10.0.0.9:2222",
    "-o ProxyJump root@10.0.0.9:2222",
    "-o 'ProxyJump root@10.0.0.9:2222'",
    "-J root@10.0.0.9:2222",
    "-Jroot@10.0.0.9:2222",
    "-o UserKnownHostsFile=/k -J root@10.0.0.9:2222 -o ServerAliveInterval=5",
    "-J root@10.0.0.9:2222 -o ProxyJump=other",  # ssh: the first value wins
])
def test_proxy_jump_in_every_spelling(args: str) -> None:
    assert proxy_jump(args) == [Hop("10.0.0.9", "root", 2222)]


def test_no_jump_and_known_hosts() -> None:
    assert proxy_jump(None) == [] and proxy_jump("-o UserKnownHostsFile=/k") == []
    assert proxy_jump("-o ProxyJump=none -J x") == []
    args = "-o UserKnownHostsFile='/a/k1 /a/k2' -o ProxyJump=j"
    assert ssh_options(args) == [("userknownhostsfile", "/a/k1 /a/k2"), ("proxyjump", "j")]
    assert _known_hosts_files(args) == ["/a/k1", "/a/k2"]
    assert _known_hosts_files("-J j")[0].endswith("/.ssh/known_hosts")


@pytest.mark.skipif(shutil.which("ssh") is None, reason="no OpenSSH client")
def test_resolve_hop_asks_openssh() -> None:
    hs = resolve_hop(Hop("192.0.2.77", "alice", 2222))
    assert (hs.host, hs.user, hs.port, hs.source) == ("192.0.2.77", "alice", 2222, "ssh -G")
    assert any(f.endswith("/.ssh/known_hosts") for f in hs.known_hosts)
    assert any(f.endswith("/.ssh/id_ed25519") for f in hs.identity_files)
    assert not any("~" in f for f in (*hs.known_hosts, *hs.identity_files))


def test_resolve_hop_without_ssh(tmp_path: Path) -> None:
    hs = resolve_hop(Hop("j", None, None), ssh=str(tmp_path / "no-ssh"))
    assert (hs.host, hs.port, hs.source) == ("j", 22, "defaults")


class _Hello(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        body = f"hello {self.path} from {self.client_address[0]}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _SocketTransport:
    """paramiko Transport's open_channel/is_active over a plain TCP connection (a stand-in
    for the ssh channel: the forwarder only needs a socket-like object with recv/sendall)."""

    def __init__(self) -> None:
        self.opened: list[tuple[str, int]] = []

    def open_channel(self, kind: str, dest: tuple[str, int], src: tuple[str, int], timeout: float) -> socket.socket:
        assert kind == "direct-tcpip" and src[0] == "127.0.0.1"
        self.opened.append(dest)
        return socket.create_connection(dest, timeout=timeout)

    def is_active(self) -> bool:
        return True


def test_forward_carries_http_both_ways() -> None:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    transport = _SocketTransport()
    fwd = _Forward(transport, ("127.0.0.1", srv.server_address[1]), timeout=5)
    try:
        for path in ("/health", "/v1/models"):
            r = fhttp.get(f"http://127.0.0.1:{fwd.port}{path}", timeout=5)
            assert (r.status, r.text) == (200, f"hello {path} from 127.0.0.1")
        assert transport.opened and set(transport.opened) == {("127.0.0.1", srv.server_address[1])}
    finally:
        fwd.close()
        srv.shutdown()
        srv.server_close()
    r = fhttp.get(f"http://127.0.0.1:{fwd.port}/health", timeout=2)
    assert r.status == 0  # closed forward: nothing listens


def test_forward_to_nothing_is_no_answer() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    fwd = _Forward(_SocketTransport(), ("127.0.0.1", dead), timeout=2)
    try:
        assert fhttp.get(f"http://127.0.0.1:{fwd.port}/health", timeout=3).status == 0
    finally:
        fwd.close()


def test_http_base_is_direct_without_jump() -> None:
    from flagops import config

    cfg = config.load(str(REPO / "inventories" / "lab.yaml"))
    with Nodes(cfg) as nodes:
        assert nodes.http_base("node1", "172.30.0.11", 30000) == "http://172.30.0.11:30000"
        assert nodes.via("node1") is None
    cfg = config.load(str(REPO / "inventories" / "lab-bastion.yaml"))
    with Nodes(cfg) as nodes:
        assert nodes.jumps("node2") == [Hop("172.30.0.10", "root")]
        assert nodes.via("node1") == "ssh via root@172.30.0.10"


def test_lab_bastion_inventory_is_lab_plus_proxyjump() -> None:
    """lab-bastion.yaml = lab.yaml with a ProxyJump, nothing else (they must not drift)."""
    lab = (REPO / "inventories" / "lab.yaml").read_text().splitlines()
    bastion = (REPO / "inventories" / "lab-bastion.yaml").read_text().splitlines()
    strip = [ln for ln in bastion if not ln.lstrip().startswith("#")]
    key = "    ansible_ssh_common_args:"
    assert [ln for ln in strip if not ln.startswith(key)] == [ln for ln in lab if not ln.lstrip().startswith("#")
                                                             and not ln.startswith(key)]
    line = next(ln for ln in strip if ln.startswith(key))
    assert proxy_jump(line.split(":", 1)[1]) == [Hop("172.30.0.10", "root")]
    lab_args = next(ln for ln in lab if ln.startswith(key)).split(":", 1)[1].split("#")[0].strip()
    assert line.split(":", 1)[1].strip().startswith(lab_args)


def test_lab_bastion_rules() -> None:
    from flagops.lab import bastion, nodes

    text = bastion.sshd_dropin_text()
    allow = next(ln for ln in text.splitlines() if ln.startswith("AllowUsers")).split()[1:]
    assert set(allow) == {"*@172.30.0.10", "*@172.30.0.11", "*@172.30.0.12", "*@127.0.0.1", "*@::1"}
    assert f"*@{nodes.GATEWAY}" not in allow  # the controller
    rule = " ".join(bastion.REJECT_RULE)
    assert f"-s {nodes.GATEWAY} -p tcp --syn ! --dport 22" in rule and "-j REJECT" in rule
    from flagops.lab.paths import LabPaths

    cfg = bastion.ssh_client_text(LabPaths(Path("/lab")))
    assert "Host 172.30.0.10\n" in cfg and "StrictHostKeyChecking yes" in cfg
    assert "IdentityFile /lab/ssh/id_ed25519" in cfg and "UserKnownHostsFile /lab/ssh/known_hosts" in cfg


def test_lab_writes_the_bastion_inventory(tmp_path: Path) -> None:
    from flagops.lab.lab import write_inventory
    from flagops.lab.paths import LabPaths

    paths = LabPaths(tmp_path / "lab")
    paths.root.mkdir()
    out = write_inventory(paths, "a" * 40, "lab-bastion.yaml")
    assert out.name == "inventory-bastion.yaml"
    text = out.read_text()
    assert "ProxyJump=root@172.30.0.10" in text and f"{paths.root}/ssh/known_hosts" in text
    assert "commit: " + "a" * 40 in text and "~/.flagops/lab/" not in text
    assert write_inventory(paths, "a" * 40).name == "inventory.yaml"
