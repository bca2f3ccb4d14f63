"""`flagops deploy / status / logs / stop` on the lab, end to end.

The real FlagScale 0.8.0 runner starts the Ray head on node1, SSHes from the master
container to node2's host and runs `docker exec flagos ray start` there; vLLM on CPU
serves the tiny ERNIE with one pipeline stage per node. The test talks to it through the
OpenAI Python client, as a user would, then stops it and checks that status says so.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import openai
import pytest
import yaml

from flagops.lab.nodes import NODES

if TYPE_CHECKING:
    from conftest import Lab

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
INV = str(REPO / "inventories" / "lab.yaml")
MODEL = "/models/ERNIE-4.5-tiny-MoE"
BASE = "http://172.30.0.11:30000/v1"
NODE1, NODE2 = NODES
STATE_FILE = "/share/.flagops/service/ernie45.json"


def deploy(lab: Lab, *args: str, inventory: str = INV) -> dict[str, Any]:
    done = lab.flagops("deploy", "ernie45", "-i", inventory, "--json", *args, check=False)
    docs = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    final = next(d for d in reversed(docs) if "action" in d)
    assert done.returncode == (0 if final["ok"] else 1)
    return final


def status(lab: Lab) -> dict[str, Any]:
    return json.loads(lab.flagops("status", "-i", INV, "--json", check=False).stdout)


def serve_pid(lab: Lab) -> int:
    return json.loads(lab.ssh(NODE1, f"cat {STATE_FILE}"))["pid"]


def raylet_pid(lab: Lab, node) -> str:
    return lab.ssh(node, "docker exec flagos sh -c 'for p in /proc/[0-9]*; do "
                         "grep -qa '[r]aylet/raylet' $p/cmdline 2>/dev/null && basename $p; done | head -1'").strip()


@pytest.fixture(scope="module")
def provisioned(lab: Lab) -> Lab:
    lab.flagops("provision", INV)
    return lab


def test_deploy_reaches_serving_through_every_stage(provisioned: Lab) -> None:
    res = deploy(provisioned)
    assert res["ok"], (res["reason"], res["logs"])
    assert res["state"] == "SERVING"
    assert [s["name"] for s in res["stages"]] == ["RAY_READY", "LOADING", "MODEL_LISTED", "SERVING", "SUPERVISED"]
    assert all(s["ok"] for s in res["stages"])
    assert res["stages"][0]["detail"].startswith("2/2 CPU registered")
    # deploy returned once the supervisor watches the very process it launched
    assert res["stages"][-1]["detail"].startswith("supervisor WATCHING pid "), res["stages"][-1]
    assert status(provisioned)["supervision"]["state"] == "WATCHING"


def test_pipeline_stages_span_both_nodes(provisioned: Lab) -> None:
    out = provisioned.ssh(
        NODE1,
        "docker exec flagos bash -c 'source /opt/venvs/flagscale-inference/bin/activate && "
        "ray list actors --filter class_name=RayWorkerProc --format json 2>/dev/null; echo; "
        "ray list nodes --format json 2>/dev/null'",
    )
    actors_json, nodes_json = [chunk for chunk in out.split("\n") if chunk.strip().startswith("[")][:2]
    ip_of = {n["node_id"]: n["node_ip"] for n in json.loads(nodes_json)}
    stage_ip = {a["name"].rsplit("_", 1)[-1]: ip_of[a["node_id"]] for a in json.loads(actors_json)}
    assert stage_ip == {"PP0": NODE1.ip, "PP1": NODE2.ip}


def test_openai_client_chat_and_stream(provisioned: Lab) -> None:
    client = openai.OpenAI(base_url=BASE, api_key="EMPTY")
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What's the weather like today?"}]
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert resp.choices[0].message.role == "assistant"
    assert resp.usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert text == resp.choices[0].message.content  # greedy: stream and non-stream agree


def test_second_deploy_keeps_the_service(provisioned: Lab) -> None:
    pid = serve_pid(provisioned)
    ray2 = raylet_pid(provisioned, NODE2)
    res = deploy(provisioned)
    assert res["ok"] and res["action"] == "keep" and res["state"] == "SERVING"
    assert serve_pid(provisioned) == pid
    assert raylet_pid(provisioned, NODE2) == ray2


def test_changed_engine_arg_restarts_service_and_ray(provisioned: Lab, tmp_path: Path) -> None:
    inv = yaml.safe_load(Path(INV).read_text())
    inv["all"]["vars"]["flagops_release_overrides"]["serve"]["engine_args"]["max_num_seqs"] = 16
    changed = tmp_path / "lab-max-num-seqs.yaml"
    changed.write_text(yaml.safe_dump(inv))
    pid, ray2 = serve_pid(provisioned), raylet_pid(provisioned, NODE2)
    res = deploy(provisioned, inventory=str(changed))
    assert res["ok"] and res["action"] == "restart", res["reason"]
    assert serve_pid(provisioned) != pid
    assert raylet_pid(provisioned, NODE2) != ray2, \
        "Ray on the worker must restart (envs reach workers only via ray start)"
    installed = provisioned.ssh(NODE1, "cat /share/repos/FlagScale/examples/ernie45/conf/serve/300b.yaml")
    assert "max_num_seqs: 16" in installed
    back = deploy(provisioned)  # and back to the committed inventory
    assert back["ok"] and back["action"] == "restart"


def test_status_reports_every_node(provisioned: Lab) -> None:
    st = status(provisioned)
    assert st["state"] == "SERVING", st["problems"]
    assert st["ray"]["total"] == 2 and st["ray"]["missing"] == []
    for name in ("node1", "node2"):
        assert st["nodes"][name]["container"]["running"]
        assert st["nodes"][name]["ray"]["member"]
    assert st["nodes"]["node1"]["serve"]["alive"]


def test_logs_tarball(provisioned: Lab, tmp_path: Path) -> None:
    out = tmp_path / "logs.tgz"
    provisioned.flagops("logs", "-i", INV, "-o", str(out))
    with tarfile.open(out) as tar:
        names = set(tar.getnames())
        output = tar.extractfile("node1/flagscale/host_0_localhost.output").read().decode()
    assert {"rendered/hostfile.txt", "rendered/serve.yaml", "rendered/serve/300b.yaml",
            "node1/container.log", "node2/container.log", "node1/ray-logs.tgz", "node2/ray-logs.tgz"} <= names
    assert "RayWorkerProc" in output  # vLLM output, worker lines included


def test_stop_without_flagscale_pid_file(provisioned: Lab) -> None:
    # FlagScale's own `action=stop` crashes when its pid file is missing; ours does not need it.
    provisioned.ssh(NODE1, "rm -f /share/repos/FlagScale/outputs/ernie45_300b/serve_logs/pids/host_0_localhost.pid")
    done = provisioned.flagops("stop", "-i", INV, "--json")
    assert json.loads(done.stdout.splitlines()[-1])["state"] == "STOPPED"
    st = status(provisioned)
    assert st["state"] == "STOPPED"
    for node in NODES:
        assert st["nodes"][node.hostname]["container"]["running"], "containers stay up without --containers"
        left = provisioned.ssh(node, "docker exec flagos sh -c "
                                     "'grep -las -e [r]aylet -e [g]cs_server -e [v]llm /proc/[0-9]*/cmdline || true'")
        assert left.strip() == "", f"{node.hostname} still runs: {left}"


def test_deploy_again_after_stop(provisioned: Lab) -> None:
    res = deploy(provisioned)
    assert res["ok"] and res["action"] == "start" and res["state"] == "SERVING"
