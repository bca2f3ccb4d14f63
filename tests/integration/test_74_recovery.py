"""Unattended recovery, status truth and rollback on the lab (issue 16).

After a verified deploy (supervision WATCHING) each fault test breaks the service and then
runs no flagops command that changes anything: only `flagops status --json` is polled.
It asserts that status is never LOADING for the dead engine, names the fault within 5 s
(RECOVERING, FAILED or DEGRADED with the node), and that the service is SERVING again with
one more restart on record. The upgrade tests deploy a broken and a good changed release.
Seconds go to ``$FLAGOPS_FAULTS_OUT`` (bench/recovery.py collects them) and are printed (``-s``).

Run alone: ``flock /tmp/flagops-lab.lock pytest -m lab -s tests/integration/test_74_recovery.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from flagops.lab.nodes import NODES

if TYPE_CHECKING:
    from conftest import Lab

pytestmark = [pytest.mark.lab, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
INV = str(REPO / "inventories" / "lab.yaml")
NODE1, NODE2 = NODES
DETECT_S = 5.0
BACK_S = 300.0


def fo(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flagops", *args], capture_output=True, text=True, timeout=timeout)


def status(probe: bool = False) -> dict[str, Any]:
    done = fo("status", "-i", INV, "--json", "--probe" if probe else "--no-probe", timeout=90)
    try:
        return json.loads(done.stdout)
    except ValueError as exc:
        raise AssertionError(f"status printed no JSON (rc {done.returncode}): {done.stdout}\n{done.stderr}") from exc


def record(name: str, **values: Any) -> None:
    print(f"\n[recovery] {name}: {values}")
    out = os.environ.get("FLAGOPS_FAULTS_OUT")
    if out:
        path = Path(out)
        doc = json.loads(path.read_text()) if path.is_file() else {}
        doc.setdefault(name, {}).update(values)
        path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


def deploy(inv: str = INV, *extra: str) -> subprocess.CompletedProcess[str]:
    return fo("deploy", "ernie45", "-i", inv, *extra)


def watching(limit: float = 120) -> dict[str, Any]:
    """SERVING (probed) with the supervisor armed for this deploy."""
    t0 = time.monotonic()
    while True:
        st = status(probe=True)
        sup = st.get("supervision") or {}
        if st["state"] == "SERVING" and sup.get("state") == "WATCHING" and sup.get("armed"):
            return st
        assert time.monotonic() - t0 < limit, f"not SERVING + supervision WATCHING within {limit:.0f}s: {st}"
        time.sleep(1)


@pytest.fixture
def serving(lab: Lab) -> Lab:
    """SERVING under a supervisor that has restarted nothing yet: each fault is measured as a
    first failure (backoff 2 s), and four faults in a row do not add up to the crash-loop
    limit (3 restarts in 600 s), which `deploy --restart` (a new deploy) starts over."""
    st = status(probe=True)
    sup = st.get("supervision") or {}
    if st["state"] != "SERVING" or sup.get("state") != "WATCHING" or sup.get("restart_count"):
        fresh = sup.get("restart_count") and st["state"] == "SERVING"
        done = deploy(INV, "--restart") if fresh else deploy()
        if done.returncode != 0:
            done = deploy(INV, "--restart")
        assert done.returncode == 0, done.stderr[-3000:]
    watching()
    return lab


def names(st: dict[str, Any], node: str) -> bool:
    return any(node in p for p in st["problems"]) or any(f.get("node") == node for f in st.get("failed", []))


def unattended(name: str, node: str, before: dict[str, Any], t0: float, *, named_within: float = DETECT_S) -> None:
    """Poll status (read-only) from the fault until SERVING again; assert and record the times."""
    n0 = (before.get("supervision") or {}).get("restart_count", 0)
    detected = named = back = None
    seen: list[str] = []
    last: dict[str, Any] = {}
    while time.monotonic() - t0 < BACK_S:
        st = status(probe=False)
        last, now = st, time.monotonic() - t0
        seen.append(st["state"])
        sup = st.get("supervision") or {}
        assert st["state"] != "LOADING" or sup.get("restart_count", 0) > n0, st  # a dead engine is never LOADING
        if detected is None and st["state"] in ("RECOVERING", "FAILED", "DEGRADED", "UNREACHABLE"):
            detected = now
        if named is None and (names(st, node) or (st["state"] == "RECOVERING" and node in str(sup.get("last_cause")))):
            named = now
        if sup.get("restart_count", 0) > n0 and sup.get("state") == "WATCHING" and st["state"] in (
                "SERVING", "MODEL_LISTED"):
            back = now
            break
        time.sleep(0.5)
    assert back is not None, f"{name}: not SERVING again within {BACK_S:.0f}s with nobody acting: {last}"
    final = status(probe=True)
    assert final["state"] == "SERVING", final
    sup = final["supervision"]
    record(name, detect_s=round(detected or -1, 1), named_s=round(named or -1, 1), serving_s=round(back, 1),
           cause=sup.get("last_cause"), restarts=sup.get("restart_count"), states=sorted(set(seen)),
           logs=(sup.get("last_restart") or {}).get("logs"))
    assert detected is not None and detected <= DETECT_S, (name, detected, seen)
    assert named is not None and named <= named_within, (name, named, seen, last)
    assert sup["restart_count"] == n0 + 1, sup
    assert (sup.get("last_restart") or {}).get("ok") is True, sup
    logs = Path(os.path.expanduser("~/.flagops/lab/share")) / str(sup["last_restart"]["logs"]).removeprefix("/share/")
    assert {p.name for p in logs.iterdir()} >= {"cause.txt", "node1-flagscale.log", "node2-ray.log"}, logs


def host_docker(*args: str, timeout: float = 180) -> None:
    subprocess.run(["docker", *args], check=True, capture_output=True, timeout=timeout)


# --------------------------------------------------------------------------- faults, nobody acting


def test_killed_stage_worker_on_node2_recovers_unattended(serving: Lab) -> None:
    before = status()
    serving.kill_stage_workers(NODE2)
    unattended("worker_killed", "node2", before, time.monotonic(), named_within=15)


def test_restarted_flagos_container_on_node2_recovers_unattended(serving: Lab) -> None:
    before = status()
    t0 = time.monotonic()
    serving.ssh(NODE2, "docker restart -t 1 flagos >/dev/null", timeout=120)
    unattended("container_restarted", "node2", before, t0)


def test_worker_node_reboot_recovers_unattended(serving: Lab) -> None:
    before = status()
    t0 = time.monotonic()
    host_docker("restart", "-t", "2", NODE2.container)
    unattended("worker_node_reboot", "node2", before, t0)


def test_master_node_reboot_recovers_unattended(serving: Lab) -> None:
    """The supervisor itself goes down with the master and comes back with its dockerd."""
    before = status()
    t0 = time.monotonic()
    host_docker("restart", "-t", "2", NODE1.container)
    unattended("master_node_reboot", "node1", before, t0, named_within=30)  # ssh to node1 is down while it boots


@pytest.mark.parametrize("when", ["before_launch", "after_launch"])
def test_supervisor_restarted_mid_recovery_restarts_the_group_once(serving: Lab, when: str) -> None:
    """The supervisor's own container restarted (SIGTERM, dockerd starts it again) while it
    recovers a killed stage worker: before its launch the attempt is no restart; after it, the
    supervisor judges its own start. Either way the group restarts once and serves again."""
    n0 = int((status().get("supervision") or {}).get("restart_count") or 0)
    serving.kill_stage_workers(NODE2)
    t0 = time.monotonic()
    while True:
        sup = status().get("supervision") or {}
        last = sup.get("last_restart") or {}
        if sup.get("state") == "RECOVERING" and sup.get("restart_count", 0) > n0 and \
                (when == "before_launch" or (last.get("launch") and not last.get("ok"))):
            break
        assert time.monotonic() - t0 < 120, f"the supervisor never reached {when}: {sup}"
        time.sleep(0.3)
    serving.ssh(NODE1, "docker restart -t 120 flagops-supervisor-ernie45 >/dev/null", timeout=180)
    final = watching(BACK_S)
    sup = final["supervision"]
    record(f"supervisor_restarted_{when}", serving_s=round(time.monotonic() - t0, 1),
           restarts=sup.get("restart_count"), cause=sup.get("last_cause"))
    assert sup["restart_count"] == n0 + 1, sup
    assert (sup.get("last_restart") or {}).get("ok") is True, sup


def test_stop_stops_supervision_first_and_stays_stopped(serving: Lab) -> None:
    try:
        done = fo("stop", "-i", INV, "--json")
        assert done.returncode == 0, done.stderr[-2000:]
        sup_gone = serving.ssh(NODE1, "docker ps -a --filter label=io.flagops.supervises --format '{{.Names}}'")
        assert sup_gone.strip() == "", sup_gone
        time.sleep(15)  # longer than detection + backoff: nothing may bring it back
        st = status()
        assert st["state"] == "STOPPED", st
    finally:
        done = deploy()
        assert done.returncode == 0, done.stderr[-3000:]
        watching()


# --------------------------------------------------------------------------- upgrades


def _inventory(tmp_path: Path, old: str, new: str) -> str:
    text = Path(INV).read_text()
    assert old in text, old
    out = tmp_path / "lab-upgrade.yaml"
    out.write_text(text.replace(old, new, 1))
    return str(out)


def test_an_upgrade_that_fails_at_start_rolls_back_by_itself(serving: Lab, tmp_path: Path) -> None:
    before = status()
    bad = _inventory(tmp_path, "max_model_len: 512 ", "max_model_len: 99999999 ")  # > the model's 512: vLLM refuses
    t0 = time.monotonic()
    done = deploy(bad, "--json")
    took = time.monotonic() - t0
    assert done.returncode == 1, done.stderr[-3000:]
    doc = json.loads(done.stdout.strip().splitlines()[-1])
    assert doc["ok"] is False and doc["rollback"]["ok"] is True, doc
    assert "serve process is gone" in doc["reason"], doc["reason"]
    assert doc["rollback"]["to"]["fingerprint"] == before["version"]["fingerprint"], doc["rollback"]
    st = watching()
    assert st["version"]["fingerprint"] == before["version"]["fingerprint"], st["version"]
    assert st["previous"] == before["previous"], (st["previous"], before["previous"])  # the failed one is not kept
    v = fo("verify", "-i", INV, "--only", "output.consistency", "--json")
    check = next(c for c in json.loads(v.stdout)["checks"] if c["name"] == "output.consistency")
    assert v.returncode == 0 and check["values"]["agreement_pct"] == 100.0, check
    record("failed_upgrade", total_s=round(took, 1), back_s=doc["rollback"]["seconds"]["total"],
           reason=doc["reason"][:200])


def test_flagops_rollback_goes_back_and_forward(serving: Lab, tmp_path: Path) -> None:
    orig = status()["version"]
    good = _inventory(tmp_path, "max_model_len: 512 ", "max_model_len: 256 ")  # still fits the bench's 128 + 64
    try:
        done = deploy(good)
        assert done.returncode == 0, done.stderr[-3000:]
        st = watching()
        assert st["version"]["engine_args"]["max_model_len"] == 256, st["version"]
        assert st["previous"]["fingerprint"] == orig["fingerprint"], st["previous"]
        t0 = time.monotonic()
        back = fo("rollback", "-i", INV, "--json")
        took = time.monotonic() - t0
        assert back.returncode == 0, back.stderr[-3000:]
        st = watching()
        assert st["version"]["fingerprint"] == orig["fingerprint"], st["version"]
        assert st["previous"]["engine_args"]["max_model_len"] == 256, st["previous"]
        record("rollback_command", seconds=round(took, 1))
    finally:
        done = deploy()  # the lab's own release: kept when the rollback already runs it
        assert done.returncode == 0, done.stderr[-3000:]
