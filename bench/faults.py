"""The issue-7 fault table, measured on the lab: runs tests/integration/test_70_faults.py
(every case, slow ones included unless --fast) and writes bench/results/faults.json with,
per fault, the time to detect it, the time the re-run took to recover, the message the
user got, and the pytest outcome, plus the whole file's wall time.

Needs a running lab (`flagops lab up`); the tests leave it SERVING.

    python bench/faults.py [--fast] [-k EXPR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "faults.json"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="skip the cases marked slow (redeploys)")
    ap.add_argument("-k", dest="expr", help="pytest -k expression")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        timings = Path(tmp) / "faults.json"
        argv = [sys.executable, "-m", "pytest", "-m", "lab and not slow" if args.fast else "lab",
                "tests/integration/test_70_faults.py", "-v", "-p", "no:cacheprovider", "--durations=0"]
        if args.expr:
            argv += ["-k", args.expr]
        t0 = time.monotonic()
        done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True,
                              env=dict(os.environ, FLAGOPS_FAULTS_OUT=str(timings)))
        wall = time.monotonic() - t0
        faults = json.loads(timings.read_text()) if timings.exists() else {}
    outcomes = dict(re.findall(r"test_70_faults\.py::(\w+) (PASSED|FAILED|ERROR|SKIPPED)", done.stdout))
    durations = {m[1]: float(m[0]) for m in re.findall(r"([\d.]+)s call\s+\S+::(\w+)", done.stdout)}
    doc = {
        "wall_s": round(wall, 1),
        "pytest_rc": done.returncode,
        "tests": {name: {"outcome": o, "call_s": durations.get(name)} for name, o in outcomes.items()},
        "faults": faults,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    # no machine paths in a committed result
    text = json.dumps(doc, indent=1, sort_keys=True).replace(str(REPO), "<repo>").replace(str(Path.home()), "~")
    OUT.write_text(text + "\n")
    print(done.stdout[-3000:])
    print(f"wrote {OUT.relative_to(REPO)} ({wall:.0f}s, rc {done.returncode})")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
