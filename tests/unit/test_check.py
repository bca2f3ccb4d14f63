"""flagops check: the judge on two nodes' facts (as the module returns them on the lab) with
one fault at a time, the module itself against a fake docker on this machine, and the CLI's
exit codes. The lab proofs are tests/integration/test_75_check.py."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from flagops import check, config, render

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "inventories" / "lab.yaml"
MODULE = REPO / "roles" / "check" / "library" / "flagops_check.py"
FIX = Path(__file__).resolve().parent / "fixtures" / "check"

DISTS = {"torch": "2.9.0+cpu", "vllm": "0.32.0+cpu", "ray": "2.60.0", "flag-scale": "0.8.0", "idna": "3.10"}
GCS = 41234


def _raylet(pid: int, cpid: int, ip: str, gcs: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    return {"pid": pid, "cpid": cpid, "ppid": 1, "start": "100", "kind": "raylet",
            "cmdline": f"/opt/venvs/x/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet "
                       f"--node_ip_address={ip} --gcs-address={gcs} --node-manager-port=0",
            "env": env if env is not None else {"VLLM_HOST_IP": ip, "RAY_CGRAPH_get_timeout": "60"}}


def node_facts(name: str, ip: str, *, master: bool, serving: bool = True) -> dict[str, Any]:
    """One node's flagops_check result on a healthy, serving lab."""
    procs = []
    parents: dict[str, int] = {"1": 0}
    if serving:
        procs.append(_raylet(200 if master else 300, 20 if master else 30, ip, f"172.30.0.11:{GCS}"))
        if master:
            procs.append({"pid": 150, "cpid": 15, "ppid": 1, "start": "90", "kind": "gcs_server",
                          "cmdline": f"/x/ray/core/src/ray/gcs/gcs_server --gcs_server_port={GCS} "
                                     "--node-ip-address=172.30.0.11"})
            procs.append({"pid": 410, "cpid": 41, "ppid": 400, "start": "120", "kind": "engine",
                          "cmdline": "python3 /usr/local/bin/vllm serve /models/ERNIE-4.5-tiny-MoE --port 30000"})
            parents.update({"400": 1, "410": 400, "420": 410})
    listeners: dict[str, Any] = {}
    if serving:
        listeners["52365"] = [{"pid": 201 if master else 301, "cpid": 21, "cmdline": "python dashboard/agent.py",
                               "ours_container": True}]
        parents[str(201 if master else 301)] = 200 if master else 300
        if master:
            listeners["30000"] = [{"pid": 410, "cpid": 41, "cmdline": "vllm serve", "ours_container": True}]
    res = {
        "host": {
            "infiniband": [],
            "addresses": [{"ifname": "lo", "address": "127.0.0.1", "prefix": 8},
                          {"ifname": "eth0", "address": ip, "prefix": 24}],
            "container": {"exists": True, "running": True, "image_id": "sha256:aaa", "privileged": True,
                          "cap_add": [], "devices": [], "ulimits": {}, "digests": ["r/x@sha256:bbb"],
                          "env": {"VLLM_HOST_IP": ip}},
            "processes": procs,
            "parents": parents,
            "container_pids": [1],
            "listeners": listeners,
        },
        "container": {
            "python": "3.11.2", "dists": dict(DISTS), "install_key": "k" * 64,
            "hostname": name, "hostname_resolves": [ip],
            "shm_bytes": 1 << 30, "ulimits": {"nofile": {"soft": 20000, "hard": 20000},
                                              "memlock": {"soft": 8388608, "hard": 8388608},
                                              "stack": {"soft": 67108864, "hard": 67108864}},
            "env": {"VLLM_HOST_IP": ip, "GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "eth0"},
            "infiniband_devices": [],
            "weights": {"path": "/models/ERNIE-4.5-tiny-MoE", "exists": True,
                        "files": {"config.json": 100, "model.safetensors": 5000}},
            "own_ports": {},
            "probes": {("node2" if master else "node1"): {"52365": "open", **({} if master else {"30000": "open"})}},
            "collective": {"ok": True, "rc": 0, "seconds": 2.1, "backend": "gloo", "net": [], "tail": "ok"},
            **({"ssh": {"node2": {"ok": True, "rc": 0, "error": "", "address": "172.30.0.12", "port": 22}}}
               if master else {}),
        },
        "master": None,
        "allow_tcp": False,
    }
    if master:
        res["master"] = {
            "manifest": {"complete": True,
                         "files": {"config.json": {"size": 100}, "model.safetensors": {"size": 5000}}},
            "service": {"pid": 40, "pid_start": "120"} if serving else None,
            "gcs_port": GCS if serving else None,
            "ray_nodes": [{"ip": "172.30.0.11", "state": "ALIVE", "resources": {"CPU": 1.0}},
                          {"ip": "172.30.0.12", "state": "ALIVE", "resources": {"CPU": 1.0}}] if serving else None,
        }
        if serving:
            procs.append({"pid": 400, "cpid": 40, "ppid": 1, "start": "120", "kind": "engine",
                          "cmdline": "bash -c python flagscale/serve/run_inference_engine.py"})
    return res


@pytest.fixture(scope="module")
def exp() -> check.Expect:
    return check.Expect.from_config(config.load(LAB))


@pytest.fixture
def healthy() -> dict[str, dict[str, Any]]:
    return {"node1": node_facts("node1", "172.30.0.11", master=True),
            "node2": node_facts("node2", "172.30.0.12", master=False)}


def judged(exp: check.Expect, nodes: dict[str, Any], preflight: dict[str, Any] | None = None) -> list[check.Failure]:
    fails, _passed, _skipped = check.judge(exp, preflight or {"failures": []}, nodes)
    return fails


def only(fails: list[check.Failure], prefix: str) -> list[check.Failure]:
    return [f for f in fails if f.check.startswith(prefix)]


def test_expectations_come_from_the_lab_inventory_and_the_contract(exp: check.Expect) -> None:
    assert [h["address"] for h in exp.hosts] == ["172.30.0.11", "172.30.0.12"]
    assert exp.master == "node1" and exp.ray_resource == "CPU"
    assert exp.shm_bytes == 1 << 30
    assert exp.ulimits == {"nofile": 20000, "memlock": 8388608, "stack": 67108864}
    assert exp.ray_envs == {"RAY_CGRAPH_get_timeout": "60"}
    assert exp.model_path == "/models/ERNIE-4.5-tiny-MoE"
    ports = {p["port"]: p["on"] for p in exp.pinned_ports}
    assert ports == {30000: "master", 8265: "master", 10001: "master", 52365: "all"}
    assert [p["port"] for p in exp.ports_on("node2")] == [52365]


def test_a_healthy_serving_lab_passes_every_check(exp: check.Expect, healthy: dict[str, Any]) -> None:
    fails, passed, skipped = check.judge(exp, {"failures": []}, healthy)
    assert fails == []
    assert {"node_ip", "hostname", "port", "collective", "parity", "weights", "leftover", "ray_nodes",
            "dev_shm", "ulimit", "socket_ifname", "ray_cgraph_timeout"} <= set(passed)
    assert skipped == {"infiniband": "no /dev/infiniband on any host"}


def test_a_healthy_lab_before_the_first_deploy_passes_and_skips_ray_nodes(exp: check.Expect) -> None:
    nodes = {"node1": node_facts("node1", "172.30.0.11", master=True, serving=False),
             "node2": node_facts("node2", "172.30.0.12", master=False, serving=False)}
    fails, _passed, skipped = check.judge(exp, {"failures": []}, nodes)
    assert fails == []
    assert "no service recorded" in skipped["ray_nodes"]


def test_hostname_resolving_to_loopback_is_named_on_that_node(exp: check.Expect, healthy: dict[str, Any]) -> None:
    healthy["node2"]["container"]["hostname_resolves"] = ["127.0.1.1"]
    fails = judged(exp, healthy)
    assert [(f.node, f.check) for f in fails] == [("node2", "hostname")]
    assert "node2 resolves to 127.0.1.1" in fails[0].found
    assert "172.30.0.12" in fails[0].required and "/etc/hosts" in fails[0].fix


def test_a_stranger_squatting_a_pinned_port(exp: check.Expect, healthy: dict[str, Any]) -> None:
    healthy["node2"]["host"]["listeners"]["52365"] = [
        {"pid": 9999, "cpid": 9999, "cmdline": "python3 -m http.server 52365", "ours_container": False}]
    fails = judged(exp, healthy)
    assert [(f.node, f.check) for f in fails] == [("node2", "port_52365")]
    assert "host pid 9999 outside flagos: python3 -m http.server 52365" in fails[0].found
    assert "kill 9999 on node2" in fails[0].fix and "never kills" in fails[0].fix


def test_a_squatter_inside_our_container_is_not_ours(exp: check.Expect, healthy: dict[str, Any]) -> None:
    healthy["node2"]["host"]["listeners"]["52365"] = [
        {"pid": 7777, "cpid": 77, "cmdline": "nc -l 52365", "ours_container": True}]
    fails = judged(exp, healthy)
    assert [(f.node, f.check) for f in fails] == [("node2", "port_52365")]
    assert "pid 77 in flagos (host pid 7777), not started by flagops" in fails[0].found


def test_a_port_held_by_the_checks_own_listener_is_free(exp: check.Expect, healthy: dict[str, Any]) -> None:
    healthy["node2"]["container"]["own_ports"] = {"52365": "flagops-check-listener"}
    healthy["node2"]["host"]["listeners"]["52365"] = [{"pid": 5, "cpid": 5, "cmdline": "python3 -",
                                                       "ours_container": True}]
    assert judged(exp, healthy) == []


def test_a_blocked_port_between_nodes(exp: check.Expect, healthy: dict[str, Any]) -> None:
    healthy["node1"]["container"]["probes"]["node2"]["52365"] = "timeout"
    fails = judged(exp, healthy)
    assert [(f.node, f.check) for f in fails] == [("node1", "port_52365.reach")]
    assert "172.30.0.12:52365 (Ray dashboard agent): timeout" in fails[0].found


def test_a_different_package_in_one_container_names_that_node(exp: check.Expect, healthy: dict[str, Any]) -> None:
    healthy["node2"]["container"]["dists"]["ray"] = "2.59.0"
    healthy["node2"]["container"]["dists"]["idna"] = "3.6"
    fails = judged(exp, healthy)
    assert [(f.node, f.check) for f in fails] == [("node2", "parity.ray"), ("node2", "parity.packages")]
    assert fails[0].found == "ray 2.59.0" and "2.60.0 as on node1" in fails[0].required
    assert fails[1].found == "idna 3.6 (on node1: 3.10)"


@pytest.mark.parametrize("field,value,check_name", [
    ("python", "3.12.1", "parity.python"),
    ("install_key", "x" * 64, "parity.flagscale_install_key"),
])
def test_parity_of_python_and_the_install_key(exp: check.Expect, healthy: dict[str, Any], field: str, value: str,
                                              check_name: str) -> None:
    healthy["node2"]["container"][field] = value
    assert [(f.node, f.check) for f in judged(exp, healthy)] == [("node2", check_name)]


def test_parity_of_the_image_and_the_driver(exp: check.Expect, healthy: dict[str, Any]) -> None:
    healthy["node2"]["host"]["container"]["image_id"] = "sha256:ccc"
    pre = {"failures": [], "per_host": {"node1": {"driver": "570.1"}, "node2": {"driver": "535.2"}}}
    fails = judged(exp, healthy, pre)
    assert sorted((f.node, f.check) for f in fails) == [("node2", "parity.driver"), ("node2", "parity.image")]


def test_weights_empty_on_one_node(exp: check.Expect, healthy: dict[str, Any]) -> None:
    healthy["node2"]["container"]["weights"]["files"] = {}
    fails = judged(exp, healthy)
    assert [(f.node, f.check) for f in fails] == [("node2", "weights")]
    assert "2 of 2 files missing" in fails[0].found and "mount the same shared volume" in fails[0].fix


def test_weights_with_a_short_file_and_no_manifest(exp: check.Expect, healthy: dict[str, Any]) -> None:
    healthy["node2"]["container"]["weights"]["files"]["model.safetensors"] = 10
    fails = judged(exp, healthy)
    assert "model.safetensors 10 (manifest 5000)" in fails[0].found
    healthy["node1"]["master"]["manifest"] = None
    assert [(f.node, f.check) for f in judged(exp, healthy)] == [("node1", "weights.manifest")]


def test_a_stray_ray_head_in_a_container(exp: check.Expect, healthy: dict[str, Any]) -> None:
    procs = healthy["node2"]["host"]["processes"]
    procs.append({"pid": 5000, "cpid": 500, "ppid": 1, "start": "300", "kind": "gcs_server",
                  "cmdline": "/x/gcs_server --gcs_server_port=6390 --node-ip-address=172.30.0.12"})
    procs.append(_raylet(5001, 501, "172.30.0.12", "172.30.0.12:6390"))
    fails = judged(exp, healthy)
    assert [(f.node, f.check) for f in fails] == [("node2", "leftover.gcs_server"), ("node2", "leftover.raylet")]
    assert "pid 500 in flagos (host pid 5000)" in fails[0].found and "port 6390" in fails[0].found
    assert "of the cluster at 172.30.0.12:6390" in fails[1].found
    assert "flagops' cluster: 172.30.0.11:41234" in fails[1].required
    assert "docker exec flagos kill 500 on node2" in fails[0].fix


def test_every_ray_process_is_a_leftover_when_no_service_is_recorded(exp: check.Expect,
                                                                     healthy: dict[str, Any]) -> None:
    healthy["node1"]["master"]["service"] = None
    fails = judged(exp, healthy)
    kinds = sorted((f.node, f.check) for f in fails)
    assert ("node2", "leftover.raylet") in kinds and ("node1", "leftover.gcs_server") in kinds
    assert ("node1", "leftover.engine") in kinds
    assert all("no flagops service is recorded" in f.required for f in fails if f.check.startswith("leftover"))


def test_an_engine_outside_the_recorded_serve_tree_is_a_leftover(exp: check.Expect, healthy: dict[str, Any]) -> None:
    healthy["node1"]["host"]["processes"].append({"pid": 888, "cpid": 88, "ppid": 1, "start": "5", "kind": "engine",
                                                  "cmdline": "python3 -m vllm.entrypoints.openai.api_server"})
    fails = judged(exp, healthy)
    assert [(f.node, f.check) for f in fails] == [("node1", "leftover.engine")]
    assert "pid 88" in fails[0].found


def test_ray_joined_with_the_wrong_ip_and_cgraph_timeout_missing(exp: check.Expect, healthy: dict[str, Any]) -> None:
    healthy["node2"]["host"]["processes"][0] = _raylet(300, 30, "10.0.0.5", f"172.30.0.11:{GCS}",
                                                       env={"VLLM_HOST_IP": "172.30.0.12"})
    healthy["node1"]["master"]["ray_nodes"][1]["ip"] = "10.0.0.5"
    fails = judged(exp, healthy)
    got = [(f.node, f.check) for f in fails]
    assert ("node2", "ray_nodes.node_ip") in got
    assert ("node2", "ray_cgraph_timeout.RAY_CGRAPH_get_timeout") in got
    assert ("all", "ray_nodes") in got
    rn = next(f for f in fails if f.check == "ray_nodes")
    assert "10.0.0.5" in rn.found and "a node joined as 10.0.0.5" in rn.fix


def test_a_worker_whose_raylet_never_joined(exp: check.Expect, healthy: dict[str, Any]) -> None:
    healthy["node2"]["host"]["processes"] = []
    healthy["node1"]["master"]["ray_nodes"] = healthy["node1"]["master"]["ray_nodes"][:1]
    got = [(f.node, f.check) for f in judged(exp, healthy)]
    assert ("node2", "ray_nodes") in got and ("all", "ray_nodes") in got and ("all", "ray_nodes.resources") in got


def test_interfaces_derived_per_node(exp: check.Expect, healthy: dict[str, Any]) -> None:
    # node2's cluster address sits on ens5 (names differ between nodes); its container still says eth0
    healthy["node2"]["host"]["addresses"] = [{"ifname": "ens5", "address": "172.30.0.12", "prefix": 24}]
    fails = judged(exp, healthy)
    assert [(f.node, f.check) for f in fails] == [("node2", "socket_ifname.GLOO_SOCKET_IFNAME"),
                                                  ("node2", "socket_ifname.NCCL_SOCKET_IFNAME")]
    assert fails[0].required == "ens5 (carries 172.30.0.12 on node2)" and "flagops_nic: ens5" in fails[0].fix


@pytest.mark.parametrize("value,ok", [("eth0", True), ("eth", True), ("=eth0", True), ("eth0,ib0", True),
                                      ("^lo,docker0", True), ("^eth", False), ("ens5", False), (None, False)])
def test_socket_ifname_syntax(value: str | None, ok: bool) -> None:
    assert check._ifname_covers(value, "eth0") is ok


def test_node_ip_not_bound_and_vllm_host_ip(exp: check.Expect, healthy: dict[str, Any]) -> None:
    healthy["node2"]["host"]["addresses"] = [{"ifname": "eth0", "address": "10.1.1.1", "prefix": 24}]
    assert [(f.node, f.check) for f in judged(exp, healthy)] == [("node2", "node_ip")]
    healthy = {"node1": node_facts("node1", "172.30.0.11", master=True),
               "node2": node_facts("node2", "172.30.0.12", master=False)}
    healthy["node2"]["container"]["env"]["VLLM_HOST_IP"] = None
    assert [(f.node, f.check) for f in judged(exp, healthy)] == [("node2", "node_ip.VLLM_HOST_IP")]


def test_shm_and_ulimits_measured_in_the_container(exp: check.Expect, healthy: dict[str, Any]) -> None:
    healthy["node2"]["container"]["shm_bytes"] = 64 << 20
    healthy["node2"]["container"]["ulimits"]["nofile"] = {"soft": 1024, "hard": 1024}
    fails = judged(exp, healthy)
    assert [(f.node, f.check) for f in fails] == [("node2", "dev_shm"), ("node2", "ulimit_nofile")]
    assert fails[0].found == f"{64 << 20} bytes in the running container"


def test_the_collective_failing_carries_the_ranks_output(exp: check.Expect, healthy: dict[str, Any]) -> None:
    healthy["node2"]["container"]["collective"] = {"ok": False, "rc": 1, "seconds": 20.3, "backend": "gloo",
                                                   "net": [], "tail": "RuntimeError: Gloo connectFullMesh failed"}
    fails = judged(exp, healthy)
    assert [(f.node, f.check) for f in fails] == [("node2", "collective")]
    assert "connectFullMesh" in fails[0].found


def test_unreachable_node_and_container_down(exp: check.Expect, healthy: dict[str, Any]) -> None:
    del healthy["node2"]
    fails, _, _ = check.judge(exp, {"failures": []}, healthy, {"node2": "ssh: connect to host 172.30.0.12 port 22"})
    assert [(f.node, f.check) for f in fails] == [("node2", "ssh")]
    healthy2 = {"node1": node_facts("node1", "172.30.0.11", master=True),
                "node2": node_facts("node2", "172.30.0.12", master=False)}
    healthy2["node2"]["host"]["container"]["running"] = False
    assert [(f.node, f.check) for f in judged(exp, healthy2)] == [("node2", "container")]
    _fails, passed, skipped = check.judge(exp, {"failures": []}, healthy2)
    assert "parity" not in passed and "node2" in skipped["cluster"]


def test_preflight_failures_are_reported_per_node(exp: check.Expect, healthy: dict[str, Any]) -> None:
    pre = {"failures": [{"host": "node2", "check": "docker", "found": "19.03", "required": ">= 20.10",
                         "fix": "upgrade Docker"}]}
    fails = judged(exp, healthy, pre)
    assert [(f.node, f.check, f.found) for f in fails] == [("node2", "preflight.docker", "19.03")]


# ------------------------------------------------------------------ InfiniBand (recorded host facts)


def ib_host(healthy: dict[str, Any], *, privileged: bool, devices: list[str], caps: list[str], memlock: int,
            in_container: list[str]) -> dict[str, Any]:
    n = healthy["node2"]
    n["host"]["infiniband"] = ["rdma_cm", "uverbs0", "uverbs1"]
    n["host"]["container"].update(privileged=privileged, devices=devices, cap_add=caps)
    n["container"]["ulimits"]["memlock"] = {"soft": memlock, "hard": memlock}
    n["container"]["infiniband_devices"] = in_container
    return healthy


def test_ib_host_without_devices_ipc_lock_and_memlock(exp: check.Expect, healthy: dict[str, Any]) -> None:
    """The lab has no InfiniBand: this is the rule on a recorded IB host's facts."""
    exp2 = copy.deepcopy(exp)
    exp2.ulimits = {}
    nodes = ib_host(healthy, privileged=False, devices=[], caps=[], memlock=65536, in_container=[])
    got = [(f.node, f.check) for f in judged(exp2, nodes)]
    assert got == [("node2", "infiniband.devices"), ("node2", "infiniband.in_container"),
                   ("node2", "infiniband.ipc_lock"), ("node2", "infiniband.memlock")]


def test_ib_host_done_right_passes_and_nccl_must_say_net_ib(exp: check.Expect, healthy: dict[str, Any]) -> None:
    exp2 = copy.deepcopy(exp)
    exp2.ulimits = {}
    nodes = ib_host(healthy, privileged=False, devices=["/dev/infiniband/uverbs0", "/dev/infiniband/rdma_cm"],
                    caps=["IPC_LOCK"], memlock=-1, in_container=["rdma_cm", "uverbs0"])
    fails, passed, _ = check.judge(exp2, {"failures": []}, nodes)
    assert fails == [] and "infiniband" in passed
    nodes["node2"]["container"]["collective"] = {"ok": True, "rc": 0, "seconds": 3, "backend": "nccl",
                                                 "net": ["NET/Socket"], "tail": ""}
    assert [(f.node, f.check) for f in judged(exp2, nodes)] == [("node2", "infiniband.nccl_net")]
    nodes["node2"]["allow_tcp"] = True  # flagops_allow_tcp: true for that host
    assert judged(exp2, nodes) == []


# ------------------------------------------------------------------ the module on this machine


@pytest.fixture
def fake_docker(tmp_path: Path) -> Path:
    """`docker` for one running container whose `exec` runs the command here."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    inspect = [{"Image": "sha256:abc", "State": {"Running": True},
                "Config": {"Image": "reg/x:lab", "Env": ["VLLM_HOST_IP=127.0.0.1", "GLOO_SOCKET_IFNAME=lo"]},
                "HostConfig": {"Privileged": True, "CapAdd": None, "Devices": [], "ShmSize": 1 << 30,
                               "Ulimits": [{"Name": "nofile", "Soft": 20000, "Hard": 20000}],
                               "IpcMode": "host", "NetworkMode": "host"}}]
    (tmp_path / "inspect.json").write_text(json.dumps(inspect))
    exe = bindir / "docker"
    exe.write_text(f"""#!/bin/bash
case "$1" in
  inspect) cat {tmp_path}/inspect.json ;;
  image) echo '["reg/x@sha256:def"]' ;;
  top) echo PID; echo $$ ;;
  exec) shift 3; exec "$@" ;;
  *) exit 1 ;;
