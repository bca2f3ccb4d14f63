"""The lab at 1 and 4 nodes: the tiny ERNIE MoE served with PP=1 and PP=4, 100 % against PP=1.

`flagops lab up --nodes N` resizes the lab and writes the inventory at that size
($FLAGOPS_HOME/lab/inventory.yaml: inventories/lab.yaml with PP=N and hosts node1..nodeN,
data only). Each size is provisioned and deployed for real; verify's output-consistency
check compares greedy token ids with the committed reference, which is the PP=1 output:
the one-node test records the PP=1 output afresh and finds it equal to that file.

One node: no workers, so no SSH trust and no ssh line in FlagScale's run script.
Four nodes: one pipeline stage per node, the lab's memory within 16 GiB.

Whatever happens, the module ends with the default lab restored: two nodes, provisioned
and deployed on inventories/lab.yaml, verify passing.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from flagops.lab import nodes
from flagops.verify import output

if TYPE_CHECKING:
    from conftest import Lab

pytestmark = [pytest.mark.lab, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
INV = str(REPO / "inventories" / "lab.yaml")
RUN_SCRIPT = "repos/FlagScale/outputs/ernie45_300b/serve_logs/scripts/host_0_localhost_run.sh"
REFERENCE = REPO / "flagops" / "verify" / "reference" / "ernie45-ERNIE-4.5-tiny-MoE.json"
GIB = 2**30


def resize(lab: Lab, count: int) -> str:
    """`lab up --nodes N`; the inventory it wrote. Checks the lab has exactly those nodes."""
    report = json.loads(lab.flagops("lab", "up", "--nodes", str(count), "--json").stdout)
    assert report["ok"] and report["nodes"] == count
    want = {f"node{i}": f"172.30.0.{10 + i}" for i in range(1, count + 1)}
    assert report["hosts"] == want
    st = json.loads(lab.flagops("lab", "status", "--json").stdout)
    assert st["ok"] and st["size"] == count
    assert {name for name, n in st["nodes"].items() if n["up"]} == set(want)
    assert not [name for name, n in st["nodes"].items() if n.get("extra")], "lab up left a node of another size"
    inventory = report["inventory"] if count != nodes.DEFAULT_NODES else INV
    return inventory


def serve(lab: Lab, inventory: str, count: int) -> dict[str, Any]:
    """Provision and deploy at this size; verify's report, its checks by name."""
    lab.flagops("provision", inventory)
    done = lab.flagops("deploy", "ernie45", "-i", inventory, "--json", check=False)
    docs = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    final = next(d for d in reversed(docs) if "action" in d)
    assert done.returncode == 0 and final["ok"] and final["state"] == "SERVING", \
        (final.get("reason"), done.stderr[-2000:])
    assert final["stages"][0]["detail"].startswith(f"{count}/{count} CPU registered")
    return verify(lab, inventory)


def verify(lab: Lab, inventory: str) -> dict[str, Any]:
    done = lab.flagops("verify", "-i", inventory, "--json", check=False)
    doc = json.loads(done.stdout)
    by = {c["name"]: c for c in doc["checks"]}
    failed = {n: c["reason"] for n, c in by.items() if c["status"] == "fail"}
    assert done.returncode == 0 and doc["ok"] and not failed, failed
    return by


def worker_ips(lab: Lab) -> dict[str, str]:
    """vLLM's Ray worker actors (named ``..._PP<rank>`` when PP > 1) -> the address of the
    Ray node each runs on."""
    out = lab.ssh(
        nodes.NODES[0],
        "docker exec flagos bash -c 'source /opt/venvs/flagscale-inference/bin/activate && "
        "ray list actors --filter class_name=RayWorkerProc --filter state=ALIVE --format json 2>/dev/null; echo; "
        "ray list nodes --filter state=ALIVE --format json 2>/dev/null'",
    )
    actors_json, nodes_json = [chunk for chunk in out.split("\n") if chunk.strip().startswith("[")][:2]
    ip_of = {n["node_id"]: n["node_ip"] for n in json.loads(nodes_json)}
    return {a["name"]: ip_of[a["node_id"]] for a in json.loads(actors_json)}


@pytest.fixture(scope="module")
def sized(lab: Lab) -> Iterator[Lab]:
    """The lab for the resizing tests; afterwards, in any case, the default lab again."""
    try:
        yield lab
    finally:
        resize(lab, nodes.DEFAULT_NODES)
        lab.flagops("provision", INV)
        lab.flagops("deploy", "ernie45", "-i", INV)
        by = verify(lab, INV)
        assert by["output.consistency"]["values"]["agreement_pct"] == 100.0
        assert by["cluster.ray"]["values"]["total"] == 2


def test_one_node_serves_pp1_without_ssh_trust(sized: Lab, tmp_path: Path) -> None:
    inventory = resize(sized, 1)
    text = Path(inventory).read_text()
    assert "pipeline_parallel_size: 1 " in text and "workers:" not in text
    by = serve(sized, inventory, 1)
    assert by["cluster.ray"]["values"]["total"] == 1
    assert set(by["cluster.containers"]["values"]["hosts"]) == {"node1"}
    oc = by["output.consistency"]
    assert oc["status"] == "pass" and oc["values"]["agreement_pct"] == 100.0, oc["reason"]
    assert list(worker_ips(sized).values()) == ["172.30.0.11"]  # the one worker, on node1
    # FlagScale started everything locally: not one ssh command in its run script
    script = (sized.paths.share / RUN_SCRIPT).read_text()
    assert "start --head" in script and "ssh " not in script, script
    # the committed reference is this PP=1 output: recorded afresh, the same token ids
    fresh = tmp_path / "pp1.json"
    sized.flagops("verify", "-i", inventory, "--record-reference", str(fresh))
    got, ref = output.load_reference(fresh)["outputs"], output.load_reference(REFERENCE)["outputs"]
    assert [o["token_ids"] for o in got] == [o["token_ids"] for o in ref]
    assert json.loads(fresh.read_text())["engine_args"]["pipeline_parallel_size"] == 1


def test_four_nodes_serve_pp4_one_stage_per_node(sized: Lab) -> None:
    inventory = resize(sized, 4)
    by = serve(sized, inventory, 4)
    assert by["cluster.ray"]["values"]["total"] == 4
    assert set(by["cluster.containers"]["values"]["hosts"]) == {"node1", "node2", "node3", "node4"}
    oc = by["output.consistency"]
    assert oc["status"] == "pass" and oc["values"]["agreement_pct"] == 100.0, oc["reason"]
    stages = {name.rsplit("_", 1)[-1]: ip for name, ip in worker_ips(sized).items()}
    # one stage per node: four stages on four distinct nodes (which stage lands on which node is
    # Ray's placement; it is not always node order)
    assert sorted(stages) == [f"PP{i}" for i in range(4)]
    assert sorted(stages.values()) == [f"172.30.0.{11 + i}" for i in range(4)], stages
    script = (sized.paths.share / RUN_SCRIPT).read_text()
    for ip in ("172.30.0.12", "172.30.0.13", "172.30.0.14"):
        assert f"ssh -n -p 22 {ip} " in script, f"no ssh to {ip} in the run script"
    # the lab as bench/lab_memory.py counts it: node cgroups minus page cache + host services
    sys.path.insert(0, str(REPO))
    from bench.lab_memory import Sampler

    used = Sampler(sized.paths, 0, nodes.lab_nodes(4)).sample()["lab"]
    assert used <= 16 * GIB, f"the 4-node lab uses {used / GIB:.2f} GiB serving (goal 16 GiB)"
