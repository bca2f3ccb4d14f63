"""The vLLM build-once path's install step, one node against two (issue goal: two <= 1.2x one).

On the provisioned lab, the shared wheel for the current key is already built; only the
per-container install is re-run. For each round: remove the install record
(``/root/.flagops/vllm.key``, written by roles/vllm_build) in node1's FlagOS container and
provision (only node1 installs); then remove it on both nodes and provision again (both
install at once). The install task's wall time comes from the --json event stream (task
start to the next task's start), so it is the time the cluster waits, not a per-host sum.
Every other task is a no-op in these runs. Writes bench/results/vllm_install.json.

    python bench/vllm_install.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provision import INV, OUT, VLLM_TASKS, flagops, recap, slowest_tasks  # noqa: E402

NODES = ("flagops-lab-node1", "flagops-lab-node2")
CONTAINER = "flagos"
MARKER = "/root/.flagops/vllm.key"


def forget_install(node: str) -> None:
    subprocess.run(["docker", "exec", node, "docker", "exec", CONTAINER, "rm", "-f", MARKER], check=True,
                   capture_output=True)


def install_wall(out: str) -> float:
    task = VLLM_TASKS["install_s"]
    walls = {t["task"]: t["s"] for t in slowest_tasks(out, top=1000)}
    if task not in walls:
        raise SystemExit(f"the install task did not run: {task}")
    return walls[task]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    one, two, changed = [], [], []
    for r in range(args.rounds):
        forget_install(NODES[0])
        _, out = flagops("provision", INV, "--json")
        one.append(install_wall(out))
        for node in NODES:
            forget_install(node)
        _, out = flagops("provision", INV, "--json")
        two.append(install_wall(out))
        changed.append({h: v["changed"] for h, v in recap(out)["recap"].items()})
        print(f"round {r}: one node {one[-1]:.2f}s, two nodes {two[-1]:.2f}s", file=sys.stderr)
    res = {
        "bench": "vllm_install",
        "rounds": args.rounds,
        "one_node_install_s": one,
        "two_node_install_s": two,
        "one_node_median_s": statistics.median(one),
        "two_node_median_s": statistics.median(two),
        "two_over_one_ratio": round(statistics.median(two) / statistics.median(one), 3),
        "goal_ratio": 1.2,
        "changed_in_two_node_runs": changed,  # the install (and its proof) only
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vllm_install.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
