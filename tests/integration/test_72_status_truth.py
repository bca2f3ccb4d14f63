"""Status tells the truth at once (issue 16 §2): a dead engine is never LOADING.

After a verified deploy each test breaks node2's part of the pipeline and asserts that
`flagops status --json` names node2 within 5 s (without Ray's heartbeat timeout) and is
not LOADING; then `flagops deploy` restores a SERVING lab (finally). Seconds to detect are
printed (``-s``) and go to ``$FLAGOPS_FAULTS_OUT`` like test_70's.

Run alone: ``flock /tmp/flagops-lab.lock pytest -m lab -s tests/integration/test_72_status_truth.py``.
"""

from __future__ import annotations

import json
import os
import shlex
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
# the pipeline stage's Ray worker process in node2's container (ray sets its title to ray::<Actor>...)
FIND_WORKER = ('for p in /proc/[0-9]*; do c=$(tr "\\0" " " < $p/cmdline 2>/dev/null); '
               'case "$c" in "ray::RayWorker"*) echo ${p#/proc/};; esac; done; true')


def fo(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flagops", *args], capture_output=True, text=True, timeout=timeout)


def status(probe: bool = False) -> dict[str, Any]:
    done = fo("status", "-i", INV, "--json", "--probe" if probe else "--no-probe", timeout=60)
    try:
        return json.loads(done.stdout)
    except ValueError as exc:
        raise AssertionError(f"status printed no JSON (rc {done.returncode}): {done.stdout}\n{done.stderr}") from exc


def restore() -> None:
    """`flagops deploy` again; a service Ray still believes complete is forced to restart."""
    done = fo("deploy", "ernie45", "-i", INV)
    if done.returncode != 0:
        done = fo("deploy", "ernie45", "-i", INV, "--restart")
    assert done.returncode == 0, done.stderr[-3000:]
    assert status(probe=True)["state"] == "SERVING"


def names_node2(st: dict[str, Any]) -> bool:
    return st["state"] != "LOADING" and any("node2" in p for p in st["problems"])


def detect(t0: float, limit: float = 60) -> tuple[float, dict[str, Any]]:
    """Poll status until it names node2; (seconds from the fault, the status that did)."""
    while True:
        st = status()
        assert st["state"] != "LOADING" or time.monotonic() - t0 > limit, st  # never LOADING for a dead engine
        if names_node2(st):
            return time.monotonic() - t0, st
        assert time.monotonic() - t0 < limit, f"status did not name node2 within {limit:.0f}s: {st}"


def record(name: str, **values: Any) -> None:
    print(f"\n[status-truth] {name}: {values}")
    out = os.environ.get("FLAGOPS_FAULTS_OUT")
    if out:
        path = Path(out)
        doc = json.loads(path.read_text()) if path.is_file() else {}
        doc.setdefault(name, {}).update(values)
        path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


@pytest.fixture
def serving(lab: Lab) -> Lab:
    if status(probe=True)["state"] != "SERVING":
        restore()
    return lab


def test_killed_stage_worker_on_node2_is_named_at_once(serving: Lab) -> None:
    pids = serving.ssh(NODE2, f"docker exec flagos sh -c {shlex.quote(FIND_WORKER)}").split()
    assert pids, "no Ray engine worker in node2's container"
    try:
        serving.ssh(NODE2, "docker exec flagos kill -9 " + " ".join(str(int(p)) for p in pids))
        t0 = time.monotonic()
        took, st = detect(t0)
        print(f"\nkilled stage worker {pids} on node2: status named node2 after {took:.1f}s ({st['state']})")
        record("status_stage_worker_killed", detect_s=round(took, 1), state=st["state"], problems=st["problems"])
        assert took <= DETECT_S, (took, st)
        assert st["state"] in ("FAILED", "DEGRADED"), st
        assert any(f["node"] == "node2" for f in st.get("failed", [])) or st["state"] == "DEGRADED", st
    finally:
        restore()


def test_restarted_container_on_node2_is_named_at_once(serving: Lab) -> None:
    try:
        serving.ssh(NODE2, "docker restart flagos >/dev/null", timeout=120)
        t0 = time.monotonic()
        took, st = detect(t0)
        print(f"\nrestarted node2's flagos container: status named node2 after {took:.1f}s ({st['state']})")
        record("status_container_restarted", detect_s=round(took, 1), state=st["state"], problems=st["problems"])
        assert took <= DETECT_S, (took, st)
        assert st["state"] == "FAILED", st
        assert [f["node"] for f in st["failed"] if f["what"] == "container flagos"] == ["node2"], st
    finally:
        restore()
