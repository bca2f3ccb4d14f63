"""flagops check on the lab: runs tests/integration/test_75_check.py and writes
bench/results/check.json with, per planted fault, the message flagops check gave (node,
check, found, fix), the time to detect it (the whole `flagops check --json` command), and
the healthy lab's check times (serving, and stopped before a launch).

Needs a provisioned lab; the test leaves it SERVING. Hold the lab lock:

    flock /tmp/flagops-lab.lock python bench/check.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "check.json"


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        res = Path(tmp) / "check.json"
        argv = [sys.executable, "-m", "pytest", "-m", "lab", "tests/integration/test_75_check.py", "-v",
                "-p", "no:cacheprovider", *sys.argv[1:]]
        t0 = time.monotonic()
        done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True,
                              env=dict(os.environ, FLAGOPS_CHECK_OUT=str(res)))
        wall = time.monotonic() - t0
        results = json.loads(res.read_text()) if res.exists() else {}
    outcomes = dict(re.findall(r"test_75_check\.py::(\w+) (PASSED|FAILED|ERROR|SKIPPED)", done.stdout))
    doc = {"wall_s": round(wall, 1), "pytest_rc": done.returncode, "tests": outcomes, "results": results}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=1, sort_keys=True).replace(str(REPO), "<repo>").replace(str(Path.home()), "~")
    OUT.write_text(text + "\n")
    print(done.stdout[-4000:])
    print(f"wrote {OUT.relative_to(REPO)} ({wall:.0f}s, rc {done.returncode})")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
