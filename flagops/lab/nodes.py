"""The lab nodes: 1 to 4 Docker-in-Docker containers that behave as hosts (default 2).

Each node is a container of the node image (``assets/node``) on the bridge network
``flagops-lab`` with a fixed address, its own sshd (root, key auth, host key pinned in
the lab's known_hosts) and its own dockerd (overlay2 on a bind-mounted directory).
The host lacks CAP_SYS_RESOURCE, so nodes are not ``--privileged``: they get every
other capability and an open devices cgroup, and ``node-init`` does the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import socket
import subprocess
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors

from flagops.lab import LabError, Progress
from flagops.lab.paths import LabPaths
from flagops.lab.rootfs import build_base_image

NETWORK = "flagops-lab"
BRIDGE = "flopslab0"
SUBNET = "172.30.0.0/24"
GATEWAY = "172.30.0.1"
LAB_LABEL = "io.flagops.lab"
IMAGE_LABEL = "io.flagops.lab.image"
NODE_REPO = "flagops-lab/node"
BASE_TAG = "flagops-lab/node-base:bookworm"
ASSETS = Path(__file__).parent / "assets" / "node"
CGROUP_ROOT = Path("/sys/fs/cgroup")

NODE_PACKAGES = [
    "ca-certificates",
    "docker.io",
    "git",
    "iproute2",
    "iptables",
    "kmod",
    "openssh-server",
    # dockerd unpacks pulled layers with unpigz when it is on PATH: about half the CPU of
    # Go's gzip, and the lab's nodes share the host's cores
    "pigz",
    "procps",
    "python3",
    "python3-docker",
    "python3-requests",
    "rsync",
    "socat",
    "sudo",
    "tini",
]

# A privileged container minus the one capability this machine does not have.
RUN_AS_HOST = {
    "cap_add": ["ALL"],
    "cap_drop": ["SYS_RESOURCE"],
    "device_cgroup_rules": ["a *:* rwm"],
    "security_opt": ["seccomp=unconfined", "apparmor=unconfined"],
    "cgroupns": "private",
}


@dataclass(frozen=True)
class Node:
    hostname: str
    ip: str

    @property
    def container(self) -> str:
        return f"flagops-lab-{self.hostname}"


MAX_NODES = 4
DEFAULT_NODES = 2


def lab_node(index: int) -> Node:
    """Node ``index`` (1-based): hostname ``node<i>``, address ``172.30.0.<10+i>``."""
    return Node(f"node{index}", f"172.30.0.{10 + index}")


ALL_NODES = tuple(lab_node(i) for i in range(1, MAX_NODES + 1))
NODES = ALL_NODES[:DEFAULT_NODES]  # the default lab: node1 172.30.0.11, node2 172.30.0.12


def lab_nodes(count: int = DEFAULT_NODES) -> tuple[Node, ...]:
    """The first ``count`` nodes (node1 is always the master); ``count`` is 1..MAX_NODES."""
    if not 1 <= count <= MAX_NODES:
        raise LabError(f"the lab has 1 to {MAX_NODES} nodes, not {count}")
    return ALL_NODES[:count]


# --------------------------------------------------------------------------- image


def node_image_tag(base_id: str) -> str:
    """``flagops-lab/node:<hash>`` of the base image and every asset file."""
    digest = hashlib.sha256(base_id.encode())
    for path in sorted(ASSETS.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return f"{NODE_REPO}:{digest.hexdigest()[:12]}"


def ensure_node_image(client: docker.DockerClient, paths: LabPaths, progress: Progress) -> str:
    """Build (or reuse) the node image; returns its tag."""
    base_id = build_base_image(client, BASE_TAG, NODE_PACKAGES, paths.cache, progress)
    tag = node_image_tag(base_id)
    try:
        client.images.get(tag)
        progress(f"node image {tag}: cached")
        return tag
    except docker.errors.ImageNotFound:
        pass
    progress(f"node image {tag}: building")
    client.images.build(
        path=str(ASSETS),
        tag=tag,
        buildargs={"BASE": base_id},
        network_mode="none",
        rm=True,
        labels={LAB_LABEL: "1"},
    )
    return tag


def prune_node_images(client: docker.DockerClient, keep: str) -> None:
    """Drop earlier node image builds (after the nodes moved to ``keep``)."""
    for image in client.images.list(NODE_REPO):
        for old in image.tags:
            if old != keep:
                with contextlib.suppress(docker.errors.APIError):
                    client.images.remove(old)


# --------------------------------------------------------------------------- network


def ensure_network(client: docker.DockerClient, progress: Progress) -> None:
    """The lab bridge ``flagops-lab`` (172.30.0.0/24, gateway 172.30.0.1 on ``flopslab0``)."""
    try:
        net = client.networks.get(NETWORK)
    except docker.errors.NotFound:
        ipam = docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=SUBNET, gateway=GATEWAY)])
        client.networks.create(
            NETWORK,
            driver="bridge",
            ipam=ipam,
            labels={LAB_LABEL: "1"},
            options={"com.docker.network.bridge.name": BRIDGE},
        )
        progress(f"network {NETWORK}: created ({SUBNET}, bridge {BRIDGE})")
        return
    configs = net.attrs.get("IPAM", {}).get("Config") or []
    if not any(c.get("Subnet") == SUBNET for c in configs):
        raise LabError(f"network {NETWORK} exists with {configs}, not {SUBNET}; remove it (`flagops lab down`)")


def remove_network(client: docker.DockerClient, progress: Progress) -> None:
    try:
        client.networks.get(NETWORK).remove()
        progress(f"network {NETWORK}: removed")
    except docker.errors.NotFound:
        pass


# --------------------------------------------------------------------------- ssh


def _keygen(path: Path, comment: str) -> None:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
            check=True,
            capture_output=True,
        )


def host_key(paths: LabPaths, node: Node) -> Path:
    return paths.node_dir(node.hostname) / "ssh_host_ed25519_key"


def ensure_ssh_keys(paths: LabPaths, nodes: tuple[Node, ...] = NODES) -> None:
    """The lab's root key pair, one host key per node, and the known_hosts pinning them.

    Host keys live under ``<lab>/nodes/<node>/`` so a recreated node keeps its identity.
    """
    paths.ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
    _keygen(paths.ssh_key, "flagops-lab")
    for node in nodes:
        _keygen(host_key(paths, node), f"root@{node.hostname}")
    paths.known_hosts.write_text(known_hosts_text(paths, nodes))


def known_hosts_text(paths: LabPaths, nodes: tuple[Node, ...] = NODES) -> str:
    """One line per node of the lab, valid for its address, hostname and container name."""
    lines = []
    for node in nodes:
        kind, key = host_key(paths, node).with_suffix(".pub").read_text().split()[:2]
        lines.append(f"{node.ip},{node.hostname},{node.container} {kind} {key}\n")
    return "".join(lines)


def _node_files(paths: LabPaths, node: Node, nodes: tuple[Node, ...]) -> bytes:
    """A tar of the per-node secrets: host key, root's authorized_keys, key pair, known_hosts."""
    pub = paths.ssh_key.with_suffix(".pub").read_bytes()
    files = [
        ("etc/ssh/ssh_host_ed25519_key", host_key(paths, node).read_bytes(), 0o600),
        (
            "etc/ssh/ssh_host_ed25519_key.pub",
            host_key(paths, node).with_suffix(".pub").read_bytes(),
            0o644,
        ),
        ("root/.ssh/authorized_keys", pub, 0o600),
        ("root/.ssh/id_ed25519", paths.ssh_key.read_bytes(), 0o600),
        ("root/.ssh/id_ed25519.pub", pub, 0o644),
        ("root/.ssh/known_hosts", known_hosts_text(paths, nodes).encode(), 0o644),
    ]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        dirs = tarfile.TarInfo("root/.ssh")
        dirs.type, dirs.mode = tarfile.DIRTYPE, 0o700
        tar.addfile(dirs)
        for name, data, mode in files:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# --------------------------------------------------------------------------- nodes


