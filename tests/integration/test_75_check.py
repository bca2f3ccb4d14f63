"""flagops check on the lab (issue 15): a healthy lab passes in <= 10 s; each planted fault is
named before launch with the node and a fix, and every fault is removed in ``finally``.

Faults (all real, all on node2):

- its container's /etc/hosts maps its hostname to 127.0.1.1;
- a different package version in its container (filelock 4.3.2 from the lab's wheel server
  over the image's 4.3.1, with pip), which also makes `flagops deploy` refuse and
  `deploy --force` say what it skipped;
- its view of the weights is an empty directory (a bind mount inside that container only);
- a stray `ray start --head` in its container on a port flagops does not use;
- with the service stopped (before a launch): a listener squatting Ray's pinned dashboard
  agent port 52365 on the node, and `flagops deploy` refusing on it; then node2's firewall
  dropping node1's packets to that port (iptables, removed in ``finally``).

Timings and messages go to ``$FLAGOPS_CHECK_OUT`` (JSON) when set; ``bench/check.py`` runs
this file with it and writes ``bench/results/check.json``. Run alone:
``flock /tmp/flagops-lab.lock pytest -m lab tests/integration/test_75_check.py``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from flagops.lab.nodes import NODES
from flagops.lab.paths import LabPaths

if TYPE_CHECKING:
    from conftest import Lab

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
INV = str(REPO / "inventories" / "lab.yaml")
NODE1, NODE2 = NODES
VENV = "source /opt/venvs/flagscale-inference/bin/activate"
MODEL_DIR = "/models/ERNIE-4.5-tiny-MoE"
RESULTS: dict[str, dict[str, Any]] = {}
HEALTHY_LIMIT_S = 10.0


def fo(*args: str, timeout: float = 900) -> tuple[int, str, str, float]:
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "flagops", *args], capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout, done.stderr, time.monotonic() - t0


def run_check() -> tuple[int, dict[str, Any], float]:
    rc, out, err, took = fo("check", INV, "--json")
    try:
        doc = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        raise AssertionError(f"flagops check printed no JSON (rc {rc}):\n{out}\n{err}") from exc
    return rc, doc, took


def in_container(lab: Lab, node: Any, script: str, timeout: float = 120) -> str:
    return lab.ssh(node, f"docker exec flagos bash -c {shlex.quote(script)}", timeout=timeout)


def record(name: str, doc: dict[str, Any], took: float, checks: list[str]) -> None:
    named = [f for f in doc["failures"] if any(f["check"].startswith(c) for c in checks)]
    RESULTS[name] = {
        "detect_s": round(took, 2),
        "check_s": doc.get("seconds"),
        "failures": [{k: f[k] for k in ("node", "check", "found", "fix")} for f in named],
        "other_failures": [f"{f['node']}: {f['check']}" for f in doc["failures"] if f not in named],
    }


def failing(doc: dict[str, Any]) -> list[tuple[str, str]]:
    return [(f["node"], f["check"]) for f in doc["failures"]]


@pytest.fixture(scope="module", autouse=True)
def write_results() -> Iterator[None]:
    yield
    out = os.environ.get("FLAGOPS_CHECK_OUT")
    if out:
        Path(out).write_text(json.dumps(RESULTS, indent=1, sort_keys=True) + "\n")


@pytest.fixture(scope="module")
def serving(lab: Lab) -> Lab:
    rc, out, err, _ = fo("status", "-i", INV, "--json", "--probe")
    if json.loads(out)["state"] != "SERVING":
        rc, out, err, _ = fo("deploy", "ernie45", "-i", INV, "--json")
        assert rc == 0, f"deploy failed:\n{out[-2000:]}\n{err[-2000:]}"
    return lab


def assert_healthy(name: str) -> dict[str, Any]:
    rc, doc, took = run_check()
    assert rc == 0 and doc["ok"], f"not healthy: {failing(doc)}\n{json.dumps(doc['failures'], indent=1)[:3000]}"
    RESULTS.setdefault(name, {}).update(wall_s=round(took, 2), check_s=doc["seconds"], passed=doc["passed"],
                                        skipped=doc["skipped"], nodes=doc["nodes"])
    return doc


def test_a_healthy_serving_lab_passes_within_10s(serving: Lab) -> None:
    times = []
    for _ in range(3):
        assert_healthy("healthy_serving")
        times.append(RESULTS["healthy_serving"]["wall_s"])
    RESULTS["healthy_serving"]["wall_s_runs"] = times
    assert min(times) <= HEALTHY_LIMIT_S, times
    assert {"node_ip", "hostname", "port", "collective", "parity", "weights", "leftover",
            "ray_nodes"} <= set(RESULTS["healthy_serving"]["passed"])


def test_hostname_resolving_to_loopback_in_node2s_container(serving: Lab) -> None:
    backup = "/root/.flagops-check-hosts.bak"
    in_container(serving, NODE2, f"cp /etc/hosts {backup} && {{ echo '127.0.1.1 {NODE2.hostname}'; "
                                 f"cat {backup}; }} > /etc/hosts")
    try:
        assert "127.0.1.1" in in_container(serving, NODE2, f"getent hosts {NODE2.hostname}")
        rc, doc, took = run_check()
        record("hostname_loopback", doc, took, ["hostname"])
        assert rc == 1
        f = next(f for f in doc["failures"] if f["check"] == "hostname")
        assert f["node"] == NODE2.hostname and "127.0.1.1" in f["found"] and NODE2.ip in f["required"]
    finally:
        in_container(serving, NODE2, f"cat {backup} > /etc/hosts && rm -f {backup}")
    assert "127.0.1.1" not in in_container(serving, NODE2, f"getent hosts {NODE2.hostname}")


def test_a_worker_that_lost_the_master_containers_key(serving: Lab) -> None:
    """A rebuilt worker host: FlagScale's `ssh` from the master's container is refused, so the
    worker's `ray start` would never run and the launch would hang; check names it first."""
    keys = "/root/.ssh/authorized_keys"
    backup = "/root/.flagops-check-authorized_keys.bak"
    serving.ssh(NODE2, f"cp -p {keys} {backup} && grep -v flagops-master {backup} > {keys}")
    try:
        rc, doc, took = run_check()
        record("ssh_trust_lost", doc, took, ["ssh_trust"])
        assert rc == 1
        assert ("node2", "ssh_trust") in failing(doc), failing(doc)
        f = next(f for f in doc["failures"] if f["check"] == "ssh_trust")
        assert "Permission denied" in f["found"] and "--tags ssh_trust" in f["fix"]
    finally:
        serving.ssh(NODE2, f"cat {backup} > {keys} && rm -f {backup}")
    assert_healthy("healthy_after_ssh_trust")


