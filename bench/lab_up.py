"""Time `flagops lab up` cold and warm, and measure the lab's image sizes and memory.

- cold: after `flagops lab down --purge` (no lab images, registry data or caches; the
  host's apt packages stay). Only with --cold: it rebuilds every image (minutes).
- after-down: after `flagops lab down` (caches kept): nodes and services start again.
- warm: `lab up` on a running lab (the idempotent no-op path).

Writes bench/results/lab_up.json (goals: cold <= 360 s, warm <= 30 s).

    python bench/lab_up.py [--cold]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.lab_memory import Sampler  # noqa: E402
from flagops.lab import nodes  # noqa: E402
from flagops.lab.engine import connect  # noqa: E402
from flagops.lab.lab import IMAGE_REF, IMAGE_TAG, PUSH_REPO  # noqa: E402
from flagops.lab.paths import LabPaths  # noqa: E402

GOALS = {"cold": 360.0, "after_down": 30.0, "warm": 30.0}


def lab(*args: str) -> dict[str, Any]:
    """Run `flagops lab ...` (--json) as a user does; returns its report and wall time."""
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "flagops", "lab", *args, "--json"], cwd=REPO, capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"flagops lab {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout)
    report["wall_s"] = round(wall, 2)
    return report


def image_sizes() -> dict[str, int]:
    client = connect()
    assert client is not None
    out = {}
    for name in (nodes.BASE_TAG, f"{PUSH_REPO}:{IMAGE_TAG}"):
        out[name] = client.images.get(name).attrs["Size"]
    for image in client.images.list(nodes.NODE_REPO):
        out[image.tags[0]] = image.attrs["Size"]
    return out


def memory(paths: LabPaths) -> dict[str, int]:
    """Bytes in use now, as bench/lab_memory.py samples them: each node's cgroup minus
    inactive page cache, and the host services' RSS."""
    s = Sampler(paths, interval=0).sample()
    return {**{n.container: s[n.container] for n in nodes.NODES}, "services": s["services"], "total": s["lab"]}


def remove_host_packages() -> None:
    from flagops.lab.engine import HOST_TOOLS

    pkgs = sorted({HOST_TOOLS[t] for t in ("dockerd", "docker-registry", "mmdebstrap", "socat", "nginx")})
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "remove", "-y", *pkgs], env=env, check=True, capture_output=True)
    subprocess.run(["apt-get", "autoremove", "-y"], env=env, check=True, capture_output=True)
    subprocess.run(["apt-get", "clean"], env=env, check=True, capture_output=True)
    print(f"removed {' '.join(pkgs)} and cleaned apt's cache", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold", action="store_true", help="also time a cold up after `down --purge`")
    parser.add_argument("--remove-host-packages", action="store_true",
                        help="with --cold: also apt-get remove the host packages `lab up` installs (docker.io, "
                        "docker-registry, mmdebstrap, socat, nginx-light) and clean apt's cache, as on a fresh "
                        "machine. For a throwaway dev/CI machine only")
    parser.add_argument("-o", "--out", type=Path, default=REPO / "bench" / "results" / "lab_up.json")
    args = parser.parse_args()
    paths = LabPaths.default()

    results: dict[str, Any] = {}
    lab("up")  # make sure a lab exists before the timed runs
    if args.cold:
        lab("down", "--purge")
        if args.remove_host_packages:
            remove_host_packages()
        results["cold"] = lab("up")
    lab("down")
    results["after_down"] = lab("up")
    results["warm"] = lab("up")
    for name, report in results.items():
        report["goal_s"] = GOALS[name]
        report["meets_goal"] = report["wall_s"] <= GOALS[name]
        print(f"{name:10s} {report['wall_s']:7.1f}s  (goal <= {GOALS[name]:.0f}s)  steps {report['steps']}")
    report = {
        "benchmark": "lab_up",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "image": IMAGE_REF,
        "results": results,
        "image_sizes_bytes": image_sizes(),
        "memory_bytes": memory(paths),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"memory {report['memory_bytes']['total'] / 2**20:.0f} MiB; wrote {args.out}")
    return 0 if all(r["meets_goal"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
