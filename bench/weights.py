"""Weights download on the lab, measured against a bandwidth cap: the flagops weights role
vs ``modelscope download`` (its default and its best worker count) vs curl one file at a time;
then resume after SIGKILL at ~50% (bytes fetched twice), the module's peak RSS, a no-op rerun.

A synthetic model (>= 4 GiB: 8 uneven safetensors shards, an index, a config) is generated in
a temp dir (never committed) and served by the lab hub's code (flagops/lab/hub.py) on
https://172.30.0.1:8444 with the lab certificate, capped per connection (--conn-MBps) and in
aggregate (--cap-MBps), so on this 2-core machine the bench measures the clients, not the CPU.
Every client runs on node1 (the master) except curl, which the nodes do not have: it runs on
the host against the same address and the same per-connection cap.

    python bench/weights.py [--gib 4] [--rounds 3] [--cap-MBps 100] [--conn-MBps 25]

Last line: one JSON object (flagops_MBps, modelscope_MBps, curl_MBps, cap_MBps, refetched_bytes,
peak_rss_MiB, noop_s, model_bytes, ...); also written to bench/results/weights.json.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results"
sys.path.insert(0, str(REPO / "flagops" / "lab"))
import hub as hubmod  # noqa: E402

from flagops.lab.paths import LabPaths  # noqa: E402

GATEWAY = "172.30.0.1"
PORT = 8444
MODEL_ID = "flagops-bench/synthetic-4g"
NODE = "flagops-lab-node1"
LOCK = "/tmp/flagops-lab.lock"
SHARE_NODE = "/share"
CA_NODE = "/etc/ssl/certs/ca-certificates.crt"


@contextlib.contextmanager
def lab_lock(what: str):
    """The shared lab lock, held for one phase (a few minutes), as every lab user does."""
    import fcntl

    log(f"waiting for {LOCK} ({what})")
    with open(LOCK, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        log(f"holding {LOCK} ({what})")
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_model(root: Path, gib: float) -> int:
    """8 uneven shards summing to ``gib`` GiB, an index naming them, a config; returns bytes."""
    root.mkdir(parents=True)
    weights = [9, 7, 6.5, 5, 4.5, 4, 3, 1.2]
    total = int(gib * 2**30)
    sizes = [int(total * w / sum(weights)) for w in weights]
    sizes[-1] += total - sum(sizes)
    block = os.urandom(32 << 20)
    files, weight_map = [], {}
    for i, size in enumerate(sizes):
        name = f"model-{i + 1:05d}-of-{len(sizes):05d}.safetensors"
        h = hashlib.sha256()
        with open(root / name, "wb") as fh:
            left, k = size, 0
            while left:
                piece = (i.to_bytes(2, "little") + k.to_bytes(6, "little") + block[8:])[:min(len(block), left)]
                fh.write(piece)
                h.update(piece)
                left -= len(piece)
                k += 1
        files.append({"path": name, "size": size, "sha256": h.hexdigest()})
        weight_map[f"layers.{i}.weight"] = name
    extras = {"model.safetensors.index.json": json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}),
              "config.json": json.dumps({"architectures": ["Synthetic"], "hidden_size": 64})}
    for name, text in extras.items():
        (root / name).write_text(text)
        data = text.encode()
        files.append({"path": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    (root / "manifest.json").write_text(json.dumps({"name": root.name, "files": files}))
    return sum(f["size"] for f in files)


def sh_node(cmd: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    res = subprocess.run(["docker", "exec", NODE, "bash", "-c", cmd], capture_output=True, text=True, timeout=timeout)
    if check and res.returncode:
        raise SystemExit(f"node1: {cmd}\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    return res


def inventory(tmp: Path, name: str, size: int) -> Path:
    inv = yaml.safe_load((REPO / "inventories" / "lab.yaml").read_text())
    o = inv["all"]["vars"]["flagops_release_overrides"]
    o["model"]["name"] = name
    o["model"]["size_bytes"] = size
    o["model"]["source"].update(id=MODEL_ID, domain=f"{GATEWAY}:{PORT}")
    o["serve"]["engine_args"]["model"] = f"/models/{name}"
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(inv, sort_keys=False))
    return path


def provision(inv: Path, env: dict) -> tuple[int, list[dict], float]:
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "flagops", "provision", str(inv), "--tags", "weights", "--json"],
                         capture_output=True, text=True, cwd=REPO, env=env)
    took = time.monotonic() - t0
    events = []
    for line in res.stdout.splitlines():
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    return res.returncode, events, took


def job_seconds(since: float, name: str) -> float | None:
    """The download module's own wall time (listing + fetch), from this run's saved events."""
    base = Path(os.environ.get("FLAGOPS_HOME") or Path.home() / ".flagops") / "runs"
    for run in sorted(base.glob("*provision*"), key=lambda p: p.stat().st_mtime, reverse=True):
        if run.stat().st_mtime < since - 1:
            break
        found, secs = False, None
        for ev in sorted(run.glob("artifacts/*/job_events/*.json")):
            try:
                doc = json.loads(ev.read_text())
            except ValueError:
                doc = {}
            data = doc.get("event_data") or {}
            task = str(data.get("task", ""))
            found = found or task == f"Weights | fetch and verify {name}"
            if doc.get("event") == "runner_on_ok" and task.startswith("Weights | downloading"):
                secs = (data.get("res") or {}).get("job_seconds")
        if found:
            return secs
    return None


def task_seconds(events: list[dict], prefixes: tuple[str, ...]) -> float:
    """Wall time from the first matching task's start to the last one's end (event timestamps)."""
    from datetime import datetime

    stamps = [datetime.fromisoformat(e["created"]).timestamp() for e in events
              if e.get("created") and str(e.get("task", "")).startswith(prefixes)]
    return max(stamps) - min(stamps) if stamps else float("nan")


class RssSampler(threading.Thread):
    """Peak VmHWM of the download module on node1 (its pid is in the progress record)."""

    def __init__(self, progress_host: Path) -> None:
        super().__init__(daemon=True)
        self.progress_host = progress_host
        self.peak_kib = 0
        self.stop = threading.Event()
        self.pid = None

    def run(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(OSError, ValueError):
                self.pid = json.loads(self.progress_host.read_text()).get("pid") or self.pid
            if self.pid:
                res = sh_node(f"grep VmHWM /proc/{self.pid}/status 2>/dev/null || true", check=False, timeout=10)
                parts = res.stdout.split()
                if len(parts) >= 2 and parts[1].isdigit():
                    self.peak_kib = max(self.peak_kib, int(parts[1]))
            time.sleep(0.5)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cap-MBps", type=float, default=100.0, dest="cap")
    ap.add_argument("--conn-MBps", type=float, default=25.0, dest="conn")
    ap.add_argument("--ms-workers", default="2,4,16", help="worker counts tried besides the default, one round each")
    ap.add_argument("--curl-rounds", type=int, default=None, help="curl rounds (default: --rounds)")
    args = ap.parse_args()
    paths = LabPaths.default()
    share_host = paths.share
    tok = (paths.root / "hub" / "token").read_text().strip()
    env = dict(os.environ, MODELSCOPE_API_TOKEN=tok, PYTHONPATH=str(REPO))
    tmp = Path(tempfile.mkdtemp(prefix="flagops-bench-weights-"))
    created: list[str] = []  # node paths under /share this bench made (removed at the end)
    report: dict = {"cap_MBps": args.cap, "conn_MBps": args.conn, "rounds": args.rounds}
    hub = None
    phase = None
    try:
        log(f"generating a {args.gib} GiB synthetic model in {tmp}")
        model_bytes = make_model(tmp / "model", args.gib)
        report["model_bytes"] = model_bytes
        ctx = hubmod.server_context(paths.root / "hub" / "hub.crt", paths.root / "hub" / "hub.key")
        hub = hubmod.Hub((GATEWAY, PORT), {MODEL_ID: tmp / "model"}, tokens={tok}, context=ctx,
                         rate_conn=args.conn * 1e6, rate_total=args.cap * 1e6)
        threading.Thread(target=hub.serve_forever, daemon=True).start()
        hub.models[MODEL_ID].files()  # read the manifest before timing anything

        # -------- flagops: the weights role through `flagops provision --tags weights`
        phase = lab_lock("flagops rounds, no-op, resume")
        phase.__enter__()
        fl, fl_dl, names = [], [], []
        for r in range(args.rounds):
            name = f"bench-weights-{os.getpid()}-{r}"
            names.append(name)
            created.append(f"{SHARE_NODE}/models/{name}")
            inv = inventory(tmp, name, model_bytes)
            sent0 = hub.bytes_sent
            rss = RssSampler(share_host / ".flagops" / "tools" / f"progress-{name}.json")
            rss.start()
            t_start = time.time()
            rc, events, _took = provision(inv, env)
            rss.stop.set()
            rss.join()
            if rc:
                raise SystemExit(f"provision round {r} failed: {[e.get('msg') for e in events if e.get('msg')]}")
            secs = task_seconds(events, ("Weights | fetch", "Weights | downloading"))
            fl.append(model_bytes / secs / 1e6)
            js = job_seconds(t_start, name)
            if js:
                report.setdefault("flagops_module_rounds_MBps", []).append(round(model_bytes / js / 1e6, 1))
            res = [e for e in events if e.get("event") == "flagops_progress"]
            report.setdefault("progress_events", []).append(len(res))
            report.setdefault("peak_rss_kib", []).append(rss.peak_kib)
            fl_dl.append(hub.bytes_sent - sent0)
            log(f"flagops round {r}: {fl[-1]:.1f} MB/s ({secs:.1f}s), {len(res)} progress events, "
                f"peak RSS {rss.peak_kib / 1024:.0f} MiB")
            if r < args.rounds - 1:
                shutil.rmtree(share_host / "models" / name, ignore_errors=True)
        report["flagops_rounds_MBps"] = [round(x, 1) for x in fl]
        report["flagops_MBps"] = round(statistics.median(fl), 1)  # the role's two download tasks, wall time
        if report.get("flagops_module_rounds_MBps"):  # the module process alone, as `modelscope download` is timed
            report["flagops_module_MBps"] = statistics.median(report["flagops_module_rounds_MBps"])
        report["peak_rss_MiB"] = round(max(report["peak_rss_kib"]) / 1024, 1)

        # -------- no-op rerun on the complete model of the last round
        inv = inventory(tmp, names[-1], model_bytes)
        sent0 = hub.bytes_sent
        t_start = time.time()
        rc, events, took = provision(inv, env)
        report["noop_module_s"] = job_seconds(t_start, names[-1])
        report["noop_s"] = round(task_seconds(events, ("Weights | fetch", "Weights | downloading")), 2)
        report["noop_provision_s"] = round(took, 1)
        report["noop_bytes"] = hub.bytes_sent - sent0
        changed = [e for e in events if e.get("event") == "runner_on_ok" and e.get("changed")]
        report["noop_changed"] = len(changed)
        log(f"no-op: weights tasks {report['noop_s']}s, provision {took:.1f}s, {report['noop_bytes']} bytes, "
            f"changed {len(changed)}")
        shutil.rmtree(share_host / "models" / names[-1], ignore_errors=True)

        # -------- resume after SIGKILL at ~50%
        name = f"bench-weights-{os.getpid()}-resume"
        created.append(f"{SHARE_NODE}/models/{name}")
        inv = inventory(tmp, name, model_bytes)
        prog = share_host / ".flagops" / "tools" / f"progress-{name}.json"
        sent0 = hub.bytes_sent
        proc = subprocess.Popen([sys.executable, "-m", "flagops", "provision", str(inv), "--tags",
                                 "weights", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=REPO, env=env)
        killed_at = None
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and killed_at is None:
            try:
                doc = json.loads(prog.read_text())
            except (OSError, ValueError):
                doc = {}
            if doc.get("bytes_total") and doc["bytes_done"] >= doc["bytes_total"] / 2:
                sh_node(f"kill -9 {int(doc['pid'])}")
                killed_at = doc["bytes_done"]
            time.sleep(0.2)
        proc.communicate(timeout=300)
        on_disk = sum(p.stat().st_size for p in (share_host / "models" / name).rglob("*") if p.is_file())
        rc, events, _ = provision(inv, env)
        if rc:
            raise SystemExit(f"resume run failed: {[e.get('msg') for e in events if e.get('msg')]}")
        sent = hub.bytes_sent - sent0
        report["killed_at_bytes"] = killed_at
        report["refetched_bytes"] = sent - model_bytes
        report["resume_files_in_flight_bound"] = 8
        log(f"resume: killed at {killed_at}, {on_disk} bytes on disk, refetched {sent - model_bytes} bytes")
        shutil.rmtree(share_host / "models" / name, ignore_errors=True)

        phase.__exit__(None, None, None)
        phase = None

        # -------- modelscope download on node1 with the role's SDK venv
        phase = lab_lock("modelscope download rounds")
        phase.__enter__()
        venv = sh_node(f"ls -d {SHARE_NODE}/.flagops/tools/modelscope-* | head -1").stdout.strip()
        ms_env = (f"MODELSCOPE_DOMAIN={GATEWAY}:{PORT} REQUESTS_CA_BUNDLE={CA_NODE} "
                  "MODELSCOPE_CACHE=/tmp/ms-bench-cache MODELSCOPE_CREDENTIALS_PATH=/tmp/ms-bench-cred")

        def ms_round(workers: int | None, tag: str) -> float:
            dest = f"{SHARE_NODE}/models/bench-ms-{os.getpid()}-{tag}"
            created.append(dest)
            flag = f" --max-workers {workers}" if workers else ""
            t0 = time.monotonic()
            sh_node(f"{ms_env} {venv}/bin/modelscope download --model {MODEL_ID} --local_dir {dest}{flag} "
                    f">/tmp/ms-bench.log 2>&1 || (tail -20 /tmp/ms-bench.log; exit 1)")
            took = time.monotonic() - t0
            sh_node(f"rm -rf {dest} /tmp/ms-bench-cache /tmp/ms-bench-cred")
            return model_bytes / took / 1e6

        ms = {"default": [ms_round(None, f"d{r}") for r in range(args.rounds)]}
        log(f"modelscope default: {[round(x, 1) for x in ms['default']]} MB/s")
        for w in [int(x) for x in args.ms_workers.split(",") if x]:
            ms[str(w)] = [ms_round(w, f"w{w}")]
            log(f"modelscope --max-workers {w}: {ms[str(w)][0]:.1f} MB/s")
        best = max(ms, key=lambda k: statistics.median(ms[k]))
        if best != "default":
            ms[best] += [ms_round(int(best), f"w{best}-{r}") for r in range(1, args.rounds)]
        report["modelscope_rounds_MBps"] = {k: [round(x, 1) for x in v] for k, v in ms.items()}
        report["modelscope_default_MBps"] = round(statistics.median(ms["default"]), 1)
        report["modelscope_best_workers"] = best
        report["modelscope_MBps"] = round(statistics.median(ms[best]), 1)
        phase.__exit__(None, None, None)
        phase = None

        # -------- curl, one file after another (on the host: the nodes have no curl)
        listing = hub.models[MODEL_ID].files()
        cu = []
        for r in range(args.curl_rounds or args.rounds):
            dest = tmp / f"curl-{r}"
            dest.mkdir()
            t0 = time.monotonic()
            for f in listing:
                url = f"https://{GATEWAY}:{PORT}/api/v1/models/{MODEL_ID}/repo?Revision=master&FilePath={f['path']}"
                subprocess.run(["curl", "-sSf", "--cacert", str(paths.root / "hub" / "ca.crt"), "-o",
                                str(dest / f["path"]), url], check=True)
            cu.append(model_bytes / (time.monotonic() - t0) / 1e6)
            shutil.rmtree(dest)
        report["curl_rounds_MBps"] = [round(x, 1) for x in cu]
        report["curl_MBps"] = round(statistics.median(cu), 1)
    finally:
        if phase is not None:
            phase.__exit__(None, None, None)
        if hub is not None:
            hub.shutdown()
            hub.server_close()
        for p in created:
            sh_node(f"rm -rf {p}", check=False)
        shutil.rmtree(tmp, ignore_errors=True)

    report["goals"] = {
        "flagops_ge_0.9_cap": report["flagops_MBps"] >= 0.9 * args.cap,
        "flagops_ge_modelscope": report["flagops_MBps"] >= report["modelscope_MBps"],
        "resume_refetch_le_1_chunk_per_connection": report["refetched_bytes"] <= 8 * 64 * 2**20,
        "peak_rss_le_256MiB": report["peak_rss_MiB"] <= 256,
        "noop_le_2s": report["noop_s"] <= 2,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "weights.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