esac
""")
    exe.chmod(0o755)
    return bindir


def run_module(tmp_path: Path, bindir: Path, **args: Any) -> dict[str, Any]:
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    done = subprocess.run([sys.executable, str(MODULE), str(args_file)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"})
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert not result.get("failed"), result
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_module_collects_host_and_container_facts(tmp_path: Path, fake_docker: Path) -> None:
    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    (models / "config.json").write_text("{}")
    (models / "sub" / "w.bin").write_bytes(b"x" * 10)
    (models / ".flagops-weights.json").write_text(json.dumps({"files": {"config.json": {"size": 2}}}))
    (models / "w2.bin.part").write_bytes(b"x")
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"pid": 1, "pid_start": "1"}))
    script = tmp_path / "run.sh"
    script.write_text("ray start --head --port=45678 --num-cpus=1\n")
    mine, theirs = _free_port(), _free_port()
    busy = socket.socket()
    busy.bind(("0.0.0.0", 0))
    busy.listen(1)
    busy_port = busy.getsockname()[1]
    try:
        res = run_module(tmp_path, fake_docker, container="flagos", address="127.0.0.1", own_ports=[mine, busy_port],
                         peers=[{"name": "me", "address": "127.0.0.1", "ports": [mine, theirs], "ssh_port": theirs}],
                         ssh_probe=True,
                         probe_window_s=1.0, model_path=str(models),
                         manifest_path=str(models / ".flagops-weights.json"), state_file=str(state),
                         serve_script=str(script), install_marker=str(tmp_path / "nokey"))
    finally:
        busy.close()
    c, h, m = res["container"], res["host"], res["master"]
    assert res["changed"] is False
    assert c["python"] == ".".join(map(str, sys.version_info[:3])) and "pytest" in c["dists"]
    assert c["weights"]["files"] == {"config.json": 2, "sub/w.bin": 10}  # no .flagops record, no .part
    assert c["own_ports"][str(mine)] == "flagops-check-listener"
    assert c["own_ports"][str(busy_port)].startswith("in use")
    assert c["probes"]["me"] == {str(mine): "open", str(theirs): "refused"}
    assert c["ssh"]["me"]["ok"] is False and c["ssh"]["me"]["port"] == theirs  # no sshd there
    assert "refused" in c["ssh"]["me"]["error"]
    assert c["hostname"] == socket.gethostname() and c["shm_bytes"] > 0
    assert set(c["ulimits"]) == {"nofile", "memlock", "stack"}
    assert c["install_key"] is None
    assert h["container"]["image_id"] == "sha256:abc" and h["container"]["digests"] == ["reg/x@sha256:def"]
    assert h["container"]["env"]["VLLM_HOST_IP"] == "127.0.0.1"
    assert h["container"]["ulimits"] == {"nofile": {"soft": 20000, "hard": 20000}}
    assert any(a["address"] == "127.0.0.1" and a["ifname"] == "lo" for a in h["addresses"])
    assert m["gcs_port"] == 45678 and m["service"] == {"pid": 1, "pid_start": "1"}
    assert m["manifest"]["files"] == {"config.json": {"size": 2}}
    # nothing is left listening
    with socket.socket() as s:
        s.bind(("0.0.0.0", mine))


def test_module_parsers() -> None:
    sys.path.insert(0, str(MODULE.parent))
    try:
        import flagops_check as mod
    finally:
        sys.path.pop(0)
    ss = ("LISTEN 0 4096 0.0.0.0:52365 0.0.0.0:* users:((\"python\",pid=301,fd=9))\n"
          "LISTEN 0 128 [::]:22 [::]:* users:((\"sshd\",pid=10,fd=4),(\"sshd\",pid=11,fd=4))\n"
          "LISTEN 0 5 127.0.0.1:6000 0.0.0.0:*\n")
    assert mod.parse_ss(ss) == {52365: [301], 22: [10, 11], 6000: []}
    ip = ("1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever\n"
          "7: eth0@if8    inet 172.30.0.12/24 brd 172.30.0.255 scope global eth0\\       valid_lft forever\n")
    assert mod.parse_ip_addr(ip) == [{"ifname": "lo", "address": "127.0.0.1", "prefix": 8},
                                     {"ifname": "eth0", "address": "172.30.0.12", "prefix": 24}]
    assert mod.kind_of("/v/ray/core/src/ray/raylet/raylet --x") == "raylet"
    assert mod.kind_of("/v/ray/core/src/ray/gcs/gcs_server --gcs_server_port=1") == "gcs_server"
    assert mod.kind_of("python3 /usr/bin/vllm serve /m") == "engine"
    assert mod.kind_of("VLLM::EngineCore") == "engine"
    assert mod.kind_of("ray::RayWorkerProc") is None
    assert mod.kind_of("/usr/bin/python3 -m ray.util.client.server") is None


def test_check_command_exit_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from flagops import api
    from flagops.cli import main

    report = check.CheckReport(ok=False, failures=[check.Failure("node2", "hostname", "node2 -> 127.0.1.1",
                                                                 "node2 -> 172.30.0.12", "fix /etc/hosts")],
                               passed=["parity"], skipped={}, seconds=4.2)
    monkeypatch.setattr(api, "check", lambda *a, **k: report)
    r = CliRunner().invoke(main, ["check", str(LAB), "--json"])
    assert r.exit_code == 1
    doc = json.loads(r.output)
    assert doc["ok"] is False and doc["failures"][0]["node"] == "node2" and doc["failures"][0]["fix"]
    r = CliRunner().invoke(main, ["check", str(LAB)])
    assert r.exit_code == 1 and "FAIL node2: hostname" in r.output and "fix:      fix /etc/hosts" in r.output
    report.ok, report.failures = True, []
    r = CliRunner().invoke(main, ["check", str(LAB)])
    assert r.exit_code == 0 and "healthy" in r.output


def test_deploy_refuses_on_a_failing_check_and_force_says_what_it_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    from flagops import api

    bad = check.CheckReport(ok=False, failures=[check.Failure("node2", "leftover.raylet", "pid 5", "none", "kill")],
                            passed=[], skipped={}, seconds=3.0)
    monkeypatch.setattr(api, "run_check", lambda cfg, **k: bad)
    ran: list[str] = []

    def fake_run(cfg: Any, playbook: str, **k: Any) -> Any:
        ran.append(playbook)
        raise RuntimeError("stop here")

    monkeypatch.setattr(api, "run", fake_run)
    with pytest.raises(api.CheckFailed) as exc:
        api.deploy("ernie45", LAB)
    assert ran == [] and "node2: leftover.raylet" in str(exc.value) and "--force" in str(exc.value)
    seen: list[Any] = []
    with pytest.raises(RuntimeError, match="stop here"):
        api.deploy("ernie45", LAB, force=True, on_check=seen.append)
    assert ran == ["deploy"] and seen == [bad]


def test_contract_serve_script_is_flagscale_s_run_script() -> None:
    c = render.contract(config.load(LAB))
    assert c["serve_script"].endswith("outputs/ernie45_300b/serve_logs/scripts/host_0_localhost_run.sh")
    assert c["serve_script"].startswith(c["share"] + "/repos/FlagScale/")


def test_ray_processes_of_flagops_cluster_holding_pinned_ports_are_ours(exp: check.Expect,
                                                                        healthy: dict[str, Any]) -> None:
    """`ray start --head` leaves the dashboard and the client server re-parented to the
    container's init: they are flagops' because they name its cluster's GCS address."""
    healthy["node1"]["host"]["listeners"]["8265"] = [{
        "pid": 160, "cpid": 16, "ours_container": True,
        "cmdline": f"python dashboard.py --port=8265 --gcs-address=172.30.0.11:{GCS} --session-dir=/tmp/ray/s"}]
    assert judged(exp, healthy) == []
    healthy["node1"]["host"]["listeners"]["8265"][0]["cmdline"] = "python dashboard.py --gcs-address=10.9.9.9:6379"
    assert [(f.node, f.check) for f in judged(exp, healthy)] == [("node1", "port_8265")]


