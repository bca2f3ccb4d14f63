"""The lab is a real cluster: ssh, registry, shared storage, model and git servers, DinD.

Run with ``pytest -m lab tests/integration`` (brings the lab up once; the last test
takes it down and checks that nothing is left).
"""

from __future__ import annotations

import json
import secrets
import shlex
import subprocess
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import docker
import pytest

from flagops.lab import nodes
from flagops.lab.lab import IMAGE_REF
from flagops.lab.nodes import NODES

if TYPE_CHECKING:
    from conftest import Lab

quote = shlex.quote


pytestmark = pytest.mark.lab

NODE1, NODE2 = NODES


def test_ssh_reaches_each_node(lab: Lab, node: nodes.Node) -> None:
    assert lab.ssh(node, "hostname").strip() == node.hostname


def test_known_hosts_pins_every_node(lab: Lab) -> None:
    for node in NODES:
        found = subprocess.run(
            ["ssh-keygen", "-F", node.ip, "-f", str(lab.paths.known_hosts)],
            capture_output=True,
            text=True,
        )
        assert found.returncode == 0, f"{node.ip} not pinned in {lab.paths.known_hosts}"


def test_node1_reaches_node2_over_ssh(lab: Lab) -> None:
    command = f"ssh -o BatchMode=yes -o StrictHostKeyChecking=yes root@{NODE2.hostname} hostname"
    assert lab.ssh(NODE1, command).strip() == NODE2.hostname


def test_each_node_runs_its_own_dockerd(lab: Lab, node: nodes.Node) -> None:
    info = lab.ssh(node, "docker info --format '{{.Name}} {{.Driver}} {{.DefaultRuntime}}'")
    assert info.split() == [node.hostname, "overlay2", "lab-runc"]


def test_node_pulls_from_registry(lab: Lab, node: nodes.Node) -> None:
    lab.pull(node, IMAGE_REF)
    inspect = f"docker image inspect --format '{{{{json .RepoDigests}}}}' {quote(IMAGE_REF)}"
    digests = lab.ssh(node, inspect)
    assert f"{IMAGE_REF.rsplit(':', 1)[0]}@{lab.facts['image_digest']}" in json.loads(digests)


def test_registry_refuses_a_pull_without_login(lab: Lab, node: nodes.Node) -> None:
    """The lab registry demands a login (htpasswd), so the login path a800 takes is real."""
    out = lab.ssh(node, f"d=$(mktemp -d /dev/shm/flagops-test-XXXXXX); DOCKER_CONFIG=$d docker pull "
                        f"{quote(IMAGE_REF)} 2>&1; echo rc=$?; rm -rf \"$d\"")
    assert "rc=0" not in out and "no basic auth credentials" in out, out


def test_host_push_keeps_no_registry_login(lab: Lab) -> None:
    """`lab up` pushes with the SDK's auth_config: the host's docker config holds no login."""
    from flagops.lab import services

    password = services.registry_password(lab.paths)
    assert (lab.paths.root / "registry-auth" / "password").stat().st_mode & 0o077 == 0
    assert (lab.paths.root / "registry-auth" / "htpasswd").stat().st_mode & 0o077 == 0
    config = Path.home() / ".docker" / "config.json"
    assert not config.is_file() or password not in config.read_text()
    url = f"http://{services.LOOPBACK}:{services.REGISTRY_PORT}/v2/"
    assert services._http_status(url) == 401
    assert services._http_status(url, services.basic_auth(services.REGISTRY_USER, password)) == 200


def test_share_is_shared(lab: Lab) -> None:
    nonce = secrets.token_hex(8)
    path = f"/share/.lab-test-{nonce}"
    lab.ssh(NODE1, f"echo {quote(nonce)} > {quote(path)}")
    try:
        assert lab.ssh(NODE2, f"cat {quote(path)}").strip() == nonce
        assert (lab.paths.share / f".lab-test-{nonce}").read_text().strip() == nonce
    finally:
        lab.ssh(NODE2, f"rm -f {quote(path)}")


