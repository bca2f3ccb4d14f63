"""Provision on the lab, measured: first run on fresh nodes, second run (changed count),
1-node vs 2-node wall time on fresh nodes, the `--check --diff` output on fresh nodes, and per
node the vLLM unpatch+build time (master) and install time (`vllm` in the result).

"Fresh" means new lab nodes with empty docker data and an empty /share (the lab's
images, registry and caches are kept). Writes bench/results/provision.json and
bench/results/provision-check-diff.txt. Takes about 5 minutes.

    python bench/provision.py
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INV = str(REPO / "inventories" / "lab.yaml")
OUT = REPO / "bench" / "results"
sys.path.insert(0, str(REPO))
from flagops.lab import services  # noqa: E402  (the lab registry's password for provision)


def flagops(*args: str, check: bool = True) -> tuple[float, str]:
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "flagops", *args], capture_output=True, text=True, cwd=REPO,
                          env=services.registry_env())
    if check and done.returncode != 0:
        raise SystemExit(f"flagops {' '.join(args)} failed:\n{done.stdout[-3000:]}{done.stderr[-2000:]}")
    return time.monotonic() - t0, done.stdout


def fresh_nodes() -> None:
    from flagops.lab.paths import LabPaths

    paths = LabPaths.default()
    flagops("lab", "down")
    for sub in ("nodes", "share"):  # lab-owned data: the nodes' docker dirs and /share
        shutil.rmtree(paths.root / sub, ignore_errors=True)
    flagops("lab", "up")


def one_node_inventory() -> str:
    """The lab's master alone: the same roles on one node (pipeline parallel 1)."""
    import yaml

    inv = yaml.safe_load(Path(INV).read_text())
    del inv["all"]["children"]["workers"]
    vllm_args = inv["all"]["vars"]["flagops_release_overrides"]["serve"]["engine_args_specific"]["vllm"]
    vllm_args["pipeline_parallel_size"] = 1
    path = OUT / "lab-one-node.yaml"
    path.write_text(yaml.safe_dump(inv))
    return str(path)


def recap(out: str) -> dict:
    return json.loads(out.splitlines()[-1])


def slowest_tasks(out: str, top: int = 10) -> list[dict]:
    """Wall time of each task from the --json event stream (task start to the next start)."""
    from datetime import datetime

    marks = []
    for line in out.splitlines():
        ev = json.loads(line)
        if ev.get("event") in ("playbook_on_task_start", "playbook_on_play_start", "playbook_on_stats"):
            marks.append((datetime.fromisoformat(ev["created"]).timestamp(), ev.get("task") if
                          ev["event"] == "playbook_on_task_start" else None))
    walls: dict[str, float] = {}
    for (t, name), (t_next, _) in zip(marks, marks[1:], strict=False):
        if name:
            walls[name] = walls.get(name, 0.0) + t_next - t
    ranked = sorted(walls.items(), key=lambda kv: -kv[1])[:top]
    return [{"task": name, "s": round(s, 2)} for name, s in ranked]


VLLM_TASKS = {
    "unpatch_build_s": "The vLLM build | unpatch and build the wheel once (master container)",
    "install_s": "The vLLM build | install the shared wheel (all nodes at once)",
    "proof_s": "The vLLM build | the installed vLLM is the pinned, patched build",
}


def vllm_times(out: str) -> dict[str, dict[str, float | None]]:
    """Per node: FlagScale's unpatch + the wheel build (master only), the install, the proof.

    From the --json event stream: each host's own ``duration`` of that task; None where the
    task did not run on that host (a key already built or installed)."""
    ran: dict[str, dict[str, float | None]] = {}
    for line in out.splitlines():
        ev = json.loads(line)
        host = ev.get("host")
        if not host or ev.get("event") not in ("runner_on_ok", "runner_on_failed"):
            continue
        for key, task in VLLM_TASKS.items():
            ran.setdefault(host, dict.fromkeys(VLLM_TASKS))
            if ev.get("task") == task and ev.get("duration") is not None:
                ran[host][key] = round(float(ev["duration"]), 2)
    return ran


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    fresh_nodes()
    _, check_out = flagops("provision", INV, "--check", "--diff")
    (OUT / "provision-check-diff.txt").write_text(check_out)
    t_one, out_one = flagops("provision", one_node_inventory(), "--json")
    fresh_nodes()
    t_first, out_first = flagops("provision", INV, "--json")
    t_second, out_second = flagops("provision", INV, "--json")
    res = {
        "first_run_s": round(t_first, 2),
        "first_run_recap": recap(out_first)["recap"],
        "second_run_s": round(t_second, 2),
        "second_run_changed": {h: r["changed"] for h, r in recap(out_second)["recap"].items()},
        "one_node_s": round(t_one, 2),
        "two_node_s": round(t_first, 2),
        "two_over_one_ratio": round(t_first / t_one, 3),
        "check_diff_output": "bench/results/provision-check-diff.txt",
        "vllm": {"first": vllm_times(out_first), "second": vllm_times(out_second), "one_node": vllm_times(out_one)},
        "slowest_tasks": {"first": slowest_tasks(out_first), "second": slowest_tasks(out_second),
                          "one_node": slowest_tasks(out_one)},
    }
    (OUT / "provision.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
