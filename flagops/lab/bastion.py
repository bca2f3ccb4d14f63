"""The lab's bastion mode (`flagops lab up --bastion`): nodes reachable only through a jump host.

- ``flagops-lab-bastion`` (172.30.0.10, hostname ``bastion``) joins the lab bridge: a
  container of the node image running only sshd (root, the lab key; its host key pinned
  in the lab's known_hosts next to the nodes').
- Each node's sshd accepts logins only from the bastion, the nodes and loopback
  (``AllowUsers`` in ``/etc/ssh/sshd_config.d/zz-flagops-bastion.conf``): a direct ssh
  from the controller (172.30.0.1) is refused, the master container still reaches the
  worker hosts for FlagScale.
- Each node rejects every other connection the controller opens (an ``iptables`` rule on
  new TCP from 172.30.0.1 except port 22, whose sshd refuses it itself): the API and the
  Ray dashboard are reachable from the controller only through ssh. Connections the nodes
  open to the controller (registry, model server, git daemon) are untouched.
- OpenSSH applies command-line options (Ansible's ``-o UserKnownHostsFile``, ``-i``) to
  the destination only, never to a ProxyJump hop, so the hop's key and pinned host key
  come from ssh_config, as an operator's bastion does: the lab writes
  ``/etc/ssh/ssh_config.d/flagops-lab-bastion.conf`` matching only the bastion's address.

`flagops lab up` without ``--bastion`` and `flagops lab down` undo all four (the default
lab); nothing here touches what the lab did not create.
"""

from __future__ import annotations

import contextlib
import io
import tarfile
import time
from pathlib import Path

import docker
import docker.errors

from flagops.lab import LabError, Progress, nodes
from flagops.lab.paths import LabPaths

BASTION = nodes.Node("bastion", "172.30.0.10")
SSHD_DROPIN = "/etc/ssh/sshd_config.d/zz-flagops-bastion.conf"
SSH_CLIENT_DROPIN = Path("/etc/ssh/ssh_config.d/flagops-lab-bastion.conf")
MODE_LABEL = "io.flagops.lab.bastion"
# Who may log in to a node in bastion mode: the bastion, the nodes (master container ->
# worker host runs from the master's address, --net=host) and loopback.
ALLOWED = (BASTION.ip, *(n.ip for n in nodes.NODES), "127.0.0.1", "::1")
# iptables rule spec (after -I/-D INPUT): controller-initiated TCP to anything but sshd.
REJECT_RULE = ["-s", nodes.GATEWAY, "-p", "tcp", "--syn", "!", "--dport", "22",
               "-m", "comment", "--comment", "flagops-lab-bastion", "-j", "REJECT", "--reject-with", "tcp-reset"]


def sshd_dropin_text() -> str:
    users = " ".join(f"*@{a}" for a in ALLOWED)
    return ("# managed by flagops lab (bastion mode): only the bastion, the nodes and loopback may log in\n"
            f"AllowUsers {users}\n")


def ssh_client_text(paths: LabPaths) -> str:
    """ssh_config for the jump leg (OpenSSH gives a ProxyJump hop none of the command line's options)."""
    return (f"# managed by flagops lab (bastion mode); removed by `flagops lab up` without --bastion and by\n"
            f"# `flagops lab down`. OpenSSH applies no command-line option to a ProxyJump hop: its key and\n"
            f"# pinned host key come from here.\n"
            f"Host {BASTION.ip}\n"
            f"    User root\n"
            f"    IdentityFile {paths.ssh_key}\n"
            f"    IdentitiesOnly yes\n"
            f"    UserKnownHostsFile {paths.known_hosts}\n"
            f"    StrictHostKeyChecking yes\n")


def known_hosts_line(paths: LabPaths) -> str:
    kind, key = nodes.host_key(paths, BASTION).with_suffix(".pub").read_text().split()[:2]
    return f"{BASTION.ip},{BASTION.hostname},{BASTION.container} {kind} {key}\n"


