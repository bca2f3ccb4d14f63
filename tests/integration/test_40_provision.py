"""`flagops provision` on the lab: converges, re-runs with changed=0, `--check` changes
nothing, and preflight catches each broken condition for real, changing nothing.

The molecule scenarios (test_30) have already converged every role; here the whole
playbook runs through the CLI as a user runs it.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from flagops.lab.nodes import NODES

if TYPE_CHECKING:
    from conftest import Lab

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
INV = str(REPO / "inventories" / "lab.yaml")
NODE1, NODE2 = NODES


def provision(lab: Lab, *args: str, inventory: str = INV) -> tuple[int, list[dict[str, Any]]]:
    done = lab.flagops("provision", inventory, "--json", *args, check=False)
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return done.returncode, events


def result(events: list[dict[str, Any]]) -> dict[str, Any]:
    return next(e for e in reversed(events) if e.get("event") == "flagops_result")


def snapshot(lab: Lab) -> dict[str, str]:
    """What provision could change on the nodes: containers, images, /share/.flagops."""
    out = {}
    for n in NODES:
        out[n.hostname] = lab.ssh(
            n,
            "docker ps -a --no-trunc --format '{{.ID}} {{.Image}} {{.State}}' | sort; "
            "docker images --no-trunc -q | sort; "
            "find /share/.flagops /share/repos/FlagScale/examples -newer /etc/hostname -type f 2>/dev/null | sort; "
            "ls -la --time-style=+%s /root/.ssh",
        )
    return out


@pytest.fixture(scope="module")
def stopped(lab: Lab) -> Lab:
    """No service (the API and Ray ports must be free for preflight's port check)."""
    lab.flagops("stop", "-i", INV, check=False)
    return lab


def test_provision_converges(stopped: Lab) -> None:
    rc, events = provision(stopped)
    res = result(events)
    assert rc == 0 and res["ok"], res["failures"]
    assert set(res["recap"]) == {"node1", "node2"}


def test_second_run_reports_no_change(stopped: Lab) -> None:
    rc, events = provision(stopped)
    res = result(events)
    assert rc == 0, res["failures"]
    assert {h: r["changed"] for h, r in res["recap"].items()} == {"node1": 0, "node2": 0}
    changed = [(e["host"], e["task"]) for e in events if e.get("event") == "runner_on_ok" and e.get("changed")]
    assert changed == []


def test_check_diff_changes_nothing(stopped: Lab) -> None:
    before = snapshot(stopped)
    rc, events = provision(stopped, "--check", "--diff")
    assert rc == 0, result(events)["failures"]
    assert snapshot(stopped) == before


# Where Docker and flagops write on a node; overlay2/ and image/ (image layers, gigabytes)
# are left out for time: a login never reaches them. containers/*/config.v2.json stays in.
AT_REST = "/root/.docker /etc/docker /var/lib/docker /root/.flagops /root/.ansible /tmp /run /dev/shm"
REGISTRY = "172.30.0.1:5000"


def at_rest_hits(lab: Lab, password: str) -> dict[str, str]:
    """Where ``password`` is stored on the nodes: their disks and tmpfs (AT_REST), the
    share, a throwaway docker config left behind, a login in /root/.docker/config.json,
    a credential store or helper. {place: what was found}; {} when nowhere."""
    import base64

    from flagops.lab import services

    # docker keeps a login as base64("user:password"): grep for that form too
    patterns = password + "\n" + base64.b64encode(f"{services.REGISTRY_USER}:{password}".encode()).decode() + "\n"
    hits: dict[str, str] = {}
    excluded = "--exclude-dir=overlay2 --exclude-dir=image --exclude-dir=proc"
    for n in NODES:
        # the password goes to grep on stdin (-f -), never into a command line
        out = lab.ssh(n, f"grep -rlFs -D skip {excluded} -f - {AT_REST} 2>/dev/null; "
                         "ls -d /dev/shm/flagops-docker-* 2>/dev/null; true", stdin=patterns)
        if out.strip():
            hits[n.hostname] = out.strip()
        raw = lab.ssh(n, "cat /root/.docker/config.json 2>/dev/null; true")
        conf = json.loads(raw) if raw.strip() else {}
        kept = {k: v for k, v in conf.items() if k in ("credsStore", "credHelpers")}
        if REGISTRY in (conf.get("auths") or {}) or kept:
            hits[f"{n.hostname}:/root/.docker/config.json"] = json.dumps(
                {"auths": sorted(conf.get("auths") or {}), **kept})
        # a docker credential helper on the node (none is installed on the lab) must hold nothing
        helpers = lab.ssh(n, "for h in /usr/bin/docker-credential-* /usr/local/bin/docker-credential-*; do "
                             "[ -x \"$h\" ] && echo \"$h: $($h list 2>/dev/null)\"; done; true")
        if REGISTRY in helpers:
            hits[f"{n.hostname}:credential helper"] = helpers.strip()
    share = lab.ssh(NODE1, "grep -rlFs -D skip -f - /share 2>/dev/null; true", stdin=patterns)
    if share.strip():
        hits["share"] = share.strip()
    return hits


def test_no_registry_credential_at_rest(stopped: Lab) -> None:
    """A provision that logs in to the (htpasswd) lab registry leaves its password nowhere:
    not on any node's disk or tmpfs, not in the share, not in the run's artifacts."""
    from flagops.lab import services

    password = services.registry_password(stopped.paths)
    runs = Path(os.environ.get("FLAGOPS_HOME") or Path.home() / ".flagops").expanduser() / "runs"
    before = set(runs.rglob("*"))
    rc, events = provision(stopped, "--tags", "image")
    assert rc == 0, result(events)["failures"]
    logins = [e for e in events if e.get("event") == "runner_on_ok" and e.get("task", "").startswith("Image | log in")]
    assert {e["host"] for e in logins} == {"node1", "node2"}, "the login path did not run"
    assert at_rest_hits(stopped, password) == {}
    new = [p for p in runs.rglob("*") if p not in before and p.is_file()]
    assert new, runs
    leaked = [str(p) for p in new if password.encode() in p.read_bytes()]
    assert leaked == [], "the registry password reached run artifacts"
    out = "\n".join(json.dumps(e) for e in events)
    assert password not in out, "the registry password reached --json"


def test_at_rest_check_finds_a_planted_login(stopped: Lab) -> None:
    """The detector above is not blind: a `docker login` kept in node2's
    /root/.docker/config.json (what flagops did before) is found; the plant is removed."""
    from flagops.lab import services

    password = services.registry_password(stopped.paths)
    conf = "/root/.docker/config.json"
    saved = stopped.ssh(NODE2, f"cat {conf} 2>/dev/null; true")
    try:
        stopped.ssh(NODE2, f"docker login -u {services.REGISTRY_USER} --password-stdin {REGISTRY} >/dev/null 2>&1",
                    stdin=password + "\n")
        hits = at_rest_hits(stopped, password)
        assert f"node2:{conf}" in hits, hits
        assert set(hits) <= {"node2", f"node2:{conf}"}, hits  # node1 and the share stay clean
    finally:
        if saved.strip():
            stopped.ssh(NODE2, f"cat > {conf}", stdin=saved)
        else:
            stopped.ssh(NODE2, f"rm -f {conf}")
    assert at_rest_hits(stopped, password) == {}


def _split_layout(root: Path, vaulted: str) -> Path:
    """The lab inventory as many teams keep theirs: hosts in one file, every shared var in
    ``group_vars/all.yml`` (the hub token vault-encrypted), a host's address in ``host_vars/``."""
    inv = yaml.safe_load(Path(INV).read_text())
    (root / "group_vars").mkdir(parents=True)
    (root / "host_vars").mkdir()
    shared = {k: v for k, v in inv["all"]["vars"].items() if k != "flagops_hub_token"}
    hosts = {"all": {"children": inv["all"]["children"]}}
    node2 = hosts["all"]["children"]["workers"]["hosts"]["node2"]
    (root / "host_vars" / "node2.yml").write_text(yaml.safe_dump({"ansible_host": node2.pop("ansible_host")}))
    hosts["all"]["children"]["workers"]["hosts"]["node2"] = None
    (root / "group_vars" / "all.yml").write_text(yaml.safe_dump(shared, sort_keys=False) + vaulted)
    (root / "hosts.yml").write_text(yaml.safe_dump(hosts, sort_keys=False))
    return root / "hosts.yml"


# What `ansible-vault encrypt_string --name flagops_hub_token` writes: a secret that validate
# must accept without decrypting and that the playbooks decrypt with the operator's vault
# password. The plaintext is the lab hub's real token, so the provision logs in with it.
VAULT_PASSWORD = "lab-vault"


def _vault_token(plaintext: str) -> str:
    from ansible.parsing.vault import VaultLib, VaultSecret

    lib = VaultLib([("default", VaultSecret(VAULT_PASSWORD.encode()))])
    body = lib.encrypt(plaintext).decode()
    return "flagops_hub_token: !vault |\n" + "".join(f"  {line}\n" for line in body.splitlines())


def test_provision_from_group_vars_and_host_vars(stopped: Lab, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    token = os.environ.get("MODELSCOPE_API_TOKEN", "")
    assert token, "the lab fixture exports the lab hub's token"
    runs = Path(os.environ.get("FLAGOPS_HOME") or Path.home() / ".flagops").expanduser() / "runs"
    before = set(runs.rglob("*"))
    hosts = _split_layout(tmp_path / "inv", _vault_token(token))
    monkeypatch.delenv("MODELSCOPE_API_TOKEN")  # only the vaulted copy can log in now
    done = stopped.flagops("validate", str(hosts))
    assert "2 hosts: node1 172.30.0.11 (master, 1 slots), node2 172.30.0.12 (worker, 1 slots)" in done.stdout

    pw = tmp_path / "vault-pass"
    pw.write_text(VAULT_PASSWORD + "\n")
    monkeypatch.setenv("ANSIBLE_VAULT_PASSWORD_FILE", str(pw))
    rc, events = provision(stopped, inventory=str(hosts))
    res = result(events)
    assert rc == 0, res["failures"]
    # The same cluster as inventories/lab.yaml, already provisioned: nothing changes, not even
    # the rendered FlagScale files (they do not name the inventory's file).
    changed = [(e["host"], e["task"]) for e in events if e.get("event") == "runner_on_ok" and e.get("changed")]
    assert changed == []
    assert {h: r["changed"] for h, r in res["recap"].items()} == {"node1": 0, "node2": 0}
    new = [p for p in runs.rglob("*") if p not in before and p.is_file()]
    assert new, runs
    leaked = [str(p) for p in new if token.encode() in p.read_bytes()]
    assert leaked == [], "the decrypted vault value reached run artifacts"


def _preflight_fails(lab: Lab, inventory: str = INV) -> str:
    before = snapshot(lab)
    rc, events = provision(lab, "--tags", "preflight", inventory=inventory)
    assert rc != 0
    msg = "\n".join(f["msg"] for f in result(events)["failures"])
    assert snapshot(lab) == before, "a failing preflight changed a node"
    return msg


def test_preflight_docker_down_on_node2(stopped: Lab) -> None:
    stopped.ssh(NODE2, "service docker stop >/dev/null 2>&1; sleep 1; ! docker info >/dev/null 2>&1")
    try:
        rc, events = provision(stopped, "--tags", "preflight")
        msg = "\n".join(f["msg"] for f in result(events)["failures"])
        assert rc != 0
        assert "node2: docker: found" in msg and "fix: install Docker and start dockerd" in msg
        assert "node1: docker" not in msg
    finally:
        stopped.ssh(NODE2, "service docker start >/dev/null 2>&1; "
                           "for i in $(seq 60); do docker info >/dev/null 2>&1 && exit 0; sleep 0.5; done; exit 1")


def test_preflight_not_enough_free_space(stopped: Lab, tmp_path: Path) -> None:
    inv = yaml.safe_load(Path(INV).read_text())
    inv["all"]["vars"]["flagops_release_overrides"]["model"]["size_bytes"] = 10**16  # 10 PB of weights
    path = tmp_path / "lab-huge-model.yaml"
    path.write_text(yaml.safe_dump(inv))
    msg = _preflight_fails(stopped, str(path))
    assert "share_free_space: found" in msg and "bytes (weights x 1.1, minus" in msg
    assert "node1: share_free_space" in msg and "fix: free space on /share" in msg


def test_preflight_api_port_taken(stopped: Lab) -> None:
    pid = stopped.ssh(NODE1, "nohup python3 -m http.server 30000 --bind 0.0.0.0 >/dev/null 2>&1 & echo $!").strip()
    try:
        stopped.ssh(NODE1, "for i in $(seq 40); do ss -Hltn 'sport = :30000' | grep -q . && exit 0; "
                           "sleep 0.25; done; exit 1")
        msg = _preflight_fails(stopped)
        assert f"node1: port_30000: found in use by pid {pid}" in msg
        assert "fix: stop the process holding port 30000" in msg
    finally:
        stopped.ssh(NODE1, f"kill {shlex.quote(pid)}")


def test_preflight_share_not_shared(stopped: Lab) -> None:
    stopped.ssh(NODE2, "mount -t tmpfs -o size=64m flagops-test /share")
    try:
        msg = _preflight_fails(stopped)
        assert "node2: share_is_shared" in msg and "mount the same shared volume at /share" in msg
        assert "node1: share_is_shared" not in msg
    finally:
        stopped.ssh(NODE2, "umount /share")


def test_preflight_ssh_key_removed(stopped: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    # A fresh ControlPersist dir: an open master connection would hide the missing key.
    monkeypatch.setenv("ANSIBLE_SSH_CONTROL_PATH_DIR", str(tmp_path / "cp"))

    node = f"flagops-lab-{NODE2.hostname}"
    ak = "/root/.ssh/authorized_keys"
    before = stopped.ssh(NODE1, "docker ps -a --no-trunc -q; find /share/.flagops -type f | sort")
    subprocess.run(["docker", "exec", node, "mv", ak, ak + ".flagops-test"], check=True)
    try:
        rc, events = provision(stopped, "--tags", "preflight")
        msg = "\n".join(f["msg"] for f in result(events)["failures"])
        assert rc != 0
        assert "node2: ssh: found unreachable" in msg
        assert "check ansible_host/ansible_port/ansible_user and the key" in msg
        assert stopped.ssh(NODE1, "docker ps -a --no-trunc -q; find /share/.flagops -type f | sort") == before
    finally:
        subprocess.run(["docker", "exec", node, "mv", ak + ".flagops-test", ak], check=True)
