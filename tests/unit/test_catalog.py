"""The release catalog: `flagops releases`, unverified fields, and each release checked
against its inventory (node count, GPUs per node, TP x PP, devices, shm)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from flagops import config, render
from flagops.cli import main

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("in_repo")  # messages show repo-relative paths
RELEASES = ["deepseek-r1", "ernie45", "kimi-k2-instruct", "qwen3-235b-a22b-instruct-2507"]
EXAMPLES = {
    "ernie45": "a800",
    "kimi-k2-instruct": "kimi-2node",
    "deepseek-r1": "deepseek-r1-4node",
    "qwen3-235b-a22b-instruct-2507": "qwen3-1node",
}


def _cli(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


def _variant(tmp_path: Path, example: str, edit: Any) -> Path:
    """A copy of inventories/<example>.yaml changed by ``edit(data)``."""
    data = yaml.safe_load((REPO / "inventories" / f"{example}.yaml").read_text())
    edit(data)
    path = tmp_path / f"{example}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _problems(result: Any) -> list[dict[str, Any]]:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return json.loads(result.stdout)["problems"]


# --------------------------------------------------------------------------- listing


def test_releases_json_lists_the_four_entries() -> None:
    result = _cli("releases", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)["releases"]}
    assert sorted(rows) == RELEASES
    shape = {n: (r["nodes"], r["gpus_per_node"], r["tp"], r["pp"]) for n, r in rows.items()}
    assert shape == {
        "ernie45": (2, 8, 8, 2),
        "kimi-k2-instruct": (2, 8, 16, 1),
        "deepseek-r1": (4, 8, 8, 4),
        "qwen3-235b-a22b-instruct-2507": (1, 8, 8, 1),
    }
    assert rows["ernie45"]["stack"] == {
        "flagscale": "0.8.0", "flagscale_commit": "230dc1d879d8c2af1e449fc29b0cd1867e07c0c3",
        "flaggems": "2.2", "vllm": "0.9.1", "vllm_prebuilt": False}
    assert rows["qwen3-235b-a22b-instruct-2507"]["stack"]["flaggems"] == "3.0"
    assert rows["deepseek-r1"]["image"].endswith("flagrelease:deepseek-flagos-nvidia")
    assert rows["deepseek-r1"]["size_bytes"] == 1342000000000 and rows["deepseek-r1"]["size"] == "1.3 TB"
    # the examples the issue names: Qwen3's TP size, ERNIE's pulled-vs-run image
    assert "serve.engine_args_specific.vllm.tensor_parallel_size" in rows["qwen3-235b-a22b-instruct-2507"]["unverified"]
    assert "robobrain2" in rows["ernie45"]["unverified"]["image.ref"]
    assert {r["vendor"] for r in rows.values()} == {"nvidia"}


def test_releases_text_names_size_topology_image_stack_unverified() -> None:
    result = _cli("releases")
    assert result.exit_code == 0, result.output
    block = result.stdout.split("kimi-k2-instruct  ", 1)[1].split("\nqwen3", 1)[0]
    assert "Kimi-K2-Instruct, 1 TB" in block
    assert "topology:   2x8, TP16/PP1" in block
    assert "image:      harbor.baai.ac.cn/flagrelease-public/flagrelease_nvidia_kimi_k2" in block
    assert "FlagScale 0.8.0 @230dc1d8, FlagGems 2.2, vLLM ? (in the image)" in block
    assert "unverified: model.size_bytes, image.ref, flagscale.commit, vllm.prebuilt, serve.engine_args.port" in block


def test_releases_show_one(tmp_path: Path) -> None:
    result = _cli("releases", "show", "deepseek-r1", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["name"] == "deepseek-r1" and doc["release"]["container"]["devices"] == ["/dev/infiniband"]
    assert doc["unverified"]["serve.engine_args.port"].startswith("neither the card")
    text = _cli("releases", "show", "deepseek-r1")
    assert text.exit_code == 0
    assert "topology:   4x8, TP8/PP4; API port 8000" in text.stdout
    assert "serve.engine_args.port: neither the card" in text.stdout
    assert "shm_size: 512g" in text.stdout


@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["text", "json"])
def test_releases_show_unknown_name_exits_2_with_the_names(json_flag: list[str]) -> None:
    result = _cli("releases", "show", "kimi", *json_flag)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    line = result.stderr.splitlines()[0]
    assert line.startswith("<command line>:1:1: /NAME: found release \"kimi\"")
    for name in RELEASES:
        assert name in line
    if json_flag:
        assert json.loads(result.stdout)["problems"][0]["found"] == 'release "kimi"'


# --------------------------------------------------------------------------- unverified


def test_validate_warns_per_unverified_field_and_exits_0() -> None:
    result = _cli("validate", "inventories/kimi-2node.yaml", "--json")
    assert result.exit_code == 0, result.output
    warnings = json.loads(result.stdout)["warnings"]
    fields = [w["field"] for w in warnings]
    assert fields == ["model.size_bytes", "image.ref", "flagscale.commit", "vllm.prebuilt", "serve.engine_args.port"]
    port = warnings[-1]
    assert (port["file"], port["pointer"]) == ("flagops/releases/kimi-k2-instruct.yaml", "/serve/engine_args/port")
    assert "9010" in port["reason"]
    # the same warnings on stderr, one line each, in file:line:col form
    lines = [ln for ln in result.stderr.splitlines() if ": warning: " in ln]
    assert len(lines) == 5
    assert lines[-1].startswith(f"flagops/releases/kimi-k2-instruct.yaml:{port['line']}:{port['col']}: "
                                "/serve/engine_args/port: warning: serve.engine_args.port is unverified: ")


def test_an_overridden_unverified_field_is_not_warned_about(tmp_path: Path) -> None:
    def edit(d: dict[str, Any]) -> None:
        d["all"]["vars"]["flagops_release_overrides"] = {"serve": {"engine_args": {"port": 30000}},
                                                         "image": {"ref": "registry.example/kimi:1"}}
    cfg = config.load(_variant(tmp_path, "kimi-2node", edit))
    assert [w.field for w in cfg.warnings] == ["model.size_bytes", "flagscale.commit", "vllm.prebuilt"]


def _catalog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, change: Any) -> None:
    """A private catalog entry: ernie45 changed by ``change(data)``."""
    data = yaml.safe_load((REPO / "flagops/releases/ernie45.yaml").read_text())
    data["name"] = name
    change(data)
    cat = tmp_path / "catalog"
    cat.mkdir(exist_ok=True)
    (cat / f"{name}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    monkeypatch.setenv("FLAGOPS_CATALOG", str(cat))


def test_unverified_must_name_a_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _catalog(tmp_path, monkeypatch, "typo", lambda d: d["unverified"].update({"serve.engine_args.prot": "x"}))
    result = _cli("releases", "show", "typo", "--json")
    (problem,) = _problems(result)
    assert problem["pointer"] == "/unverified/serve.engine_args.prot"
    assert "that the release does not have" in problem["found"]
    # the catalog listing refuses an invalid entry too
    assert _cli("releases").exit_code == 2


def test_other_vendor_needs_no_nvidia_runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _catalog(tmp_path, monkeypatch, "metax", lambda d: d.update(vendor="metax"))
    (problem,) = _problems(_cli("releases", "show", "metax", "--json"))
    assert problem["pointer"] == "/container/gpus" and "vendor metax" in problem["found"]

    def metax(d: dict[str, Any]) -> None:
        d["vendor"] = "metax"
        d["container"].update(gpus="none", devices=["/dev/dri", "/dev/mxcd"], group_add=["video"])
    _catalog(tmp_path, monkeypatch, "metax", metax)
    assert _cli("releases", "show", "metax").exit_code == 0


def test_extra_mounts_are_plain_and_do_not_cover_flagops_mounts(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _catalog(tmp_path, monkeypatch, "mounts", lambda d: d["container"].update(
        mounts=["/opt/hyhal:/opt/hyhal", "/data/../etc:/etc2:ro", "/nfs:/models"]))
    problems = _problems(_cli("releases", "show", "mounts", "--json"))
    assert [(p["pointer"], p["found"]) for p in problems] == [
        ("/container/mounts/1", "\"/data/../etc:/etc2:ro\" (a path with '..')"),
        ("/container/mounts/2", "\"/nfs:/models\" (/models is flagops' own mount)"),
    ]


def test_release_topology_must_match_its_parallel_sizes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _catalog(tmp_path, monkeypatch, "odd", lambda d: d["topology"].update(nodes=4))
    (problem,) = _problems(_cli("releases", "show", "odd", "--json"))
    assert "= 16 but topology 4 nodes x 8 GPUs = 32" in problem["found"]


# --------------------------------------------------------------------------- release x inventory


@pytest.mark.parametrize("release", RELEASES)
def test_each_release_validates_on_its_example(release: str) -> None:
    result = _cli("validate", f"inventories/{EXAMPLES[release]}.yaml", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["release_name"] == release
    assert len(doc["hosts"]) == doc["release"]["topology"]["nodes"]


def test_node_count_mismatch_exits_2(tmp_path: Path) -> None:
    def drop(d: dict[str, Any]) -> None:
        del d["all"]["children"]["workers"]["hosts"]["node4"]
    problems = _problems(_cli("validate", str(_variant(tmp_path, "deepseek-r1-4node", drop)), "--json"))
    found = [p["found"] for p in problems]
    assert "release deepseek-r1 for 4 nodes but the inventory has 3 (node1, node2, node3)" in found
    assert any("= 32 but 24 slots" in f for f in found)  # TP x PP no longer fills the slots
    node = next(p for p in problems if p["pointer"] == "/topology/nodes")
    assert (node["file"], node["line"]) == ("flagops/releases/deepseek-r1.yaml", 10)


def test_tp_pp_mismatch_exits_2(tmp_path: Path) -> None:
    def pp(d: dict[str, Any]) -> None:
        d["all"]["vars"]["flagops_release_overrides"] = {"serve": {"engine_args": {"pipeline_parallel_size": 2}}}
    (problem,) = _problems(_cli("validate", str(_variant(tmp_path, "deepseek-r1-4node", pp)), "--json"))
    assert problem["found"].startswith("tensor_parallel_size 8 x pipeline_parallel_size 2 = 16 but 32 slots")
    assert (problem["file"], problem["pointer"]) == ("flagops/releases/deepseek-r1.yaml",
                                                     "/serve/engine_args/tensor_parallel_size")


def test_missing_infiniband_exits_2(tmp_path: Path) -> None:
    def no_ib(d: dict[str, Any]) -> None:
        del d["all"]["vars"]["flagops_devices"]
    problems = _problems(_cli("validate", str(_variant(tmp_path, "deepseek-r1-4node", no_ib)), "--json"))
    assert [p["found"] for p in problems] == [
        f"node{i} without /dev/infiniband in flagops_devices" for i in (1, 2, 3, 4)]
    # a host that lists the whole directory, or a device inside it, has it
    def some(d: dict[str, Any]) -> None:
        d["all"]["vars"]["flagops_devices"] = ["/dev/infiniband/"]
    assert _cli("validate", str(_variant(tmp_path, "deepseek-r1-4node", some))).exit_code == 0


def test_gpus_per_node_and_shm_mismatch_exit_2(tmp_path: Path) -> None:
    def small(d: dict[str, Any]) -> None:
        d["all"]["vars"]["flagops_slots"] = 4
        d["all"]["vars"]["flagops_shm_size"] = "256g"
        d["all"]["vars"]["flagops_release_overrides"] = {"serve": {"engine_args": {"tensor_parallel_size": 4}}}
    problems = _problems(_cli("validate", str(_variant(tmp_path, "deepseek-r1-4node", small)), "--json"))
    found = sorted({p["found"].split(" on ")[0] for p in problems})
    assert found == ["/dev/shm of 256g", "flagops_slots 4"]


def test_tp_may_span_whole_nodes_only(tmp_path: Path) -> None:
    """Kimi's TP16 over 2 x 8 is one TP group on two whole nodes (FlagScale's example)."""
    assert config.load(REPO / "inventories/kimi-2node.yaml").engine_args()["tensor_parallel_size"] == 16

    def twelve(d: dict[str, Any]) -> None:  # 3 nodes x 8 = 24 = TP12 x PP2: a group ends mid-node
        d["all"]["children"]["workers"]["hosts"]["node3"] = {"ansible_host": "198.51.100.22"}
        d["all"]["vars"]["flagops_release_overrides"] = {
            "topology": {"nodes": 3},
            "serve": {"engine_args_specific": {"vllm": {"tensor_parallel_size": 12, "pipeline_parallel_size": 2}}}}
    problems = _problems(_cli("validate", str(_variant(tmp_path, "kimi-2node", twelve)), "--json"))
    assert {p["found"] for p in problems} == {
        f"tensor_parallel_size 12 > 8 slots on node{i} and not a multiple of 8" for i in (1, 2, 3)}


# --------------------------------------------------------------------------- contract


def test_container_settings_are_release_data() -> None:
    deepseek = render.contract(config.load(REPO / "inventories/deepseek-r1-4node.yaml"))["docker"]
    assert deepseek["devices"] == ["/dev/infiniband"]
    assert (deepseek["shm_size"], deepseek["ipc"], deepseek["network"], deepseek["gpus"]) == (
        "512g", "host", "host", True)
    assert deepseek["ulimits"] == {"memlock": -1} and deepseek["security_opt"] == []
    ernie = render.contract(config.load(REPO / "inventories/a800.yaml"))["docker"]
    assert ernie == {"privileged": True, "gpus": True, "shm_size": "32G", "ipc": "host", "network": "host",
                     "ulimits": {"stack": 67108864, "memlock": -1, "nofile": 1048576}, "devices": [], "mounts": [],
                     "env": {}, "cap_add": [], "security_opt": ["seccomp=unconfined"], "group_add": []}
    # the lab's cpu slots make no NVIDIA runtime request
    assert render.contract(config.load(REPO / "inventories/lab.yaml"))["docker"]["gpus"] is False


def test_single_node_has_no_ssh_trust() -> None:
    one = config.load(REPO / "inventories/qwen3-1node.yaml")
    assert render.contract(one)["ssh_trust"] is False
    assert render.contract(config.load(REPO / "inventories/kimi-2node.yaml"))["ssh_trust"] is True
    files = render.render_files(one)
    serve = yaml.safe_load(files["serve.yaml"])
    assert serve["experiment"]["runner"] == {"hostfile": "examples/qwen3/conf/hostfile.txt", "nnodes": 1,
                                             "nproc_per_node": 8}
    assert "no SSH trust" in files["serve.yaml"].splitlines()[1]
    # the playbook skips the role on that contract value
    play = next(p for p in yaml.safe_load((REPO / "playbooks/provision.yml").read_text())
                if p["roles"][0]["role"] == "ssh_trust")
    assert play["roles"][0]["when"] == "fo_c.ssh_trust | bool"


def test_container_role_takes_every_release_setting() -> None:
    """provision.yml hands each key of contract.docker to roles/container (no setting is
    dropped on the way), and the role's argument spec declares each variable."""
    play = next(p for p in yaml.safe_load((REPO / "playbooks/provision.yml").read_text())
                if p["roles"][0]["role"] == "container")
    role_vars = play["roles"][0]["vars"]
    used = {k for k, v in role_vars.items() if "fo_c.docker." in str(v)}
    keys = {str(v).split("fo_c.docker.")[1].split()[0].split("|")[0].strip("}") for k, v in role_vars.items()
            if k in used and "combine" not in str(v)}
    assert keys | {"env"} == set(render.CONTAINER_DEFAULTS)
    spec = yaml.safe_load((REPO / "roles/container/meta/argument_specs.yml").read_text())
    options = spec["argument_specs"]["main"]["options"]
    assert used <= set(options)