def _files(paths: LabPaths) -> bytes:
    hk = nodes.host_key(paths, BASTION)
    files = [
        ("etc/ssh/ssh_host_ed25519_key", hk.read_bytes(), 0o600),
        ("etc/ssh/ssh_host_ed25519_key.pub", hk.with_suffix(".pub").read_bytes(), 0o644),
        ("root/.ssh/authorized_keys", paths.ssh_key.with_suffix(".pub").read_bytes(), 0o600),
    ]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        d = tarfile.TarInfo("root/.ssh")
        d.type, d.mode = tarfile.DIRTYPE, 0o700
        tar.addfile(d)
        for name, data, mode in files:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _find(client: docker.DockerClient) -> docker.models.containers.Container | None:
    try:
        return client.containers.get(BASTION.container)
    except docker.errors.NotFound:
        return None


def _ensure_container(client: docker.DockerClient, image: str, paths: LabPaths, progress: Progress) -> None:
    found = _find(client)
    if found is not None and found.labels.get(nodes.IMAGE_LABEL) != image:
        found.remove(force=True)
        found = None
    if found is None:
        api = client.api
        created = api.create_container(
            image,
            name=BASTION.container,
            hostname=BASTION.hostname,
            detach=True,
            # sshd only: no dockerd, no extra privileges
            entrypoint=["/usr/bin/tini", "--", "/bin/sh", "-c", "mkdir -p /run/sshd && exec /usr/sbin/sshd -D -e"],
            host_config=api.create_host_config(),
            networking_config=api.create_networking_config(
                {nodes.NETWORK: api.create_endpoint_config(ipv4_address=BASTION.ip, aliases=[BASTION.hostname])}
            ),
            labels={nodes.LAB_LABEL: "1", nodes.IMAGE_LABEL: image},
        )
        api.put_archive(created["Id"], "/", _files(paths))
        api.start(created["Id"])
        progress(f"{BASTION.container}: created ({BASTION.ip}, sshd only)")
    elif found.status != "running":
        found.start()
        progress(f"{BASTION.container}: started")
    deadline = time.monotonic() + 30
    while True:
        ok, detail = _sshd_answers(BASTION.ip)
        if ok:
            return
        if time.monotonic() > deadline:
            raise LabError(f"{BASTION.container}: sshd not answering after 30s: {detail}")
        time.sleep(0.3)


def _sshd_answers(ip: str) -> tuple[bool, str]:
    import socket

    try:
        with socket.create_connection((ip, 22), timeout=1) as s:
            banner = s.recv(64).decode(errors="replace")
    except OSError as exc:
        return False, str(exc)
    return banner.startswith("SSH-"), banner.strip()


def _node_sh(client: docker.DockerClient, node: nodes.Node, script: str, *args: str) -> tuple[int, str]:
    return nodes.node_exec(client, node, ["sh", "-c", script, "flagops", *args])


_RELOAD_SSHD = 'kill -HUP "$(cat /run/sshd.pid)"'


def _lock_node(client: docker.DockerClient, node: nodes.Node) -> None:
    c = client.containers.get(node.container)
    data = sshd_dropin_text().encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(SSHD_DROPIN.lstrip("/"))
        info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
        tar.addfile(info, io.BytesIO(data))
    c.put_archive("/", buf.getvalue())
    rc, out = _node_sh(client, node, "sshd -t && " + _RELOAD_SSHD)
    if rc != 0:
        raise LabError(f"{node.container}: sshd refused the bastion drop-in: {out.strip()}")
    rule = " ".join(REJECT_RULE)
    rc, out = _node_sh(client, node, f"iptables -C INPUT {rule} 2>/dev/null || iptables -I INPUT 1 {rule}")
    if rc != 0:
        raise LabError(f"{node.container}: iptables: {out.strip()}")


def _unlock_node(client: docker.DockerClient, node: nodes.Node) -> bool:
    """Remove the drop-in and the rule if present; True when something was removed."""
    rule = " ".join(REJECT_RULE)
    script = (f'changed=""; if [ -e {SSHD_DROPIN} ]; then rm -f {SSHD_DROPIN} && {_RELOAD_SSHD} && changed=1; fi; '
              f"while iptables -C INPUT {rule} 2>/dev/null; do iptables -D INPUT {rule}; changed=1; done; "
              'echo "changed=$changed"')
    rc, out = _node_sh(client, node, script)
    if rc != 0:
        raise LabError(f"{node.container}: could not leave bastion mode: {out.strip()}")
    return "changed=1" in out


