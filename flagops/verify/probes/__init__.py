"""GPU probes that flagops ships into the FlagOS container and runs there.

Each probe is a standalone script (stdlib + torch (+ flag_gems) only; it never
imports flagops) run as ``python3 <probe>.py [args]``. It prints exactly one
JSON document on stdout::

    {"probe": name, "status": "pass"|"fail"|"skip", "reason": str,
     "values": {...}, "items": [{"name", "status", "reason", "values"}, ...]}

and exits 0 whatever the verdict (the caller decides); a nonzero exit code
means the probe itself broke. Anything else a library prints goes to stderr.

Probes:
    gpu_info.py        nvidia-smi: driver, GPU count, names, memory, ECC errors
    flaggems_env.py    flag_gems import/version, enable(forward_only=...) signature,
                       USE_FLAGGEMS in this process / a raylet's environ, op-list log
    ops_consistency.py flag_gems vs native torch per op, FlagGems' tolerances, timing
    nccl_allreduce.py  torch.distributed all-reduce bus bandwidth, intra/inter node
"""