def test_provision_hands_each_release_its_container_settings(tmp_path: Path) -> None:
    """A plain ansible-playbook run templates the container play's role vars of
    playbooks/provision.yml with each release's real extra var: the role gets the release's
    devices, shm, ulimits, ipc/net, security options and env (release env under the per-node
    values), with no per-release code."""
    import os
    import subprocess
    import sys

    from flagops import api

    provision = yaml.safe_load((REPO / "playbooks/provision.yml").read_text())
    role_vars = next(p for p in provision if p["roles"][0]["role"] == "container")["roles"][0]["vars"]
    plays, expected = [], {}
    for release, example in EXAMPLES.items():
        cfg = config.load(REPO / "inventories" / f"{example}.yaml")
        if release == "kimi-k2-instruct":  # a release env reaches the container, the node's values win
            cfg.release["container"]["env"] = {"NCCL_IB_HCA": "mlx5", "VLLM_HOST_IP": "lost"}
        (tmp_path / f"{release}.json").write_text(json.dumps(api.extravars_for(cfg)))
        expected[release] = render.contract(cfg)["docker"]
        plays.append({
            "name": release, "hosts": "localhost", "gather_facts": False, "connection": "local",
            "vars_files": [str(REPO / "playbooks/vars/flagops.yml"), str(tmp_path / f"{release}.json")],
            "vars": {"flagops_nic": "bond0", "preflight_node": {"facts": {"nic_ipv4": "192.0.2.99"}},
                     "got": role_vars},
            "tasks": [{"name": "Write the role vars", "ansible.builtin.copy": {
                "dest": str(tmp_path / f"{release}.out.json"), "content": "{{ got | to_json }}", "mode": "0600"}}],
        })
    (tmp_path / "play.yml").write_text(yaml.safe_dump(plays))
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "ANSIBLE_LOCALHOST_WARNING": "False",
           "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False"}
    res = subprocess.run([str(Path(sys.executable).with_name("ansible-playbook")), str(tmp_path / "play.yml")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for release, docker in expected.items():
        got = json.loads((tmp_path / f"{release}.out.json").read_text())
        assert (got["container_devices"], got["container_shm_size"], got["container_ulimits"]) == (
            docker["devices"], docker["shm_size"], docker["ulimits"]), release
        assert (got["container_ipc_mode"], got["container_network_mode"], got["container_gpus"]) == (
            docker["ipc"], docker["network"], docker["gpus"]), release
        assert (got["container_security_opts"], got["container_cap_add"], got["container_groups"],
                got["container_mounts"], got["container_privileged"]) == (
            docker["security_opt"], docker["cap_add"], docker["group_add"], docker["mounts"], docker["privileged"])
    assert json.loads((tmp_path / "deepseek-r1.out.json").read_text())["container_devices"] == ["/dev/infiniband"]
    assert json.loads((tmp_path / "kimi-k2-instruct.out.json").read_text())["container_env"] == {
        "NCCL_IB_HCA": "mlx5", "VLLM_HOST_IP": "192.0.2.99", "NCCL_SOCKET_IFNAME": "bond0",
        "GLOO_SOCKET_IFNAME": "bond0"}