def _find(client: docker.DockerClient, node: Node) -> docker.models.containers.Container | None:
    try:
        return client.containers.get(node.container)
    except docker.errors.NotFound:
        return None


def _create(client: docker.DockerClient, image: str, paths: LabPaths, node: Node,
            nodes: tuple[Node, ...] = NODES) -> None:
    data_dir = paths.node_dir(node.hostname) / "docker"
    data_dir.mkdir(parents=True, exist_ok=True)
    paths.share.mkdir(parents=True, exist_ok=True)
    api = client.api
    host_config = api.create_host_config(
        binds={
            str(paths.share): {"bind": "/share", "mode": "rw"},
            str(data_dir): {"bind": "/var/lib/docker", "mode": "rw"},
        },
        # A host's /dev/shm: the FlagOS container uses it through --ipc=host, and
        # vLLM's message queues need more than Docker's default 64 MiB.
        shm_size="2g",
        **RUN_AS_HOST,
    )
    networking = api.create_networking_config(
        {NETWORK: api.create_endpoint_config(ipv4_address=node.ip, aliases=[node.hostname])}
    )
    created = api.create_container(
        image,
        name=node.container,
        hostname=node.hostname,
        detach=True,
        host_config=host_config,
        networking_config=networking,
        labels={LAB_LABEL: "1", IMAGE_LABEL: image},
        stop_signal="SIGTERM",
    )
    api.put_archive(created["Id"], "/", _node_files(paths, node, nodes))
    # Recorded so `lab down` can clear the cgroup dirs this container leaves even if
    # someone removed the container by hand.
    (paths.node_dir(node.hostname) / "container-id").write_text(created["Id"])
    api.start(created["Id"])


