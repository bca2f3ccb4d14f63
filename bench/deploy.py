"""Deploy on the lab, measured: deploy-to-SERVING split into flagops' own overhead and
the FlagScale runner + vLLM start-up, readiness-detection lag, status latency, and a
second deploy (time, and whether the service stayed up).

Needs a provisioned lab (`flagops lab up && flagops provision inventories/lab.yaml`).
It stops the service first. Writes bench/results/deploy.json.

    python bench/deploy.py [--status-runs 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INV = str(REPO / "inventories" / "lab.yaml")
HEALTH = "http://172.30.0.11:30000/health"


def flagops(*args: str) -> tuple[float, str]:
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "flagops", *args], capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"flagops {' '.join(args)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return time.monotonic() - t0, done.stdout


def first_healthy(stop: threading.Event, out: dict) -> None:
    """An independent 20 ms poller: when was /health really 200 first?"""
    while not stop.is_set():
        try:
            with urllib.request.urlopen(HEALTH, timeout=1) as r:
                if r.status == 200:
                    out["t"] = time.time()
                    return
        except OSError:
            pass
        time.sleep(0.02)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--status-runs", type=int, default=10)
    a = ap.parse_args()
    flagops("stop", "-i", INV)

    seen: dict = {}
    stop = threading.Event()
    poller = threading.Thread(target=first_healthy, args=(stop, seen), daemon=True)
    poller.start()
    t_start = time.time()
    total, out = flagops("deploy", "ernie45", "-i", INV, "--json")
    stop.set()
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    doc = next(e for e in reversed(events) if "action" in e)
    # The FlagScale runner (ray start on both nodes over ssh, vllm launch) is one task.
    # Its wall time from the events' own timestamps: task start to the last host's result.
    def _t(e: dict) -> float:
        return datetime.fromisoformat(e["created"]).timestamp()

    serve = [e for e in events if "flagscale serve" in (e.get("task") or "")]
    started = next(e for e in serve if e.get("event") == "playbook_on_task_start")
    ended = [e for e in serve if e.get("event") in ("runner_on_ok", "runner_on_failed")]
    runner_s = max(_t(e) for e in ended) - _t(started)
    stages = {s["name"]: s for s in doc["stages"]}
    vllm_s = stages["LOADING"]["at"] - (t_start + doc["seconds"]["playbook"])  # vLLM load after the playbook
    lag = stages["LOADING"]["at"] - seen["t"] if "t" in seen else None

    status_times = [flagops("status", "-i", INV, "--json")[0] for _ in range(a.status_runs)]
    t2, out2 = flagops("deploy", "ernie45", "-i", INV, "--json")
    doc2 = json.loads(out2.splitlines()[-1])

    res = {
        "deploy_to_serving_s": round(total, 2),
        "flagscale_runner_task_s": round(runner_s, 2),
        "vllm_load_after_playbook_s": round(vllm_s, 2),
        "flagops_overhead_s": round(total - runner_s - vllm_s, 2),
        "readiness_detection_lag_s": round(lag, 3) if lag is not None else None,
        "stages": doc["stages"],
        "status_latency_s": {"min": round(min(status_times), 3), "median": round(statistics.median(status_times), 3),
                             "max": round(max(status_times), 3), "runs": len(status_times)},
        "second_deploy": {"seconds": round(t2, 2), "action": doc2["action"], "state": doc2["state"]},
    }
    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "deploy.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