def test_collector_reads_the_playbooks_events(exp: check.Expect) -> None:
    got = check.Collector()
    n1 = node_facts("node1", "172.30.0.11", master=True)
    n2 = node_facts("node2", "172.30.0.12", master=False)
    got({"event": "runner_on_ok", "event_data": {"host": "node1", "task_action": "flagops_check",
                                                 "res": {"ansible_job_id": "1", "started": 1}}})
    got({"event": "runner_on_ok", "event_data": {"host": "node1", "task_action": "ansible.builtin.async_status",
                                                 "res": dict(n1, finished=1)}})
    got({"event": "runner_on_ok", "event_data": {"host": "node2", "task_action": "async_status",
                                                 "res": dict(n2, finished=1)}})
    got({"event": "runner_on_ok", "event_data": {"host": "node2", "task_action": "flagops_preflight",
                                                 "res": {"facts": {"driver": None}, "failures": []}}})
    got({"event": "runner_on_ok", "event_data": {"host": "node1", "task_action": "ansible.builtin.set_fact",
                                                 "res": {"ansible_facts": {"preflight_report": {"failures": [
                                                     {"host": "node2", "check": "docker", "found": "x",
                                                      "required": "y", "fix": "z"}]}}}}})
    rep = got.report(exp, 4.26)
    assert set(got.nodes) == {"node1", "node2"} and rep.seconds == 4.26
    assert [(f.node, f.check) for f in rep.failures] == [("node2", "preflight.docker")]
    got({"event": "runner_on_unreachable", "event_data": {"host": "node2", "res": {"msg": "ssh: timed out"}}})
    assert ("node2", "ssh") in [(f.node, f.check) for f in got.report(exp, 1).failures]


