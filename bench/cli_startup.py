"""Time `flagops --help` and `flagops validate inventories/a800.yaml` as a user runs them.

Each command runs N times in a fresh subprocess (the console script next to this Python,
so imports are measured from cold interpreter start; the OS page cache is warm after the
first run). Writes min/median/max to bench/results/cli_startup.json.

    python bench/cli_startup.py [-n 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GOALS = {"help": 0.3, "validate": 0.5}


def flagops_cmd() -> list[str]:
    script = Path(sys.executable).parent / "flagops"
    if script.exists():
        return [str(script)]
    found = shutil.which("flagops")
    return [found] if found else [sys.executable, "-m", "flagops"]


def time_runs(argv: list[str], n: int) -> list[float]:
    subprocess.run(argv, cwd=REPO, check=True, capture_output=True)  # warm-up, also checks rc
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(argv, cwd=REPO, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20, help="runs per command (default 20)")
    parser.add_argument("-o", "--out", type=Path, default=REPO / "bench" / "results" / "cli_startup.json")
    args = parser.parse_args()

    base = flagops_cmd()
    cases = {
        "help": [*base, "--help"],
        "validate": [*base, "validate", "inventories/a800.yaml"],
    }
    results = {}
    for name, argv in cases.items():
        times = time_runs(argv, args.n)
        results[name] = {
            "argv": ["flagops", *argv[len(base):]],
            "runs": args.n,
            "min_s": round(min(times), 4),
            "median_s": round(statistics.median(times), 4),
            "max_s": round(max(times), 4),
            "goal_s": GOALS[name],
            "meets_goal": statistics.median(times) < GOALS[name],
        }
        print(f"{name:9s} min {min(times):.3f}s  median {statistics.median(times):.3f}s  "
              f"max {max(times):.3f}s  (goal < {GOALS[name]}s)")
    report = {
        "benchmark": "cli_startup",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": __import__("os").cpu_count(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")
    return 0 if all(r["meets_goal"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