def ensure_nodes(client: docker.DockerClient, image: str, paths: LabPaths, progress: Progress,
                 nodes: tuple[Node, ...] = NODES) -> tuple[Node, ...]:
    """Create/start ``nodes`` (recreating one of another image), remove the lab's other
    nodes (a smaller lab: flagops created them; their docker data dirs stay as a cache),
    then wait for sshd and dockerd. Returns the nodes removed."""
    extra = [n for n in ALL_NODES if n not in nodes and _find(client, n) is not None]
    for node in extra:
        _remove(client, paths, node)
        progress(f"{node.container}: removed (the lab now has {len(nodes)} node{'s' * (len(nodes) > 1)})")
    for node in nodes:
        found = _find(client, node)
        if found is not None and found.labels.get(IMAGE_LABEL) != image:
            progress(f"{node.container}: image changed, recreating")
            _remove(client, paths, node)
            found = None
        if found is None:
            _create(client, image, paths, node, nodes)
            progress(f"{node.container}: created ({node.ip})")
        elif found.status != "running":
            found.start()
            progress(f"{node.container}: started")
    for node in nodes:
        wait_node(client, node)
    return tuple(extra)


def node_exec(client: docker.DockerClient, node: Node, argv: list[str]) -> tuple[int, str]:
    """Run ``argv`` in the node (no shell); returns (exit code, output)."""
    rc, out = client.containers.get(node.container).exec_run(argv)
    return rc, out.decode(errors="replace")


def _ready(client: docker.DockerClient, node: Node) -> tuple[bool, str]:
    """sshd answers on the node's address and the node's dockerd answers inside it."""
    try:
        with socket.create_connection((node.ip, 22), timeout=1) as s:
            banner = s.recv(64).decode(errors="replace")
    except OSError as exc:
        return False, f"sshd: {exc}"
    if not banner.startswith("SSH-"):
        return False, f"sshd: unexpected banner {banner!r}"
    rc, out = node_exec(client, node, ["docker", "info", "--format", "{{.ServerVersion}} {{.Driver}}"])
    return rc == 0, out.strip()