def test_no_facts_at_all_is_a_failure_not_healthy(exp: check.Expect) -> None:
    got = check.Collector()
    got.run_error = "the role 'check' was not found"
    rep = got.report(exp, 0.7)
    assert not rep.ok
    assert [(f.node, f.check) for f in rep.failures] == [("node1", "check_facts"), ("node2", "check_facts")]
    assert "the role 'check' was not found" in rep.failures[0].found


def test_before_a_launch_a_dead_recorded_service_does_not_refuse_the_deploy(
        exp: check.Expect, healthy: dict[str, Any]) -> None:
    # The containers restarted (a node reboot): the record remains, Ray and its head are gone.
    for n in ("node1", "node2"):
        healthy[n]["host"]["processes"], healthy[n]["host"]["listeners"] = [], {}
    healthy["node1"]["master"]["ray_nodes"] = None
    healthy["node1"]["master"]["ray_nodes_error"] = "<urlopen error [Errno 111] Connection refused>"
    on_demand = {f.check for f in judged(exp, healthy)}
    assert on_demand == {"ray_nodes"}  # flagops check says the service is gone
    fails, _passed, skipped = check.judge(exp, None, healthy, prelaunch=True)
    assert fails == []  # deploy relaunches it
    assert "before a launch" in skipped["ray_nodes"]


def test_a_worker_the_master_container_cannot_log_in_to(exp: check.Expect, healthy: dict[str, Any]) -> None:
    # node2 was rebuilt: its authorized_keys no longer holds the master container's key.
    healthy["node1"]["container"]["ssh"]["node2"].update(ok=False, rc=255,
                                                        error="root@172.30.0.12: Permission denied (publickey).")
    fails, passed, _ = check.judge(exp, None, healthy, prelaunch=True)  # deploy refuses before the launch
    assert [(f.node, f.check) for f in fails] == [("node2", "ssh_trust")]
    assert "Permission denied" in fails[0].found and "--tags ssh_trust" in fails[0].fix
    assert "ssh_trust" not in passed
