"""Shared by the benchmarks that run a lab test file and keep what it measured: run pytest on
it with ``<env_var>`` pointing at a results file, then write the result without machine paths."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def run(test_file: str, env_var: str, args: list[str]) -> dict[str, Any]:
    """pytest -m lab on ``test_file``; its outcomes, wall time and the results the tests wrote."""
    with tempfile.TemporaryDirectory() as tmp:
        res = Path(tmp) / "results.json"
        argv = [sys.executable, "-m", "pytest", "-m", "lab", test_file, "-v", "-rA", "-p", "no:cacheprovider", *args]
        t0 = time.monotonic()
        env = dict(os.environ, **{env_var: str(res)})
        done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env=env)
        wall = time.monotonic() - t0
        results = json.loads(res.read_text()) if res.exists() else {}
    name = re.escape(Path(test_file).name)
    # the -rA summary: "PASSED tests/integration/test_x.py::test_name"
    summary = re.findall(r"^(PASSED|FAILED|ERROR|SKIPPED) \S*" + name + r"::(\w+)", done.stdout, re.M)
    outcomes = {test: outcome for outcome, test in summary}
    return {"done": done, "wall": wall, "results": results, "outcomes": outcomes}


def write(out: Path, doc: dict[str, Any], ran: dict[str, Any]) -> int:
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=1, sort_keys=True).replace(str(REPO), "<repo>").replace(str(Path.home()), "~")
    out.write_text(text + "\n")
    done = ran["done"]
    print(done.stdout[-4000:])
    print(f"wrote {out.relative_to(REPO)} ({ran['wall']:.0f}s, rc {done.returncode})")
    return done.returncode