def wait_node(client: docker.DockerClient, node: Node, timeout: float = 90.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        container = _find(client, node)
        if container is None or container.status == "exited":
            logs = container.logs(tail=20).decode(errors="replace") if container else ""
            raise LabError(f"{node.container} is not running:\n{logs}")
        ok, detail = _ready(client, node)
        if ok:
            return detail
        if time.monotonic() > deadline:
            _, log = node_exec(client, node, ["tail", "-n", "5", "/var/log/docker.log"])
            raise LabError(f"{node.container} not ready after {timeout:.0f}s: {detail}\n"
                           f"last lines of its /var/log/docker.log:\n{log.rstrip()}")
        time.sleep(0.5)
        container.reload()


def _remove(client: docker.DockerClient, paths: LabPaths, node: Node) -> tuple[bool, list[str]]:
    """Stop and remove the node, then clear its cgroup dirs; returns (it existed, dirs left)."""
    found = _find(client, node)
    if found is not None:
        # A graceful stop lets node-init stop the inner containers (fewer stale cgroups).
        found.stop(timeout=20)
        found.remove(force=True)
    return found is not None, gc_cgroups(paths, node)


def remove_nodes(client: docker.DockerClient, paths: LabPaths, progress: Progress) -> None:
    """Remove every lab node, whatever size the lab had (node1..node4)."""
    with ThreadPoolExecutor(len(ALL_NODES)) as pool:
        removed = list(pool.map(lambda n: _remove(client, paths, n), ALL_NODES))
    for node, (was, left) in zip(ALL_NODES, removed, strict=True):
        if was:
            progress(f"{node.container}: removed")
        if left:
            progress(f"{node.container}: cgroup dirs still in use: {', '.join(left[:3])}")


def stale_cgroup_dirs(container_id: str) -> list[Path]:
    """The cgroup v1 dirs a removed node left behind (nested cgroups block runc's rmdir)."""
    if not container_id:
        return []
    return [d for d in CGROUP_ROOT.glob(f"*/docker/{container_id}") if d.is_dir()]


def gc_cgroups(paths: LabPaths, node: Node) -> list[str]:
    """rmdir, deepest first, the cgroup dirs of the node's recorded container.

    Returns the dirs still in use (they hold tasks).
    """
    id_file = paths.node_dir(node.hostname) / "container-id"
    if not id_file.exists():
        return []
    left = []
    for top in stale_cgroup_dirs(id_file.read_text().strip()):
        for dirpath, _dirs, _files in os.walk(top, topdown=False):
            try:
                os.rmdir(dirpath)
            except OSError:
                left.append(dirpath)
    if not left:
        id_file.unlink()
    return left


def nodes_status(client: docker.DockerClient, paths: LabPaths,
                 nodes: tuple[Node, ...] = NODES) -> dict[str, dict[str, object]]:
    """Each node of the lab (``nodes``), plus any other lab node still present (``extra``:
    not part of the lab's size; it does not count towards the lab being up)."""
    out: dict[str, dict[str, object]] = {}
    for node in ALL_NODES:
        container = _find(client, node)
        if node not in nodes:
            if container is not None:
                out[node.hostname] = {"container": node.container, "ip": node.ip, "state": container.status,
                                      "up": False, "extra": True,
                                      "detail": f"not part of the {len(nodes)}-node lab (`lab up` removes it)"}
            continue
        entry: dict[str, object] = {
            "container": node.container,
            "ip": node.ip,
            "state": "absent",
            "up": False,
        }
        if container is not None:
            entry["state"] = container.status
            entry["image"] = container.labels.get(IMAGE_LABEL)
            if container.status == "running":
                ok, detail = _ready(client, node)
                entry["up"], entry["detail"] = ok, detail
        id_file = paths.node_dir(node.hostname) / "container-id"
        if container is None and id_file.exists():
            entry["stale_cgroups"] = [str(d) for d in stale_cgroup_dirs(id_file.read_text().strip())]
        out[node.hostname] = entry
    return out