@pytest.fixture
def wheels(serving: Lab) -> Iterator[str]:
    """filelock 4.3.2 (the lab's wheel server) and the image's 4.3.1, on shared storage."""
    paths = LabPaths.default()
    d = paths.share / ".flagops" / "check-test"
    d.mkdir(parents=True, exist_ok=True)
    for src in (paths.root / "published" / "wheels" / "filelock-4.3.2-py3-none-any.whl",
                paths.root / "cache" / "wheelhouse" / "filelock-4.3.1-py3-none-any.whl"):
        assert src.is_file(), f"missing {src}"
        shutil.copy2(src, d / src.name)
    yield "/share/.flagops/check-test"
    shutil.rmtree(d, ignore_errors=True)


def test_a_different_package_version_in_node2s_container(serving: Lab, wheels: str) -> None:
    pip = f"{VENV} && PIP_DISABLE_PIP_VERSION_CHECK=1 pip install -q --no-index --no-deps --force-reinstall"
    before = in_container(serving, NODE2, f"{VENV} && python -c 'import importlib.metadata as m; "
                                          "print(m.version(\"filelock\"))'").strip()
    assert before == "4.3.1"
    in_container(serving, NODE2, f"{pip} {wheels}/filelock-4.3.2-py3-none-any.whl")
    try:
        rc, doc, took = run_check()
        record("package_version", doc, took, ["parity"])
        assert rc == 1
        f = next(f for f in doc["failures"] if f["check"] == "parity.packages")
        assert f["node"] == NODE2.hostname and "filelock 4.3.2 (on node1: 4.3.1)" in f["found"]
        # deploy refuses before launching; --force says what it skipped (the service is kept)
        rc, out, err, took = fo("deploy", "ernie45", "-i", INV)
        RESULTS["package_version"]["deploy_refused_s"] = round(took, 2)
        assert rc == 1 and "deploy refused" in err and "parity.packages" in err, err[-2000:]
        rc, out, err, took = fo("deploy", "ernie45", "-i", INV, "--force")
        RESULTS["package_version"]["deploy_force_s"] = round(took, 2)
        assert rc == 0, err[-2000:]
        assert "--force: launching anyway, skipping:" in err and "node2: parity.packages" in err
    finally:
        in_container(serving, NODE2, f"{pip} {wheels}/filelock-4.3.1-py3-none-any.whl")
    assert in_container(serving, NODE2, f"{VENV} && python -c 'import importlib.metadata as m; "
                                        "print(m.version(\"filelock\"))'").strip() == "4.3.1"