RANGE_PROBE = textwrap.dedent("""
    import hashlib, json, sys, urllib.request
    base = sys.argv[1]
    manifest = json.load(urllib.request.urlopen(base + "manifest.json"))
    entry = manifest["files"][0]
    request = urllib.request.Request(base + entry["path"], headers={"Range": "bytes=0-15"})
    with urllib.request.urlopen(request) as resp:
        print(json.dumps({"status": resp.status, "range": resp.headers["Content-Range"],
                          "head": resp.read().hex(), "path": entry["path"], "size": entry["size"]}))
""")


def test_model_server_serves_manifest_and_ranges(lab: Lab, node: nodes.Node) -> None:
    out = lab.ssh(node, f"python3 -c {quote(RANGE_PROBE)} {quote(lab.facts['model_url'])}")
    got = json.loads(out)
    assert got["status"] == 206
    assert got["range"] == f"bytes 0-15/{got['size']}"
    local = lab.paths.published / lab.facts["model"] / got["path"]
    assert bytes.fromhex(got["head"]) == local.read_bytes()[:16]


def test_git_server_serves_flagscale(lab: Lab, node: nodes.Node) -> None:
    refs = lab.ssh(node, f"git ls-remote {quote(lab.facts['flagscale_repo'])} HEAD")
    assert refs.split()[0] == lab.facts["flagscale_commit"]


def test_privileged_container_runs_in_node(lab: Lab) -> None:
    lab.pull(NODE1, IMAGE_REF)
    inner = "mount -t tmpfs lab /mnt && grep CapEff /proc/self/status"
    run = f"docker run --rm --privileged --net=host {quote(IMAGE_REF)} sh -c {quote(inner)}"
    out = lab.ssh(NODE1, run)
    assert "CapEff" in out  # a privileged mount succeeded inside a container inside the node


def test_status_reports_every_component_up(lab: Lab) -> None:
    report = json.loads(lab.flagops("lab", "status", "--json").stdout)
    assert report["ok"], report
    assert set(report["services"]) == {"registry", "registry-forward", "model-server", "model-hub", "git-server"}


def _node_identity(lab: Lab) -> dict[str, tuple[str, str]]:
    """Per node: its container id and its dockerd pid (both change if anything restarts)."""
    return {
        n.hostname: (
            (lab.paths.node_dir(n.hostname) / "container-id").read_text(),
            lab.ssh(n, "cat /var/run/docker.pid"),
        )
        for n in NODES
    }


def test_up_again_is_warm_and_keeps_nodes(lab: Lab) -> None:
    before = _node_identity(lab)
    report = json.loads(lab.flagops("lab", "up", "--json").stdout)
    assert report["seconds"] <= 30, report["steps"]
    assert _node_identity(lab) == before


def test_up_restarts_a_node_that_was_killed_with_containers_running(lab: Lab) -> None:
    """An unclean stop (a host crash, a machine restored from a snapshot) leaves the last
    boot's containerd pid file and sockets in the node's /run; `lab up` must still bring
    the node back, and its dockerd must restart the containers that have a restart policy."""
    probe = "flagops-test-killed-node-probe"
    lab.ssh(NODE1, f"docker rm -f {probe} >/dev/null 2>&1 || true")
    lab.pull(NODE1, IMAGE_REF)
    lab.ssh(NODE1, f"docker run -d --name {probe} --restart unless-stopped --entrypoint sleep "
                   f"{quote(IMAGE_REF)} infinity")
    try:
        docker.from_env().containers.get(NODE1.container).kill()
        report = json.loads(lab.flagops("lab", "up", "--json").stdout)
        assert report["ok"], report["steps"]
        state = lab.ssh(NODE1, f"docker inspect --format '{{{{.State.Running}}}}' {probe}")
        assert state.strip() == "true"
    finally:
        lab.ssh(NODE1, f"docker rm -f {probe} >/dev/null 2>&1 || true")
