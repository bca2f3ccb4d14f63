"""The platform class: vLLM's CPU platform plus a Ray device key."""

from __future__ import annotations

import os

from vllm.platforms.cpu import CpuPlatform


class CpuRayPlatform(CpuPlatform):
    # Wraps: vllm/v1/executor/ray_utils.py::initialize_ray_cluster, which refuses a platform whose
    # ray_device_key is "" and otherwise builds one placement-group bundle {key: 1} per worker
    # (strategy PACK). With "CPU" each `ray start --num-cpus=1` node holds exactly one stage,
    # which is what spreads PP=2 over two nodes (FlagScale hostfile `type=cpu slots=1`).
    ray_device_key: str = os.environ.get("VLLM_CPU_RAY_DEVICE_KEY", "CPU")