def test_node2_sees_an_empty_weights_directory(serving: Lab) -> None:
    empty = "/tmp/flagops-check-empty"
    in_container(serving, NODE2, f"mkdir -p {empty} && mount --bind {empty} {MODEL_DIR}")
    try:
        assert in_container(serving, NODE2, f"ls -A {MODEL_DIR} | wc -l").strip() == "0"
        assert in_container(serving, NODE1, f"ls -A {MODEL_DIR} | wc -l").strip() != "0"
        rc, doc, took = run_check()
        record("weights_empty", doc, took, ["weights"])
        assert rc == 1
        assert [(f["node"], f["check"]) for f in doc["failures"] if f["check"].startswith("weights")] == [
            (NODE2.hostname, "weights")]
    finally:
        in_container(serving, NODE2, f"umount {MODEL_DIR}; rmdir {empty}")
    assert in_container(serving, NODE2, f"ls -A {MODEL_DIR} | wc -l").strip() != "0"


STRAY = "/tmp/ray-flagops-check-stray"


def _stray_pids(lab: Lab) -> list[int]:
    # [/] keeps grep (and the shell around it) from matching its own command line
    out = in_container(lab, NODE2, f"grep -l -a -E -- '[/]{STRAY[1:]}' /proc/[0-9]*/cmdline 2>/dev/null "
                                   "| cut -d/ -f3 || true")
    return sorted(int(x) for x in out.split() if x.isdigit())


def test_a_stray_ray_head_in_node2s_container(serving: Lab) -> None:
    in_container(serving, NODE2, f"{VENV} && RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 ray start --head "
                                 f"--port=6390 --num-cpus=0 --include-dashboard=false --temp-dir={STRAY} "
                                 "--dashboard-agent-listen-port=52399 --ray-client-server-port=20099 "
                                 "--disable-usage-stats >/dev/null 2>&1", timeout=180)
    try:
        assert _stray_pids(serving), "the stray head did not start"
        rc, doc, took = run_check()
        record("stray_ray_head", doc, took, ["leftover"])
        assert rc == 1
        got = [f for f in doc["failures"] if f["check"].startswith("leftover")]
        assert {f["node"] for f in got} == {NODE2.hostname}
        assert any(f["check"] == "leftover.gcs_server" and "6390" in f["found"] for f in got)
        assert all("never kills" in f["fix"] for f in got)
        assert all(f["node"] == NODE2.hostname for f in doc["failures"]), failing(doc)
    finally:
        pids = _stray_pids(serving)
        if pids:
            in_container(serving, NODE2, "kill " + " ".join(map(str, pids)) + " 2>/dev/null; sleep 2; kill -9 "
                         + " ".join(map(str, pids)) + " 2>/dev/null; rm -rf " + STRAY + "; true")
    assert _stray_pids(serving) == []
    assert_serving()


