"""The lab's memory, sampled: peak and steady state through provision, deploy, verify and bench.

A sampler thread reads, every --interval seconds:
- each lab node's memory cgroup: usage minus inactive page cache (what `docker stats`
  shows; the image layers and model files the nodes read are cache the kernel drops first),
  and the cgroup's own high-water mark (``max_usage_in_bytes``, cache included);
- the RSS of each host service the lab started (registry, forwarder, nginx, git daemon,
  dockerd), found by its recorded pid;
- the host's MemTotal - MemAvailable, as the machine as a whole saw it.

Phases, on a running lab: stop (so deploy loads the model again), provision, deploy,
verify, verify --bench, then --idle seconds serving. Writes bench/results/lab_memory.json
(goal: the lab with the service running <= 8 GiB).

    python bench/lab_memory.py [-i inventories/lab.yaml] [--interval 0.5] [--idle 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from flagops.lab import nodes, procs  # noqa: E402
from flagops.lab.engine import connect  # noqa: E402
from flagops.lab.paths import LabPaths  # noqa: E402

GIB = 2**30
GOAL_BYTES = 8 * GIB


def memory_cgroup(pid: int) -> Path:
    """The memory cgroup directory of a process (cgroup v1 or v2)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        hier, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/")
        if hier == "0" and not controllers and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            return Path("/sys/fs/cgroup") / path.lstrip("/")
    raise SystemExit(f"no memory cgroup for pid {pid}")


def cgroup_bytes(cg: Path) -> tuple[int, int]:
    """(usage minus inactive file cache, high-water mark incl. cache) of one cgroup."""
    stat = dict(line.split() for line in (cg / "memory.stat").read_text().splitlines())
    if (cg / "memory.usage_in_bytes").exists():  # v1
        usage = int((cg / "memory.usage_in_bytes").read_text())
        peak = int((cg / "memory.max_usage_in_bytes").read_text())
        inactive = int(stat.get("total_inactive_file", stat.get("inactive_file", 0)))
    else:  # v2
        usage = int((cg / "memory.current").read_text())
        peak_file = cg / "memory.peak"
        peak = int(peak_file.read_text()) if peak_file.exists() else usage
        inactive = int(stat.get("inactive_file", 0))
    return usage - inactive, peak


def rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def host_used() -> int:
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        info[key] = int(value.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"]


class Sampler(threading.Thread):
    def __init__(self, paths: LabPaths, interval: float) -> None:
        super().__init__(daemon=True)
        client = connect()
        assert client is not None, "the lab's engine is not answering: run `flagops lab up`"
        self.cgroups = {n.container: memory_cgroup(client.containers.get(n.container).attrs["State"]["Pid"])
                        for n in nodes.NODES}
        self.services = {name: r.pid for name in procs.names(paths.pids)
                         if (r := procs.read(paths.pids, name)) is not None and procs.alive(r)}
        self.interval = interval
        self.phase = "start"
        self.samples: list[dict[str, Any]] = []
        self.stop_event = threading.Event()

    def sample(self) -> dict[str, Any]:
        s: dict[str, Any] = {"t": time.monotonic(), "phase": self.phase}
        for name, cg in self.cgroups.items():
            s[name], s[f"{name}.hwm"] = cgroup_bytes(cg)
        s["services"] = sum(rss(pid) for pid in self.services.values())
        s["lab"] = sum(s[n] for n in self.cgroups) + s["services"]
        s["host_used"] = host_used()
        return s

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.samples.append(self.sample())
            self.stop_event.wait(self.interval)


def flagops(*args: str) -> float:
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "flagops", *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        tail = done.stdout[-2000:] + done.stderr[-2000:]
        raise SystemExit(f"flagops {' '.join(args)} exited {done.returncode}:\n{tail}")
    return time.monotonic() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-i", "--inventory", default=str(REPO / "inventories" / "lab.yaml"))
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--idle", type=float, default=20.0)
    parser.add_argument("-o", "--out", type=Path, default=REPO / "bench" / "results" / "lab_memory.json")
    args = parser.parse_args()

    baseline_host = host_used()
    sampler = Sampler(LabPaths.default(), args.interval)
    sampler.start()
    walls = {}
    for phase, cmd in (("stop", ("stop",)), ("provision", ("provision", args.inventory)),
                       ("deploy", ("deploy", "ernie45")), ("verify", ("verify",)),
                       ("bench", ("verify", "--bench", "--only", "service.health"))):
        sampler.phase = phase
        walls[phase] = round(flagops(*cmd), 1)
    sampler.phase = "serving-idle"
    time.sleep(args.idle)
    sampler.stop_event.set()
    sampler.join()

    samples = sampler.samples
    peak = max(samples, key=lambda s: s["lab"])
    per_phase = {}
    for phase in dict.fromkeys(s["phase"] for s in samples):
        rows = [s for s in samples if s["phase"] == phase]
        per_phase[phase] = {
            "samples": len(rows),
            "lab_peak_gib": round(max(r["lab"] for r in rows) / GIB, 2),
            **{f"{n}_peak_gib": round(max(r[n] for r in rows) / GIB, 2) for n in sampler.cgroups},
            "services_peak_gib": round(max(r["services"] for r in rows) / GIB, 3),
            "host_used_peak_gib": round(max(r["host_used"] for r in rows) / GIB, 2),
        }
    last = samples[-1]
    report = {
        "benchmark": "lab_memory",
        "cpus": os.cpu_count(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "interval_s": args.interval,
        "samples": len(samples),
        "phase_wall_s": walls,
        "lab_peak_gib": round(peak["lab"] / GIB, 2),
        "lab_peak_phase": peak["phase"],
        "lab_peak_split_gib": {**{n: round(peak[n] / GIB, 2) for n in sampler.cgroups},
                               "services": round(peak["services"] / GIB, 3)},
        "lab_serving_idle_gib": round(last["lab"] / GIB, 2),
        "node_cgroup_hwm_incl_cache_gib": {n: round(last[f"{n}.hwm"] / GIB, 2) for n in sampler.cgroups},
        "host_used_before_gib": round(baseline_host / GIB, 2),
        "host_used_peak_gib": round(max(s["host_used"] for s in samples) / GIB, 2),
        "per_phase": per_phase,
        "goal_gib": GOAL_BYTES / GIB,
        "meets_goal": peak["lab"] <= GOAL_BYTES,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "per_phase"}, indent=1))
    for phase, row in per_phase.items():
        print(f"{phase:13s} {row}")
    return 0 if report["meets_goal"] else 1


if __name__ == "__main__":
    sys.exit(main())
