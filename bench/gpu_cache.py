"""First-call time of the ops the service runs, with the kernel caches cold, shared and warm.

A FlagGems-enabled process pays Triton's JIT compile (and FlagGems' autotuning) on the
first call of every kernel; the release's ``RAY_CGRAPH_get_timeout: 60`` exists because
a fresh service's first forward runs into it. This bench starts a fresh process, like a
vLLM worker, with ``flag_gems.enable(unused=["exponential_", "softmax"])`` (FlagScale's
call), and times the first and second call of each op of the default case set of
``flagops/verify/probes/ops_consistency.py`` (ERNIE-4.5-300B-A47B at TP8, one GPU's
shapes), in three states of the two caches the container role sets up:

- ``cold``: an empty Triton cache and an empty FlagGems cache (a new cluster);
- ``shared_warm``: the Triton cache the cold process filled (``TRITON_CACHE_DIR`` on
  the shared storage, keyed by GPU model + flag_gems + triton) and an empty FlagGems
  cache (its SQLite autotune database is per node): a node that joins the cluster;
- ``warm``: both filled (a restarted service on the same node).

    python bench/gpu_cache.py [--root /tmp/flagops-gpu-cache] [--out bench/results/gpu_cache.json]

Needs a CUDA GPU, torch, triton and flag_gems; writes the JSON and prints a table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROBE = REPO / "flagops" / "verify" / "probes" / "ops_consistency.py"
RAY_CGRAPH_GET_TIMEOUT_S = 60  # flagops/releases/ernie45.yaml runner.envs
STATES = ("cold", "shared_warm", "warm")


def child(probe_path: str) -> int:
    """One fresh 'service' process: import + enable FlagGems, first/second call per op."""
    t0 = time.perf_counter()
    import flag_gems
    import torch
    import torch.nn.functional as F

    flag_gems.enable(unused=["exponential_", "softmax"])
    t_import = time.perf_counter() - t0
    spec = importlib.util.spec_from_file_location("ops_consistency", probe_path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    probe.torch, probe.F = torch, F
    counter = probe.install_compile_counter()
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    args = types.SimpleNamespace(size="default", self_test=False, seed=0, warmup=0, iters=1, no_timing=True)
    ctx = probe.Ctx(args, flag_gems, dev)
    ops = []
    for case in probe.select_cases(types.SimpleNamespace(fake_cases=None, all=False, ops=None, dtypes=None), ctx):
        torch.manual_seed(0)
        inp = case.build(getattr(torch, case.dtype) if case.dtype else None)
        fn = case.fused[1] if case.fused else case.run
        torch.cuda.synchronize()
        c0 = counter[0] if counter else None
        t = time.perf_counter()
        fn(inp)
        torch.cuda.synchronize()
        first = time.perf_counter() - t
        t = time.perf_counter()
        fn(inp)
        torch.cuda.synchronize()
        second = time.perf_counter() - t
        ops.append({"name": case.name, "first_s": round(first, 3), "second_ms": round(second * 1e3, 3),
                    "compiled_kernels": (counter[0] - c0) if counter else None,
                    "flaggems": case.fused is not None or case.op != "softmax"})
        del inp
    out = {"import_enable_s": round(t_import, 2), "ops": ops,
           "first_calls_s": round(sum(o["first_s"] for o in ops), 2),
           "process_s": round(time.perf_counter() - t0, 2),
           "device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
           "flag_gems": getattr(flag_gems, "__version__", None)}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


def run_state(root: Path, state: str, fg_dir: Path, timeout: float) -> dict:
    env = dict(os.environ, TRITON_CACHE_DIR=str(root / "triton"), FLAGGEMS_CACHE_DIR=str(fg_dir),
               PYTHONUNBUFFERED="1")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", "--probe", str(PROBE)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{state}: child failed (rc {proc.returncode}): {proc.stderr[-3000:]}")
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    doc["wall_s"] = round(wall, 2)
    doc["triton_cache_entries"] = sum(1 for e in os.scandir(root / "triton") if e.is_dir())
    return doc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/tmp/flagops-gpu-cache", help="scratch dir (emptied first)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu_cache.json"))
    ap.add_argument("--timeout", type=float, default=400)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--probe", default=str(PROBE), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.probe)
    root = Path(a.root)
    shutil.rmtree(root, ignore_errors=True)
    (root / "triton").mkdir(parents=True)
    fg = {"cold": root / "flaggems-node1", "shared_warm": root / "flaggems-node2", "warm": root / "flaggems-node1"}
    res = {}
    for state in STATES:
        print(f"== {state}", file=sys.stderr, flush=True)
        res[state] = run_state(root, state, fg[state], a.timeout)
        print(f"   first calls {res[state]['first_calls_s']} s, process {res[state]['process_s']} s, "
              f"compiled {sum(o['compiled_kernels'] or 0 for o in res[state]['ops'])}", file=sys.stderr, flush=True)
    names = [o["name"] for o in res["cold"]["ops"]]
    table = []
    for i, n in enumerate(names):
        table.append({"op": n, **{f"{s}_first_s": res[s]["ops"][i]["first_s"] for s in STATES},
                      **{f"{s}_compiled": res[s]["ops"][i]["compiled_kernels"] for s in STATES},
                      "steady_ms": res["warm"]["ops"][i]["second_ms"]})
    doc = {"bench": "gpu_cache", "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "device": res["cold"]["device"], "torch": res["cold"]["torch"], "triton": res["cold"]["triton"],
           "flag_gems": res["cold"]["flag_gems"], "ray_cgraph_get_timeout_s": RAY_CGRAPH_GET_TIMEOUT_S,
           "totals": {s: {k: res[s][k] for k in ("first_calls_s", "import_enable_s", "process_s", "wall_s",
                                                 "triton_cache_entries")} for s in STATES},
           "ops": table}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{'op (first call, s)':52s} {'cold':>9s} {'shared_warm':>12s} {'warm':>9s} {'steady ms':>10s}")
    for r in table:
        print(f"{r['op'][:52]:52s} {r['cold_first_s']:9.3f} {r['shared_warm_first_s']:12.3f} "
              f"{r['warm_first_s']:9.3f} {r['steady_ms']:10.3f}")
    for s in STATES:
        t = doc["totals"][s]
        print(f"{s:12s} first calls {t['first_calls_s']:7.2f} s  import+enable {t['import_enable_s']:5.2f} s  "
              f"process {t['process_s']:7.2f} s  (RAY_CGRAPH_get_timeout {RAY_CGRAPH_GET_TIMEOUT_S} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
