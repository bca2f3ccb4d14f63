#!/usr/bin/env python3
"""NCCL all-reduce bus bandwidth probe (torch.distributed, one process per GPU).

Usage:
  intra-node (all GPUs of this node):
    python3 nccl_allreduce.py [--nproc N] [--sizes-mib 1,4,16,64,256,1024]
                              [--warmup 5] [--iters 20] [--min-busbw GBPS]
  inter-node (run once on every node, same arguments except --node-rank):
    python3 nccl_allreduce.py --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 \
                              [--master-port 29531] [--nproc GPUS_PER_NODE]
    python3 nccl_allreduce.py --nnodes 2 --node-rank 1 --master-addr 10.0.0.1
  Rank r = node_rank * nproc + local_rank; world = nnodes * nproc. Only node
  rank 0 reports the bandwidth table (the others report their own view, with
  the same numbers). Set NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME on multi-NIC hosts.

For each size (bf16): one correctness all-reduce (rank r contributes r+1, every
element must equal world*(world+1)/2), then warm-ups, then timed iterations
between CUDA events; the time is the slowest rank's mean. algbw = bytes / time,
busbw = algbw * 2 (n-1) / n (nccl-tests' definition), GB = 1e9 bytes.

NVLink multicast stays off: NCCL_NVLS_ENABLE=0 (and TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1) is forced in this process before torch loads and so in
every spawned worker; each worker reports the value it saw.

status: skip when torch/CUDA is missing or the world has fewer than 2 GPUs;
fail on a wrong sum, a worker error or timeout, or busbw at the largest size
below --min-busbw; pass otherwise. One JSON document on stdout, exit code 0.
"""

import os

# Before anything can load NCCL: never let NVLink multicast (NVLS) on.
FORCED_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
os.environ.update(FORCED_ENV)

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

PROBE = "nccl_allreduce"
DEFAULT_SIZES_MIB = "1,4,16,64,256,1024"


def emit(out, status, reason, values=None, items=None):
    doc = {"probe": PROBE, "status": status, "reason": reason,
           "values": values or {}, "items": items or []}
    out.write(json.dumps(doc, sort_keys=True, default=str) + "\n")
    out.flush()
    return 0


def worker(local_rank, args, queue):
    """One process per GPU. Puts ('ok', rank, result) or ('error', rank, text)."""
    rank = args.node_rank * args.nproc + local_rank
    world = args.nnodes * args.nproc
    try:
        for k, v in FORCED_ENV.items():  # belt and braces for spawned workers
            os.environ[k] = v
        import torch
        import torch.distributed as dist

        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        kw = {}
        try:
            import inspect
            if "device_id" in inspect.signature(dist.init_process_group).parameters:
                kw["device_id"] = dev
        except (TypeError, ValueError):
            pass
        from datetime import timedelta
        dist.init_process_group(
            "nccl",
            init_method="tcp://%s:%d" % (args.master_addr, args.master_port),
            rank=rank, world_size=world, timeout=timedelta(seconds=args.timeout), **kw)
        rows = []
        expected = world * (world + 1) / 2.0
        for mib in args.sizes_mib:
            nbytes = int(mib * 1024 * 1024)
            numel = nbytes // 2
            x = torch.empty(numel, dtype=torch.bfloat16, device=dev)
            x.fill_(float(rank + 1))
            dist.all_reduce(x)
            torch.cuda.synchronize()
            bad = int((x != expected).sum().item())
            x.fill_(1e-3)
            for _ in range(args.warmup):
                dist.all_reduce(x)
            torch.cuda.synchronize()
            dist.barrier()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.iters):
                dist.all_reduce(x)
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / args.iters
            t = torch.tensor([ms, float(bad)], dtype=torch.float64, device=dev)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            ms_max, bad_max = float(t[0].item()), int(t[1].item())
            algbw = nbytes / (ms_max * 1e-3) / 1e9
            busbw = algbw * 2.0 * (world - 1) / world
            rows.append({"size_mib": mib, "bytes": nbytes, "time_ms": round(ms_max, 4),
                         "algbw_GBps": round(algbw, 2), "busbw_GBps": round(busbw, 2),
                         "wrong_elements_max_rank": bad_max})
            del x
        torch.cuda.synchronize()
        dist.barrier()
        info = {"rank": rank, "local_rank": local_rank, "device": torch.cuda.get_device_name(dev),
                "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE"),
                "nccl_version": ".".join(str(v) for v in torch.cuda.nccl.version())}
        dist.destroy_process_group()
        queue.put(("ok", rank, {"rows": rows, "info": info}))
    except BaseException:  # noqa: BLE001 - report, never hang the parent
        queue.put(("error", rank, traceback.format_exc(limit=-6)))