def close_ansible_masters(progress: Progress, which: tuple[nodes.Node, ...] = nodes.NODES) -> None:
    """Ask Ansible's persistent ssh masters to the nodes to exit (``ssh -O exit``): OpenSSH 9.2's
    ControlPath hash ``%C`` leaves the jump host out, so a master opened in the other mode
    would carry the next run past (or through) the bastion for its ControlPersist time.
    ``lab up --nodes N`` also calls it for the nodes it removes (a master to a removed
    container would hang a later run until its keepalives give up)."""
    import shutil
    import subprocess

    ssh = shutil.which("ssh")
    cp = Path("~/.ansible/cp").expanduser()
    if not ssh or not cp.is_dir():
        return
    for node in which:
        r = subprocess.run([ssh, "-O", "exit", "-o", f"ControlPath={cp}/%C", "-p", "22", f"root@{node.ip}"],
                           capture_output=True, text=True, timeout=10, check=False)
        if r.returncode == 0:
            progress(f"ansible: closed the persistent ssh master to {node.ip}")


def ensure(client: docker.DockerClient, image: str, paths: LabPaths, progress: Progress) -> dict[str, str]:
    """Bastion mode on: the bastion, its pinned key, the ssh_config hop, the locked nodes."""
    nodes._keygen(nodes.host_key(paths, BASTION), f"root@{BASTION.hostname}")
    text = paths.known_hosts.read_text() if paths.known_hosts.exists() else ""
    line = known_hosts_line(paths)
    if line not in text:
        paths.known_hosts.write_text(text + line)
    _ensure_container(client, image, paths, progress)
    if SSH_CLIENT_DROPIN.parent.is_dir():
        want = ssh_client_text(paths)
        if not SSH_CLIENT_DROPIN.exists() or SSH_CLIENT_DROPIN.read_text() != want:
            SSH_CLIENT_DROPIN.write_text(want)
            progress(f"ssh client: {SSH_CLIENT_DROPIN} (key and pinned host key of the jump host)")
    else:
        raise LabError(f"{SSH_CLIENT_DROPIN.parent} is missing: OpenSSH here does not read ssh_config.d")
    for node in nodes.NODES:
        _lock_node(client, node)
    close_ansible_masters(progress)
    progress(f"bastion mode: nodes accept ssh only from {BASTION.ip} and each other; "
             f"inventory inventories/lab-bastion.yaml")
    return {"bastion": BASTION.ip, "ssh_config": str(SSH_CLIENT_DROPIN)}


def remove(client: docker.DockerClient | None, paths: LabPaths, progress: Progress) -> bool:
    """Bastion mode off (the default lab); True when there was something to undo."""
    changed = False
    marked = SSH_CLIENT_DROPIN.exists() or (
        paths.known_hosts.exists() and f"\n{BASTION.ip}," in "\n" + paths.known_hosts.read_text())
    if client is not None:
        found = _find(client)
        if found is not None:
            found.remove(force=True)
            progress(f"{BASTION.container}: removed")
            changed = True
        # the default lab's `lab up` stays cheap: the nodes are asked only after a bastion mode
        for node in nodes.NODES if (changed or marked) else ():
            c = nodes._find(client, node)
            if c is not None and c.status == "running" and _unlock_node(client, node):
                progress(f"{node.container}: direct ssh and HTTP from the controller allowed again")
                changed = True
    if SSH_CLIENT_DROPIN.exists() and "managed by flagops lab" in SSH_CLIENT_DROPIN.read_text():
        SSH_CLIENT_DROPIN.unlink()
        changed = True
    if changed:
        close_ansible_masters(progress)
    if paths.known_hosts.exists():
        lines = paths.known_hosts.read_text().splitlines(keepends=True)
        kept = [ln for ln in lines if not ln.startswith(f"{BASTION.ip},")]
        if kept != lines:
            paths.known_hosts.write_text("".join(kept))
    return changed


def status(client: docker.DockerClient | None) -> dict[str, object]:
    """Whether the lab is in bastion mode (a bastion container exists)."""
    found = _find(client) if client is not None else None
    entry: dict[str, object] = {"mode": "bastion" if found is not None else "default",
                                "container": BASTION.container, "ip": BASTION.ip}
    if found is not None:
        entry["state"] = found.status
        with contextlib.suppress(Exception):
            entry["up"] = found.status == "running" and _sshd_answers(BASTION.ip)[0]
    return entry