def assert_serving(within_s: float = 30) -> None:
    """SERVING, asked again for a while: `flagops status` now and then reports UNREACHABLE
    on this loaded 2-core lab when an ssh session is refused ("No existing session")."""
    deadline = time.monotonic() + within_s
    while (state := json.loads(fo("status", "-i", INV, "--json", "--probe")[1])["state"]) != "SERVING":
        RESULTS.setdefault("status_retries", {}).setdefault("states", []).append(state)
        assert time.monotonic() < deadline, f"not SERVING but {state}"
        time.sleep(2)


def test_before_a_launch_a_squatted_or_blocked_port_refuses_deploy(serving: Lab) -> None:
    """Stop the service (check is a pre-launch gate), squat Ray's dashboard agent port on
    node2's host, check + deploy refuse and name it; then node2's firewall drops node1's
    packets to it; each removed, then deploy again (the lab is left SERVING)."""
    try:
        rc, out, err, _ = fo("stop", "-i", INV)
        # stop's own after-check can lose an ssh session; what counts is the state it left
        deadline = time.monotonic() + 30
        while (state := json.loads(fo("status", "-i", INV, "--json")[1])["state"]) != "STOPPED":
            assert time.monotonic() < deadline, f"not STOPPED but {state} (stop rc {rc}: {err[-1500:]})"
            time.sleep(2)
        _squatted_then_blocked(serving)
    finally:
        rc, out, err, took = fo("deploy", "ernie45", "-i", INV)
        RESULTS.setdefault("port_squatted", {})["redeploy_s"] = round(took, 2)
        assert rc == 0, f"redeploy failed:\n{out[-2000:]}\n{err[-2000:]}"
    assert_healthy("healthy_after")


def _squatted_then_blocked(lab: Lab) -> None:
    assert_healthy("healthy_stopped")
    squat = None
    listener = ("import socket,time; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
                "s.bind((\"0.0.0.0\", 52365)); s.listen(); time.sleep(900)")
    try:
        squat = lab.ssh(NODE2, f"nohup python3 -c '{listener}' >/dev/null 2>&1 & echo $!").strip()
        time.sleep(0.5)
        rc, doc, took = run_check()
        record("port_squatted", doc, took, ["port_52365"])
        assert rc == 1
        f = next(f for f in doc["failures"] if f["check"] == "port_52365")
        assert f["node"] == NODE2.hostname and f"host pid {squat}" in f["found"] and "never kills" in f["fix"]
        rc, out, err, took = fo("deploy", "ernie45", "-i", INV)
        RESULTS["port_squatted"]["deploy_refused_s"] = round(took, 2)
        assert rc == 1 and "port_52365" in err
    finally:
        if squat:
            lab.ssh(NODE2, f"kill {squat} 2>/dev/null; true")
    # a blocked port: node2's firewall drops node1's packets to 52365
    rule = f"INPUT -p tcp --dport 52365 -s {NODE1.ip} -j DROP"
    lab.ssh(NODE2, f"iptables -I {rule}")
    try:
        rc, doc, took = run_check()
        record("port_blocked", doc, took, ["port_52365"])
        assert rc == 1
        f = next(f for f in doc["failures"] if f["check"] == "port_52365.reach")
        assert f["node"] == NODE1.hostname and "timeout" in f["found"] and NODE2.ip in f["found"]
    finally:
        lab.ssh(NODE2, f"iptables -D {rule}")