def main(argv=None):
    real_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # library and NCCL chatter goes to stderr; stdout = our JSON
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=None, help="GPUs (processes) on this node; default all")
    ap.add_argument("--nnodes", type=int, default=1)
    ap.add_argument("--node-rank", type=int, default=0)
    ap.add_argument("--master-addr", default="127.0.0.1")
    ap.add_argument("--master-port", type=int, default=29531)
    ap.add_argument("--sizes-mib", default=DEFAULT_SIZES_MIB)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--min-busbw", type=float, default=None, help="GB/s required at the largest size")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds for the whole run")
    args = ap.parse_args(argv)
    args.sizes_mib = [float(s) if "." in s else int(s) for s in args.sizes_mib.split(",") if s.strip()]

    values = {"env": {k: os.environ.get(k) for k in FORCED_ENV}, "nnodes": args.nnodes,
              "node_rank": args.node_rank}
    try:
        import torch
        import torch.multiprocessing as mp
    except Exception as exc:  # noqa: BLE001
        return emit(real_out, "skip", f"torch not importable: {type(exc).__name__}: {exc}", values)
    if not torch.cuda.is_available():
        return emit(real_out, "skip", "no CUDA GPU visible to torch", values)
    ngpu = torch.cuda.device_count()
    if args.nproc is None:
        args.nproc = ngpu
    if args.nproc > ngpu:
        return emit(real_out, "fail", "--nproc %d but only %d GPUs visible" % (args.nproc, ngpu), values)
    world = args.nproc * args.nnodes
    values.update({"gpus_on_node": ngpu, "nproc": args.nproc, "world_size": world})
    if world < 2:
        return emit(real_out, "skip", "%d GPU in the world: all-reduce needs at least 2" % world, values)
    if args.nnodes == 1 and args.master_addr == "127.0.0.1":
        import socket
        with socket.socket() as s:  # a free port for the local rendezvous
            s.bind(("127.0.0.1", 0))
            args.master_port = s.getsockname()[1]

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(lr, args, queue), daemon=True) for lr in range(args.nproc)]
    t0 = time.time()
    for p in procs:
        p.start()
    results, errors = {}, {}
    deadline = t0 + args.timeout
    import queue as queue_mod
    while len(results) + len(errors) < args.nproc and time.time() < deadline:
        try:
            kind, rank, payload = queue.get(timeout=1.0)
        except queue_mod.Empty:
            if all(not p.is_alive() for p in procs) and queue.empty():
                break
            continue
        (results if kind == "ok" else errors)[rank] = payload
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.terminate()
    values["wall_s"] = round(time.time() - t0, 2)
    exitcodes = [p.exitcode for p in procs]
    if errors:
        first = sorted(errors)[0]
        return emit(real_out, "fail", "rank %d failed: %s" % (first, errors[first].strip().splitlines()[-1]),
                    dict(values, errors=errors, exitcodes=exitcodes))
    if len(results) < args.nproc:
        return emit(real_out, "fail", "%d of %d workers reported within %.0f s (exit codes %s)"
                    % (len(results), args.nproc, args.timeout, exitcodes), dict(values, exitcodes=exitcodes))

    lead = results[min(results)]
    rows = lead["rows"]
    values["rows"] = rows
    values["workers"] = [results[r]["info"] for r in sorted(results)]
    values["nccl_version"] = lead["info"]["nccl_version"]
    items = [{"name": "{:g}MiB".format(r["size_mib"]),
              "status": "pass" if r["wrong_elements_max_rank"] == 0 else "fail",
              "reason": "busbw {:.1f} GB/s, {:.3f} ms{}".format(r["busbw_GBps"], r["time_ms"],
                                                       "" if r["wrong_elements_max_rank"] == 0
                                                       else ", %d wrong elements" % r["wrong_elements_max_rank"]),
              "values": r} for r in rows]
    nvls = sorted({str(w["NCCL_NVLS_ENABLE"]) for w in values["workers"]})
    largest = rows[-1]
    values["busbw_GBps_largest"] = largest["busbw_GBps"]
    summary = "%d ranks, busbw %.1f GB/s at %g MiB" % (world, largest["busbw_GBps"], largest["size_mib"])
    problems = [i["name"] + ": wrong sum" for i in items if i["status"] == "fail"]
    if nvls != ["0"]:
        problems.append(f"workers saw NCCL_NVLS_ENABLE={nvls}")
    if args.min_busbw is not None and largest["busbw_GBps"] < args.min_busbw:
        problems.append("busbw {:.1f} < required {:.1f} GB/s".format(largest["busbw_GBps"], args.min_busbw))
    if problems:
        return emit(real_out, "fail", summary + ": " + "; ".join(problems), values, items)
    return emit(real_out, "pass", summary, values, items)


if __name__ == "__main__":
    sys.exit(main())
