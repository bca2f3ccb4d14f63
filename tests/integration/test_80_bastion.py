"""The lab in bastion mode: the nodes only through a jump host, everything still works.

`flagops lab up --bastion` adds ``flagops-lab-bastion`` (172.30.0.10) and locks the nodes:
their sshd accepts logins only from the bastion and the nodes, and they reject every other
connection the controller opens (so the API on node1:30000 is unreachable directly).
``inventories/lab-bastion.yaml`` is the lab inventory plus ``-o ProxyJump=root@172.30.0.10``.
provision and deploy (Ansible's OpenSSH), status and verify (flagops' Fabric connections
and its port forward for the API) must all work through it. The module restores the
default lab (`flagops lab up`) and the remembered inventory when it ends.

Run alone:  python -m pytest tests/integration/test_80_bastion.py -q -p no:cacheprovider
(or ``-m bastion``).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from flagops import http as fhttp
from flagops import state
from flagops.lab.bastion import BASTION
from flagops.lab.nodes import NODES

if TYPE_CHECKING:
    from conftest import Lab

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.bastion]

REPO = Path(__file__).resolve().parents[2]
INV = str(REPO / "inventories" / "lab-bastion.yaml")
NODE1, NODE2 = NODES


def _ssh(lab: Lab, ip: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """A fresh ssh (no multiplexing) as root with the lab key and pinned host keys."""
    argv = ["ssh", "-i", str(lab.paths.ssh_key), "-o", f"UserKnownHostsFile={lab.paths.known_hosts}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
            "-o", "ControlMaster=no", "-o", "ControlPath=none", *extra, f"root@{ip}", "hostname"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def bastion_lab(lab: Lab) -> Iterator[Lab]:
    saved = state.read_state()
    done = lab.flagops("lab", "up", "--bastion", "--json")
    report = json.loads(done.stdout)
    assert report["ok"] and report["mode"] == "bastion", report
    try:
        yield lab
    finally:
        restored = json.loads(lab.flagops("lab", "up", "--json").stdout)
        if saved:
            state.write_state(**saved)
        assert restored["mode"] == "default"


def test_direct_ssh_to_a_node_is_refused(bastion_lab: Lab) -> None:
    for node in NODES:
        r = _ssh(bastion_lab, node.ip)
        assert r.returncode == 255, r
        assert "Permission denied" in r.stderr, r.stderr


def test_ssh_through_the_bastion_works(bastion_lab: Lab) -> None:
    # the hop's key and pinned host key come from the lab's ssh_config drop-in, as for Ansible
    for node in NODES:
        r = _ssh(bastion_lab, node.ip, "-o", f"ProxyJump=root@{BASTION.ip}")
        assert r.returncode == 0 and r.stdout.strip() == node.hostname, r


def test_lab_status_reports_the_mode(bastion_lab: Lab) -> None:
    st = json.loads(bastion_lab.flagops("lab", "status", "--json").stdout)
    assert st["ok"] and st["bastion"]["mode"] == "bastion" and st["bastion"]["up"]


def test_provision_deploy_status_verify_through_the_bastion(bastion_lab: Lab) -> None:
    t0 = time.monotonic()
    prov = bastion_lab.flagops("provision", INV, "--json", check=False)
    events = [json.loads(ln) for ln in prov.stdout.splitlines() if ln.startswith("{")]
    assert prov.returncode == 0, prov.stderr[-3000:]
    final = next(e for e in reversed(events) if e.get("event") == "flagops_result")
    assert final["ok"] is True, final
    t_prov = time.monotonic() - t0

    dep = bastion_lab.flagops("deploy", "ernie45", "-i", INV, "--json", check=False)
    docs = [json.loads(ln) for ln in dep.stdout.splitlines() if ln.startswith("{")]
    deployed = next(d for d in reversed(docs) if "action" in d)
    assert dep.returncode == 0 and deployed["ok"] and deployed["state"] == "SERVING", deployed

    st = json.loads(bastion_lab.flagops("status", "-i", INV, "--probe", "--json", check=False).stdout)
    assert st["state"] == "SERVING", st
    assert st["via"] == f"ssh via root@{BASTION.ip}" and st["health"] == 200
    assert all(n["container"]["running"] for n in st["nodes"].values())

    # the API answered flagops through the tunnel only: directly, node1 rejects the controller
    direct = fhttp.get(st["endpoint"] + "/health", timeout=5)
    assert direct.status == 0, direct

    # --bench: the asyncio client streams through the same forward
    ver = bastion_lab.flagops("verify", "-i", INV, "--json", "--bench", "--num-prompts", "4", "--concurrency", "2",
                              check=False)
    doc = json.loads(ver.stdout)
    assert ver.returncode == 0 and doc["ok"], [c for c in doc["checks"] if c["status"] == "fail"]
    assert doc["via"] == f"ssh via root@{BASTION.ip}"
    passed = {c["name"] for c in doc["checks"] if c["status"] == "pass"}
    assert {"service.health", "service.chat", "service.chat_stream", "cluster.containers", "cluster.ray",
            "output.consistency", "bench.serve"} <= passed
    assert doc["bench"]["completed"] == 4
    print(f"bastion: provision {t_prov:.1f}s, deploy {deployed['seconds']['total']}s, verify {doc['wall_s']}s")
