"""The lab's memory and deploy time to SERVING at 1, 2 and 4 nodes.

Peak and steady state through provision, deploy, verify and bench.

A sampler thread reads, every --interval seconds:
- each lab node's memory cgroup: usage minus inactive page cache (what `docker stats`
  shows; the image layers and model files the nodes read are cache the kernel drops first),
  and the cgroup's own high-water mark (``max_usage_in_bytes``, cache included);
- the RSS of each host service the lab started (registry, forwarder, nginx, git daemon,
  dockerd), found by its recorded pid;
- the host's MemTotal - MemAvailable, as the machine as a whole saw it.

For each size N of --nodes: `flagops lab up --nodes N` (N = 2: inventories/lab.yaml,
otherwise the generated $FLAGOPS_HOME/lab/inventory.yaml, PP = N), then the phases
provision, stop (so deploy starts the service from nothing), deploy (its wall time is the
time to SERVING: deploy returns once the staged readiness passed), verify (the
output-consistency agreement against the PP=1 reference is recorded), verify --bench,
then --idle seconds serving. Unless the run ends with 2 measured (the default order
1 4 2 does), the default lab is restored (lab up, provision, deploy on inventories/lab.yaml),
also after a failure; --no-restore leaves it as it is.

Writes bench/results/lab_memory.json: ``sizes`` keyed by N (a run of some sizes keeps the
others' earlier figures), ``curve`` one row per size. Goals: the lab serving <= 8 GiB at
1 and 2 nodes, <= 16 GiB at 4.

    python bench/lab_memory.py [--nodes 1 4 2] [--interval 0.5] [--idle 20] [--no-restore]
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

from flagops.lab import nodes, procs, services  # noqa: E402
from flagops.lab.engine import connect  # noqa: E402
from flagops.lab.paths import LabPaths  # noqa: E402

GIB = 2**30
GOAL_GIB = {1: 8, 2: 8, 3: 16, 4: 16}  # the lab serving, by node count
INVENTORY = REPO / "inventories" / "lab.yaml"


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
    def __init__(self, paths: LabPaths, interval: float, lab_nodes: tuple[nodes.Node, ...] = nodes.NODES) -> None:
        super().__init__(daemon=True)
        client = connect()
        assert client is not None, "the lab's engine is not answering: run `flagops lab up`"
        self.cgroups = {n.container: memory_cgroup(client.containers.get(n.container).attrs["State"]["Pid"])
                        for n in lab_nodes}
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


def flagops(*args: str, check: bool = True) -> tuple[float, str]:
    """Run the real CLI; (wall seconds, stdout)."""
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "flagops", *args], cwd=REPO, capture_output=True, text=True,
                          env=services.registry_env())
    if check and done.returncode != 0:
        tail = done.stdout[-2000:] + done.stderr[-2000:]
        raise SystemExit(f"flagops {' '.join(args)} exited {done.returncode}:\n{tail}")
    return time.monotonic() - t0, done.stdout


def lab_up(count: int) -> tuple[float, Path]:
    """`flagops lab up --nodes N`; (wall seconds, the inventory to use at that size)."""
    wall, out = flagops("lab", "up", "--nodes", str(count), "--json")
    return wall, INVENTORY if count == nodes.DEFAULT_NODES else Path(json.loads(out)["inventory"])


def measure(paths: LabPaths, count: int, inventory: Path, interval: float, idle: float) -> dict[str, Any]:
    """Sample the lab of ``count`` nodes through provision, stop, deploy, verify, bench, idle."""
    inv = str(inventory)
    baseline_host = host_used()
    sampler = Sampler(paths, interval, nodes.lab_nodes(count))
    sampler.start()
    walls: dict[str, float] = {}
    consistency: dict[str, Any] = {}
    try:
        for phase, cmd in (("provision", ("provision", inv)), ("stop", ("stop", "-i", inv)),
                           ("deploy", ("deploy", "ernie45", "-i", inv)), ("verify", ("verify", "-i", inv, "--json")),
                           ("bench", ("verify", "-i", inv, "--bench", "--only", "service.health"))):
            sampler.phase = phase
            wall, out = flagops(*cmd, check=phase != "verify")  # a failing check is a figure too
            walls[phase] = round(wall, 1)
            if phase == "verify":
                doc = json.loads(out)
                by = {c["name"]: c for c in doc["checks"]}
                oc, ray = by["output.consistency"], by["cluster.ray"]
                consistency = {"status": oc["status"], "agreement_pct": oc.get("values", {}).get("agreement_pct"),
                               "reason": oc["reason"], "ray_nodes": ray.get("values", {}).get("total"),
                               "verify_ok": doc["ok"],
                               "failed": {n: c["reason"] for n, c in by.items() if c["status"] == "fail"}}
        sampler.phase = "serving-idle"
        time.sleep(idle)
    finally:
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
    goal = GOAL_GIB[count]
    return {
        "nodes": count,
        "inventory": _shown(inv),
        "pipeline_parallel_size": count,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "samples": len(samples),
        "phase_wall_s": walls,
        "deploy_to_serving_s": walls["deploy"],
        "output_consistency": consistency,
        "lab_peak_gib": round(peak["lab"] / GIB, 2),
        "lab_peak_phase": peak["phase"],
        "lab_peak_split_gib": {**{n: round(peak[n] / GIB, 2) for n in sampler.cgroups},
                               "services": round(peak["services"] / GIB, 3)},
        "lab_serving_idle_gib": round(last["lab"] / GIB, 2),
        "node_cgroup_hwm_incl_cache_gib": {n: round(last[f"{n}.hwm"] / GIB, 2) for n in sampler.cgroups},
        "host_used_before_gib": round(baseline_host / GIB, 2),
        "host_used_peak_gib": round(max(s["host_used"] for s in samples) / GIB, 2),
        "per_phase": per_phase,
        "goal_gib": goal,
        "meets_goal": peak["lab"] <= goal * GIB,
    }


def restore_default() -> None:
    """The default lab as every other test expects it: 2 nodes, provisioned, deployed."""
    lab_up(nodes.DEFAULT_NODES)
    flagops("provision", str(INVENTORY))
    flagops("deploy", "ernie45", "-i", str(INVENTORY))


def _shown(inv: str | Path) -> str:
    """The inventory as a path any machine reads: relative to the checkout, or under $FLAGOPS_HOME."""
    p = Path(inv).resolve()
    home = LabPaths.default().root.parent.resolve()
    if p.is_relative_to(REPO):
        return str(p.relative_to(REPO))
    return "$FLAGOPS_HOME/" + str(p.relative_to(home)) if p.is_relative_to(home) else p.name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 4, 2], choices=range(1, nodes.MAX_NODES + 1),
                        metavar="N", help="lab sizes to measure, in order (default: 1 4 2, ending on the default lab)")
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--idle", type=float, default=20.0)
    parser.add_argument("--no-restore", action="store_true",
                        help="leave the lab at the last size (default: back to the 2-node lab, deployed)")
    parser.add_argument("-o", "--out", type=Path, default=REPO / "bench" / "results" / "lab_memory.json")
    args = parser.parse_args()

    paths = LabPaths.default()
    try:
        old = json.loads(args.out.read_text())
    except (OSError, ValueError):
        old = {}
    sizes: dict[str, Any] = dict(old.get("sizes") or {})
    default_serving = False  # the last thing done: the default lab provisioned and deployed
    try:
        for count in args.nodes:
            default_serving = False
            up_s, inventory = lab_up(count)
            row = measure(paths, count, inventory, args.interval, args.idle)
            row["lab_up_s"] = round(up_s, 1)
            sizes[str(count)] = row
            default_serving = count == nodes.DEFAULT_NODES
            print(f"{count} node(s): peak {row['lab_peak_gib']} GiB ({row['lab_peak_phase']}), "
                  f"deploy to SERVING {row['deploy_to_serving_s']} s, output consistency "
                  f"{row['output_consistency'].get('agreement_pct')} %", file=sys.stderr)
    finally:
        if not default_serving and not args.no_restore:
            print("restoring the default lab (2 nodes, inventories/lab.yaml, deployed)", file=sys.stderr)
            restore_default()

    curve = [{"nodes": int(n), "lab_peak_gib": r["lab_peak_gib"], "lab_serving_idle_gib": r["lab_serving_idle_gib"],
              "deploy_to_serving_s": r["deploy_to_serving_s"], "provision_s": r["phase_wall_s"]["provision"],
              "agreement_pct": r["output_consistency"].get("agreement_pct"), "goal_gib": r["goal_gib"],
              "meets_goal": r["meets_goal"]} for n, r in sorted(sizes.items(), key=lambda kv: int(kv[0]))]
    report = {
        "benchmark": "lab_memory",
        "cpus": os.cpu_count(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "interval_s": args.interval,
        "idle_s": args.idle,
        "curve": curve,
        "sizes": sizes,
        "meets_goal": all(r["meets_goal"] for r in curve),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(curve, indent=1))
    return 0 if report["meets_goal"] else 1


if __name__ == "__main__":
    sys.exit(main())
