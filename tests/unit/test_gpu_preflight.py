"""The preflight module's GPU parsers on real nvidia-smi output, recorded on an NVIDIA H200
(driver 580.159.04, one GPU, 2026-12-03) by running the preflight role there through
`ansible-playbook` with `ansible_connection: local` (tests/unit/fixtures/gpu_h200/)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
FIX = Path(__file__).resolve().parent / "fixtures" / "gpu_h200"
sys.path.insert(0, str(REPO / "roles" / "preflight" / "library"))
import flagops_preflight as pf  # noqa: E402

sys.path.pop(0)


def judged(gpus: list[dict[str, Any]]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pf.judge_gpus(gpus, lambda check, found, required, fix: out.append((check, found)))
    return out


def test_query_gpu_of_an_idle_h200() -> None:
    gpus = pf.parse_gpu_query((FIX / "query-gpu.csv").read_text())
    assert gpus == [{"index": 0, "name": "NVIDIA H200", "driver_version": "580.159.04",
                     "ecc.mode.current": "Enabled", "persistence_mode": "Enabled", "mig.mode.current": "Disabled",
                     "memory.used": 0, "memory.total": 143771, "ecc.errors.uncorrected.volatile.total": 0}]
    assert judged(gpus) == []


def test_a_gpu_held_by_a_process_is_named() -> None:
    gpus = pf.parse_gpu_query((FIX / "query-gpu-busy.csv").read_text())
    assert judged(gpus) == [("gpu_memory", "GPU 0: 2575 of 143771 MiB in use")]
    apps = pf.parse_compute_apps((FIX / "compute-apps-busy.csv").read_text())
    assert apps == [{"gpu_uuid": "GPU-8f2f6ba6-ce88-fd95-6f08-d2d1f1ecfb4a", "pid": 470, "name": "python3",
                     "used_mib": 2566}]
    assert pf.parse_compute_apps((FIX / "compute-apps-idle.csv").read_text()) == []


@pytest.mark.parametrize("field,value,check", [
    ("ecc.mode.current", "Disabled", "gpu_ecc"),
    ("persistence_mode", "Disabled", "gpu_persistence"),
    ("mig.mode.current", "Enabled", "gpu_mig"),
    ("ecc.errors.uncorrected.volatile.total", 3, "gpu_ecc_errors"),
])
def test_each_gpu_mode_rule(field: str, value: Any, check: str) -> None:
    gpus = pf.parse_gpu_query((FIX / "query-gpu.csv").read_text())
    gpus[0][field] = value
    assert [c for c, _ in judged(gpus)] == [check]


def test_topology_of_one_gpu_with_colour_codes() -> None:
    text = (FIX / "topo-m.txt").read_text()
    assert "\x1b[4m" in text  # nvidia-smi underlines the header even into a file
    assert pf.parse_topo(text) == {"gpus": ["GPU0"], "links": {}, "nvlink": False}


def test_topology_matrix_with_nvlink_and_nics() -> None:
    # Constructed in nvidia-smi's layout (no multi-GPU machine was lent for this session).
    text = ("\tGPU0\tGPU1\tGPU2\tNIC0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\n"
            "GPU0\t X \tNV18\tSYS\tPXB\t0-15\t0\t\tN/A\n"
            "GPU1\tNV18\t X \tSYS\tSYS\t0-15\t0\t\tN/A\n"
            "GPU2\tSYS\tSYS\t X \tSYS\t16-31\t1\t\tN/A\n"
            "NIC0\tPXB\tSYS\tSYS\t X \t\t\t\t\n\nLegend:\n\n  X    = Self\n")
    topo = pf.parse_topo(text)
    assert topo["gpus"] == ["GPU0", "GPU1", "GPU2"] and topo["nvlink"] is True
    assert topo["links"] == {"GPU0-GPU1": "NV18", "GPU0-GPU2": "SYS", "GPU1-GPU2": "SYS"}


def test_the_recorded_run_on_the_h200() -> None:
    """What the role returned there: driver, count, modes; its one failure is a true one (no docker)."""
    rec = json.loads((FIX / "preflight-result.json").read_text())
    facts = rec["node"]["facts"]
    assert facts["driver"] == "580.159.04" and facts["gpu_count"] == 1 and facts["compute_apps"] == []
    assert [f["check"] for f in rec["report"]["failures"]] == ["docker"]
    assert "NVIDIA-SMI 580.159.04" in (FIX / "nvidia-smi.txt").read_text()
