"""`flagops verify` against the lab's real service (vLLM CPU, PP=2 over Ray on two DinD nodes).

On the lab every non-GPU check passes (service, cluster, output against the committed
reference) and the GPU and FlagGems checks skip with a reason. `--bench` runs a small
profile and its numbers must add up; a baseline it cannot reach makes it fail.

The service is deployed here if it is not serving yet (provision + deploy), so the module
also runs on its own: ``pytest -m lab tests/integration/test_verify.py``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import Lab

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
INV = str(REPO / "inventories" / "lab.yaml")
SMALL = ["--num-prompts", "4", "--input-len", "32", "--output-len", "16"]


@pytest.fixture(scope="module")
def serving(lab: Lab) -> Lab:
    st = lab.flagops("status", "-i", INV, "--probe", "--json", check=False)
    try:
        state = json.loads(st.stdout).get("state")
    except ValueError:
        state = None
    if state != "SERVING":
        lab.flagops("provision", INV)
        lab.flagops("deploy", "ernie45", "-i", INV)
    return lab


def verify(lab: Lab, *args: str) -> tuple[int, dict[str, Any], float]:
    t0 = time.perf_counter()
    done = lab.flagops("verify", "-i", INV, "--json", *args, check=False)
    wall = time.perf_counter() - t0
    try:
        doc = json.loads(done.stdout)
    except ValueError as exc:
        raise AssertionError(f"verify printed no JSON (rc {done.returncode}):\n{done.stdout}\n{done.stderr}") from exc
    return done.returncode, doc, wall


def test_verify_on_the_lab(serving: Lab) -> None:
    rc, doc, wall = verify(serving)
    by = {c["name"]: c for c in doc["checks"]}
    failed = {n: c["reason"] for n, c in by.items() if c["status"] == "fail"}
    assert rc == 0 and doc["ok"] and not failed, failed
    for name in ("service.health", "service.models", "service.chat", "service.chat_stream", "service.metrics",
                 "cluster.containers", "cluster.ray", "output.consistency"):
        assert by[name]["status"] == "pass", (name, by[name]["reason"])
    for name in ("flaggems.import", "flaggems.enable_signature", "flaggems.env", "flaggems.oplist",
                 "gpu.info", "gpu.nccl", "gpu.ops"):
        assert by[name]["status"] == "skip" and "no GPUs" in by[name]["reason"], (name, by[name])
    # what the checks measured, not just their verdicts
    assert by["cluster.ray"]["values"]["total"] == 2 and by["cluster.ray"]["values"]["resource"] == "CPU"
    assert set(by["cluster.containers"]["values"]["hosts"]) == {"node1", "node2"}
    assert by["service.metrics"]["values"]["kv_cache_usage_perc"] is not None
    assert by["output.consistency"]["values"]["agreement_pct"] == 100.0  # PP=2 == the recorded reference
    # the probe really ran in the containers: it saw no flag_gems there
    assert "flag_gems" in by["flaggems.import"]["reason"]
    assert doc["wall_s"] <= 15.0, f"verify took {doc['wall_s']} s (goal 15 s); per check: " + \
        ", ".join(f"{c['name']}={c['seconds']}" for c in doc["checks"])
    assert wall < 20.0


def test_verify_bench_small_profile(serving: Lab, tmp_path: Path) -> None:
    saved = tmp_path / "bench.json"
    rc, doc, _ = verify(serving, "--only", "service.health", "--bench", *SMALL, "--save", str(saved))
    assert rc == 0, doc
    b = doc["bench"]
    assert b["completed"] == 4 and b["failed"] == 0
    assert b["total_input_tokens"] == 4 * 32 and b["total_output_tokens"] == 4 * 16
    for key in ("request_throughput", "output_throughput", "total_token_throughput", "mean_ttft_ms",
                "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "mean_itl_ms",
                "p99_itl_ms"):
        assert b[key] > 0, key
    assert b["output_throughput"] == pytest.approx(b["total_output_tokens"] / b["duration"])
    assert doc["checks"][-1]["name"] == "bench.serve" and doc["checks"][-1]["status"] == "pass"
    assert json.loads(saved.read_text())["completed"] == 4

    # a generous regression limit against its own result passes ...
    rc, doc, _ = verify(serving, "--only", "service.health", "--bench", *SMALL, "--baseline", str(saved),
                        "--max-regression", "400")
    assert rc == 0, doc["checks"][-1]
    # ... a baseline ten times faster than the lab can be fails, naming the metric
    fast = json.loads(saved.read_text())
    fast["output_throughput"] *= 10
    base = tmp_path / "fast.json"
    base.write_text(json.dumps(fast))
    rc, doc, _ = verify(serving, "--only", "service.health", "--bench", *SMALL, "--baseline", str(base))
    assert rc == 1 and doc["checks"][-1]["status"] == "fail"
    assert "output_throughput" in doc["checks"][-1]["reason"]


def test_verify_fails_on_a_dead_endpoint(serving: Lab) -> None:
    rc, doc, _ = verify(serving, "--only", "service", "--endpoint", "http://172.30.0.11:1")
    assert rc == 1 and all(c["status"] in ("fail", "skip") for c in doc["checks"])
    assert doc["summary"]["fail"] >= 3
