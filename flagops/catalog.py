"""The release catalog as a table: one summary per entry, for `flagops releases`.

Each entry is validated on its own (:func:`flagops.config.load_release`: schema and the
catalog's own rules, no inventory). A summary holds what an operator picks a release by:
model size, nodes x GPUs, TP/PP, image, stack versions, vendor, and the fields its
sources leave unverified.

Public API: :func:`summary`, :func:`summaries`.
"""

from __future__ import annotations

from typing import Any

from flagops import config


def _human(n: int) -> str:
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6)):
        if n >= size:
            return f"{n / size:.1f} {unit}".replace(".0 ", " ")
    return f"{n} B"


def summary(release: config.Release) -> dict[str, Any]:
    """One catalog entry as plain data (also the JSON of `releases --json`)."""
    rel = release.data
    topo = rel.get("topology") or {}
    tp, pp = config.tp_pp(rel)
    size = int(rel["model"]["size_bytes"])
    minimums = rel.get("minimums") or {}
    fs = rel["flagscale"]
    stack = {
        "flagscale": minimums.get("flagscale"),
        "flagscale_commit": fs["commit"],
        "flaggems": minimums.get("flaggems"),
        "vllm": (rel.get("vllm") or {}).get("version"),
        "vllm_prebuilt": bool((rel.get("vllm") or {}).get("prebuilt")),
    }
    return {
        "name": release.name,
        "file": str(release.file),
        "vendor": rel.get("vendor", "nvidia"),
        "model": rel["model"]["name"],
        "source": rel["model"]["source"].get("id") or rel["model"]["source"].get("url"),
        "size_bytes": size,
        "size": _human(size),
        "nodes": topo.get("nodes"),
        "gpus_per_node": topo.get("gpus_per_node"),
        "tp": tp,
        "pp": pp,
        "image": rel["image"]["ref"],
        "stack": stack,
        "port": rel["serve"]["engine_args"].get("port"),
        "unverified": {w.field: w.reason for w in release.warnings},
    }


def summaries() -> list[dict[str, Any]]:
    """Every catalog entry, sorted by name. Raises ConfigError if one is invalid."""
    return [summary(config.load_release(name)) for name in sorted(config.list_releases())]


def stack_text(stack: dict[str, Any]) -> str:
    parts = [f"FlagScale {stack['flagscale'] or '?'} @{stack['flagscale_commit'][:8]}",
             f"FlagGems {stack['flaggems'] or '?'}",
             f"vLLM {stack['vllm'] or '?'}" + (" (in the image)" if stack["vllm_prebuilt"] else " (built)")]
    return ", ".join(parts)
