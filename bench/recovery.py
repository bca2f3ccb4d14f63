"""Unattended recovery on the lab: runs tests/integration/test_74_recovery.py and writes
bench/results/recovery.json with, per fault (a killed stage worker, a restarted FlagOS
container, a worker node reboot, a master node reboot), the seconds from the fault until
`flagops status` reported it (detect), named the node (named) and was SERVING again with
nobody acting (serving), the supervisor's cause and its logs; and for a failed upgrade the
seconds until the previous version served again. Goal (issue 16): serving <= detect (<= 10 s)
+ one deploy's time (the lab's warm `flagops deploy --restart`, measured here too).

Needs a provisioned, serving lab; the tests leave it SERVING. Hold the lab lock:

    flock /tmp/flagops-lab.lock python bench/recovery.py
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import _labtest

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "recovery.json"
INV = str(REPO / "inventories" / "lab.yaml")


def deploy_restart_s() -> float:
    """One deploy's time on this lab: `flagops deploy --restart` to SERVING."""
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "flagops", "deploy", "ernie45", "-i", INV, "--restart", "--json"],
                   cwd=REPO, check=True, capture_output=True, text=True)
    return round(time.monotonic() - t0, 1)


def main() -> int:
    one_deploy = deploy_restart_s()
    ran = _labtest.run("tests/integration/test_74_recovery.py", "FLAGOPS_FAULTS_OUT", sys.argv[1:])
    results = ran["results"]
    goal = {name: {"serving_s": r["serving_s"], "goal_s": round(min(r["detect_s"], 10) + one_deploy, 1),
                   "met": r["serving_s"] <= min(r["detect_s"], 10) + one_deploy}
            for name, r in results.items() if "serving_s" in r}
    doc = {"wall_s": round(ran["wall"], 1), "pytest_rc": ran["done"].returncode, "tests": ran["outcomes"],
           "one_deploy_restart_s": one_deploy, "goal": goal, "results": results}
    return _labtest.write(OUT, doc, ran)


if __name__ == "__main__":
    sys.exit(main())
