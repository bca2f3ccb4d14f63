#!/usr/bin/env python3
"""GPU inventory probe: driver version, GPU count, names, memory, ECC errors.

Usage: python3 gpu_info.py [--nvidia-smi PATH] [--expect-gpus N]
                           [--expect-driver VERSION] [--timeout S]

Runs ``nvidia-smi --query-gpu=... --format=csv,noheader,nounits`` and prints one
JSON document on stdout (see probes/__init__.py). Stdlib only.

status: skip when nvidia-smi is missing or reports no devices; fail when a GPU
has uncorrected volatile ECC errors, or the count / driver differs from the
--expect-* values, or nvidia-smi errors out; pass otherwise. Exit code 0.
"""

import argparse
import json
import shutil
import subprocess
import sys

PROBE = "gpu_info"
FIELDS = (
    "index",
    "name",
    "uuid",
    "driver_version",
    "memory.total",
    "memory.used",
    "ecc.mode.current",
    "ecc.errors.uncorrected.volatile.total",
)
NO_DEVICE_MARKERS = ("no devices were found", "no devices found")


def emit(status, reason, values=None, items=None):
    doc = {
        "probe": PROBE,
        "status": status,
        "reason": reason,
        "values": values or {},
        "items": items or [],
    }
    sys.stdout.write(json.dumps(doc, sort_keys=True) + "\n")
    sys.stdout.flush()
    return 0


def _num(text):
    """nvidia-smi number or None for '[N/A]', 'N/A', '[Not Supported]'."""
    t = text.strip()
    try:
        return int(t)
    except ValueError:
        try:
            return float(t)
        except ValueError:
            return None


def parse(stdout):
    gpus = []
    for line in stdout.splitlines():
        if not line.strip():
            continue
        cols = [c.strip() for c in line.split(",")]
        if len(cols) != len(FIELDS):
            raise ValueError(f"unexpected nvidia-smi line: {line!r}")
        row = dict(zip(FIELDS, cols, strict=False))
        gpus.append(
            {
                "index": _num(row["index"]),
                "name": row["name"],
                "uuid": row["uuid"],
                "driver_version": row["driver_version"],
                "memory_total_mib": _num(row["memory.total"]),
                "memory_used_mib": _num(row["memory.used"]),
                "ecc_mode": row["ecc.mode.current"],
                "ecc_uncorrected_volatile": _num(
                    row["ecc.errors.uncorrected.volatile.total"]
                ),
            }
        )
    return gpus


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nvidia-smi", default="nvidia-smi", help="nvidia-smi binary")
    ap.add_argument("--expect-gpus", type=int, default=None)
    ap.add_argument("--expect-driver", default=None)
    ap.add_argument("--timeout", type=float, default=20.0)
    args = ap.parse_args(argv)

    exe = shutil.which(args.nvidia_smi)
    if exe is None:
        return emit("skip", f"nvidia-smi not found ({args.nvidia_smi}): no NVIDIA driver on this node")
    cmd = [exe, "--query-gpu=" + ",".join(FIELDS), "--format=csv,noheader,nounits"]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=args.timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return emit("fail", f"nvidia-smi timed out after {args.timeout:.0f} s",
                    {"command": " ".join(cmd)})
    except OSError as exc:
        return emit("skip", f"nvidia-smi could not run: {exc}")
    out = (proc.stdout or "") + (proc.stderr or "")
    if any(m in out.lower() for m in NO_DEVICE_MARKERS):
        return emit("skip", f"nvidia-smi: no GPUs on this node ({out.strip()[:200]})")
    if proc.returncode != 0:
        return emit("fail", "nvidia-smi exited %d: %s" % (proc.returncode, out.strip()[:400]),
                    {"command": " ".join(cmd)})
    try:
        gpus = parse(proc.stdout)
    except ValueError as exc:
        return emit("fail", str(exc), {"raw": proc.stdout[:2000]})
    if not gpus:
        return emit("skip", "nvidia-smi listed no GPUs")

    drivers = sorted({g["driver_version"] for g in gpus})
    names = sorted({g["name"] for g in gpus})
    items = []
    problems = []
    for g in gpus:
        ecc = g["ecc_uncorrected_volatile"]
        if ecc:
            st, why = "fail", "%d uncorrected volatile ECC errors" % ecc
            problems.append("GPU {}: {}".format(g["index"], why))
        elif ecc is None:
            st, why = "pass", "ECC counter not available ({})".format(g["ecc_mode"])
        else:
            st, why = "pass", "no uncorrected ECC errors"
        items.append({"name": "gpu{}".format(g["index"]), "status": st, "reason": why, "values": g})
    if args.expect_gpus is not None and len(gpus) != args.expect_gpus:
        problems.append("%d GPUs, expected %d" % (len(gpus), args.expect_gpus))
    if args.expect_driver and drivers != [args.expect_driver]:
        problems.append("driver {}, expected {}".format(",".join(drivers), args.expect_driver))
    if len(drivers) > 1:
        problems.append(f"mixed driver versions {drivers}")

    values = {
        "gpu_count": len(gpus),
        "driver_version": drivers[0] if len(drivers) == 1 else drivers,
        "names": names,
        "memory_total_mib": [g["memory_total_mib"] for g in gpus],
        "ecc_uncorrected_volatile_total": sum(g["ecc_uncorrected_volatile"] or 0 for g in gpus),
    }
    summary = "%d x %s, driver %s" % (len(gpus), "/".join(names), ",".join(drivers))
    if problems:
        return emit("fail", summary + ": " + "; ".join(problems), values, items)
    return emit("pass", summary + ", no uncorrected ECC errors", values, items)


if __name__ == "__main__":
    sys.exit(main())
