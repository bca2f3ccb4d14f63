"""What reaching the API through ssh costs: direct HTTP vs flagops' port forward vs a request
run on the master over ssh (the two ways to reach a node's API when only ssh reaches it).

Run on the lab with the service up, once per mode:
    flagops lab up            && python bench/http_tunnel.py -i inventories/lab.yaml
    flagops lab up --bastion  && python bench/http_tunnel.py -i inventories/lab-bastion.yaml
Writes bench/results/http_tunnel-<mode>.json: per path, the setup cost (first request,
ssh connections included) and the median/p90 of N sequential GET /health and one-token
completions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flagops import config, service  # noqa: E402
from flagops import http as fhttp  # noqa: E402
from flagops.nodes import Nodes, _Forward  # noqa: E402

_ON_MASTER = r"""
import json, sys, time, urllib.request
url, body = sys.argv[1], sys.argv[2]
req = urllib.request.Request(url, data=body.encode() or None, headers={"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=60) as r:
    print(r.status)
"""


def _stats(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"median_ms": round(statistics.median(xs) * 1000, 2),
            "p90_ms": round(xs[int(0.9 * (len(xs) - 1))] * 1000, 2), "min_ms": round(xs[0] * 1000, 2), "n": len(xs)}


def measure(call, n: int) -> dict[str, object]:  # noqa: ANN001
    t0 = time.perf_counter()
    assert call() == 200
    first = time.perf_counter() - t0
    times = []
    for _ in range(n):
        t = time.perf_counter()
        assert call() == 200
        times.append(time.perf_counter() - t)
    return {"first_ms": round(first * 1000, 2), **_stats(times)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-i", "--inventory", required=True)
    ap.add_argument("-n", type=int, default=50)
    args = ap.parse_args()
    cfg = config.load(args.inventory)
    port = int(cfg.release["serve"]["engine_args"].get("port", 8000))
    model = service.served_model(cfg)
    body = {"model": model, "prompt": "ping", "max_tokens": 1, "temperature": 0}
    out: dict[str, object] = {"inventory": args.inventory, "n": args.n, "paths": {}}
    with Nodes(cfg) as nodes:
        m = nodes.master.name
        mode = "bastion" if nodes.jumps(m) else "default"
        out["mode"] = mode
        bases: dict[str, str] = {}
        if mode == "default":
            bases["direct"] = f"http://{cfg.master.address}:{port}"
            conn = nodes._connection(nodes.hosts[m])
            conn.open()
            fwd = _Forward(conn.transport, (cfg.master.address, port), 5.0)
            bases["forward_direct_ssh"] = f"http://127.0.0.1:{fwd.port}"
        else:
            t0 = time.perf_counter()
            bases["forward_via_bastion"] = service.api_base(cfg, nodes)
            out["forward_setup_ms"] = round((time.perf_counter() - t0) * 1000, 2)
        for name, base in bases.items():
            out["paths"][name] = {
                "health": measure(lambda b=base: fhttp.get(b + "/health").status, args.n),
                "completion": measure(lambda b=base: fhttp.post(b + "/v1/completions", body, 60).status, args.n),
            }

        def on_master(path: str, data: str) -> int:
            r = nodes.run(["python3", "-c", _ON_MASTER, f"http://127.0.0.1:{port}{path}", data], [m], timeout=60)[m]
            return int(r.stdout.strip() or 0) if r.ok else 0

        out["paths"]["exec_on_master"] = {
            "health": measure(lambda: on_master("/health", ""), max(10, args.n // 5)),
            "completion": measure(lambda: on_master("/v1/completions", json.dumps(body)), max(10, args.n // 5)),
        }
    dest = Path(__file__).resolve().parent / "results" / f"http_tunnel-{mode}.json"
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
