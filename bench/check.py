"""flagops check on the lab: runs tests/integration/test_75_check.py and writes
bench/results/check.json with, per planted fault, the message flagops check gave (node,
check, found, fix), the time to detect it (the whole `flagops check --json` command), and
the healthy lab's check times (serving, and stopped before a launch).

Needs a provisioned lab; the test leaves it SERVING. Hold the lab lock:

    flock /tmp/flagops-lab.lock python bench/check.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import _labtest

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "check.json"


def main() -> int:
    ran = _labtest.run("tests/integration/test_75_check.py", "FLAGOPS_CHECK_OUT", sys.argv[1:])
    doc = {"wall_s": round(ran["wall"], 1), "pytest_rc": ran["done"].returncode, "tests": ran["outcomes"],
           "results": ran["results"]}
    return _labtest.write(OUT, doc, ran)


if __name__ == "__main__":
    sys.exit(main())
