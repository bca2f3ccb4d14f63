"""The lab FlagOS image, its vLLM platform plugin, the tiny model and the FlagScale repository.

Real components only: the image is built (or found) with ``ensure_image`` on the local Docker
engine, containers of it run the real vLLM/Ray/FlagScale, the model is built inside it.

    pytest -m lab tests/integration/test_flagos_image.py              # ~1 min with the image cached
    pytest -m "lab and slow" tests/integration/test_flagos_image.py   # + PP=2 across two containers (~3 min)

The slow test does what FlagScale 0.8.0's generated serve script does (``ray start --head
--port=P --num-cpus=1`` on the master, ``ray start --address=M:P --num-cpus=1`` on the worker,
the envs exported first, then ``vllm serve`` on the master) between two containers on a
user-defined network (separate network namespaces and separate 1 GiB /dev/shm), and checks that
pipeline stage 1 really runs on the worker container.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

docker = pytest.importorskip("docker")

from flagops.lab.flagos_image import VENV, ensure_image  # noqa: E402
from flagops.lab.flagscale_repo import ensure_repo  # noqa: E402
from flagops.lab.tiny_model import NAME as MODEL_NAME  # noqa: E402
from flagops.lab.tiny_model import ensure_model, make_manifest, verify_model  # noqa: E402

pytestmark = pytest.mark.lab

ACTIVATE = f"source {VENV}/bin/activate"
MODEL = f"/models/{MODEL_NAME}"
# exported before `ray start` on every node and for `vllm serve` (FlagScale exports its envs the same way)
ENVS = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


def _cache_dir() -> Path:
    if os.environ.get("FLAGOPS_LAB_CACHE"):
        return Path(os.environ["FLAGOPS_LAB_CACHE"])
    from flagops.lab.paths import LabPaths

    return LabPaths.default().cache


@pytest.fixture(scope="module")
def client(lab):
    """The engine `flagops lab up` answers on (it starts one when none runs): never a skip."""
    engine = docker.from_env(timeout=600)
    engine.ping()
    return engine


@pytest.fixture(scope="module")
def image(client) -> str:
    return ensure_image(client, _cache_dir(), print)


@pytest.fixture(scope="module")
def model_dir(client, image, tmp_path_factory) -> Path:
    return ensure_model(client, image, tmp_path_factory.mktemp("published"), print)


def sh(client, image: str, script: str, **kwargs) -> str:
    """Run ``bash -c script`` in a fresh container of ``image`` (no network); returns stdout."""
    kwargs.setdefault("network_mode", "none")
    out = client.containers.run(image, ["bash", "-c", script], remove=True, stderr=True, **kwargs)
    return out.decode()


# ---------------------------------------------------------------------------------------------
# the image


def test_image_is_cached(client, image):
    started = time.monotonic()
    assert ensure_image(client, _cache_dir(), lambda _: None) == image
    assert time.monotonic() - started < 5
    assert image.startswith("flagops-lab/flagos:")


def test_tools_at_the_right_paths(client, image):
    out = sh(
        client,
        image,
        f"{ACTIVATE} && for t in ray vllm flagscale python; do echo $t=$(realpath $(which $t)); done;"
        " echo ssh=$(which ssh) ps=$(which ps) ip=$(which ip) git=$(which git);"
        " vllm --version; flagscale --version; ray --version",
    )
    found = dict(line.split("=", 1) for line in out.splitlines() if "=" in line and " " not in line.split("=")[0])
    # FlagScale's script runs ${ray_path} (expanded on the master) on every node: one fixed path
    assert found["ray"] == f"{VENV}/bin/ray"
    assert found["vllm"] == f"{VENV}/bin/vllm"
    assert found["flagscale"] == f"{VENV}/bin/flagscale"
    assert "ssh=/usr/bin/ssh" in out and "ps=/usr/bin/ps" in out and "git=/usr/bin/git" in out
    assert "0.32.0+cpu" in out  # the vllm CLI works (stock vllm-cpu 0.32.0 dies: PackageNotFoundError)
    assert "flagscale version 0.8.0" in out
    assert "ray, version 2.60.0" in out


def test_broken_packages_absent(client, image):
    out = sh(
        client,
        image,
        f"{ACTIVATE} && python - <<'EOF'\n"
        "import importlib.metadata as md\n"
        "for d in ('torchvision', 'torchaudio', 'torchcodec', 'triton', 'opencv-python-headless'):\n"
        "    try:\n"
        "        print(d, md.version(d))\n"
        "    except md.PackageNotFoundError:\n"
        "        print(d, 'absent')\n"
        "print('torch', md.version('torch'))\n"
        "EOF",
    )
    assert out.count("absent") == 5, out
    assert "torch 2.13.0+cpu" in out


def test_plugin_reports_ray_support(client, image):
    probe = (
        "from vllm.platforms import current_platform as p; print(type(p).__name__, repr(p.ray_device_key), p.is_cpu())"
    )
    out = sh(client, image, f"{ACTIVATE} && python -c '{probe}' 2>/dev/null")
    assert out.strip().splitlines()[-1] == "CpuRayPlatform 'CPU' True"
    out = sh(client, image, f"{ACTIVATE} && VLLM_CPU_RAY=0 python -c '{probe}' 2>/dev/null")
    assert out.strip().splitlines()[-1] == "CpuPlatform '' True"  # stock: no Ray
    custom = sh(client, image, f"{ACTIVATE} && VLLM_CPU_RAY_DEVICE_KEY=vllm_cpu python -c '{probe}' 2>/dev/null")
    assert custom.strip().splitlines()[-1] == "CpuRayPlatform 'vllm_cpu' True"


def test_plugin_patches_apply(client, image):
    """Each patch lands on the vLLM/Ray function it wraps (imported after the plugin is armed)."""
    script = (
        "from vllm.platforms import current_platform\n"
        "import ray.runtime_context as rc\n"
        "from vllm.v1.executor import ray_executor_v2 as ex\n"
        "from vllm.v1.worker import cpu_model_runner as mr\n"
        "from vllm.distributed.device_communicators import cpu_communicator as cc\n"
        "print(getattr(rc.RuntimeContext.get_accelerator_ids, '_cpu_ray', False))\n"
        "print(ex.RayExecutorV2._get_actor_resource_kwargs())\n"
        "print(getattr(mr.CPUModelRunner.initialize_kv_cache, '_cpu_ray', False))\n"
        "print(getattr(cc._CPUSHMDistributed.make_group_name, '_cpu_ray', False))\n"
        "print(getattr(ex.MessageQueue, '_cpu_ray', False))\n"
    )
    out = sh(client, image, f"{ACTIVATE} && VLLM_CPU_RAY_RESPONSE_MQ_MB=2 python - 2>/dev/null <<'EOF'\n{script}EOF")
    assert out.split() == ["True", "{'num_gpus':", "0}", "True", "True", "True"], out


# ---------------------------------------------------------------------------------------------
# the model


def test_model_verifies_against_its_manifest(model_dir):
    assert model_dir.name == MODEL_NAME
    assert verify_model(model_dir) == []
    manifest = json.loads((model_dir / "manifest.json").read_text())
    paths = [f["path"] for f in manifest["files"]]
    shards = [p for p in paths if p.endswith(".safetensors")]
    assert len(shards) >= 3 and "model.safetensors.index.json" in paths
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["Ernie4_5_MoeForCausalLM"]
    assert config["head_dim"] == 32 and config["hidden_size"] % 32 == 0 and config["moe_intermediate_size"] % 32 == 0
    assert config["num_hidden_layers"] % 2 == 0  # two pipeline stages of equal depth
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in index["weight_map"]  # per-expert layout
    assert json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"] == [2, 4]
    assert "chat_template.jinja" in paths and "tokenizer.json" in paths
    total = sum(f["size"] for f in manifest["files"])
    assert 1 << 20 < total < 32 << 20


def test_model_detects_tampering(model_dir, tmp_path):
    copy = tmp_path / MODEL_NAME
    subprocess.run(["cp", "-r", str(model_dir), str(copy)], check=True)
    with (copy / "config.json").open("a") as handle:
        handle.write(" ")
    assert any("config.json" in p for p in verify_model(copy))


def test_model_is_deterministic(client, image, model_dir, tmp_path):
    again = ensure_model(client, image, tmp_path, print)
    assert make_manifest(again) == make_manifest(model_dir)


def test_model_loads_with_transformers_chat_template(client, image, model_dir):
    script = (
        "from transformers import AutoTokenizer\n"
        f"t = AutoTokenizer.from_pretrained('{MODEL}')\n"
        "s = t.apply_chat_template([{'role': 'user', 'content': 'hi'}], tokenize=False, add_generation_prompt=True)\n"
        "print(repr(s)); print(t.unk_token_id, t.bos_token_id, t.eos_token_id, len(t))\n"
    )
    out = sh(
        client,
        image,
        f"{ACTIVATE} && HF_HUB_OFFLINE=1 python - 2>/dev/null <<'EOF'\n{script}EOF",
        volumes={str(model_dir.parent): {"bind": "/models", "mode": "ro"}},
    )
    assert "'<|begin_of_sentence|>User: hi\\nAssistant: '" in out
    assert "0 1 2 1024" in out


# ---------------------------------------------------------------------------------------------
# the FlagScale repository


def test_repo_commit_is_deterministic(tmp_path):
    first = ensure_repo(tmp_path / "a", _cache_dir(), print)
    second = ensure_repo(tmp_path / "b", _cache_dir(), print)
    assert first == second and len(first) == 40
    bare = tmp_path / "a" / "FlagScale.git"
    line3 = subprocess.run(
        ["git", "--git-dir", str(bare), "show", "HEAD:pyproject.toml"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[2]
    assert line3 == 'build-backend = "custom_build_backend.flagscale_build_backend"'
    tree = subprocess.run(
        ["git", "--git-dir", str(bare), "ls-tree", "--name-only", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert {"flagscale", "examples", "tools", "run.py", "setup.py", "version.py"} <= set(tree)
    # third_party/ holds only the vllm gitlink (the submodule the lab serves), as on GitHub
    assert {"third_party", ".gitmodules"} <= set(tree)
    assert ensure_repo(tmp_path / "a", _cache_dir(), print) == first  # refresh: same sha


def test_repo_installs_in_the_image(client, image, tmp_path):
    """The flagscale_source + flagscale_install steps, offline, in the image: what `flagscale serve
    ernie45` then reads is the *installed* examples/ernie45/conf/serve.yaml."""
    sha = ensure_repo(tmp_path, _cache_dir(), print)
    script = (
        f"set -e; {ACTIVATE}; git clone -q /git/FlagScale.git /repos/FlagScale; cd /repos/FlagScale;"
        f" git checkout -q {sha}; sed -i '3s/^/# /' pyproject.toml;"
        " echo 'x: marker' >> examples/ernie45/conf/serve.yaml;"
        " pip install -q . --no-build-isolation --no-deps --no-index 2>&1 | grep -iv warning || true;"
        " flagscale --version; cd /;"
        # the path flagscale/cli.py::serve builds when no yaml argument is given
        " python -c 'import os, flag_scale.flagscale.cli as c; d = os.path.dirname(os.path.abspath("
        'os.path.dirname(c.__file__))); print(os.path.join(d, "examples", "ernie45", "conf", "serve.yaml"))\''
        " | tee /dev/stderr | xargs tail -1"
    )
    out = sh(client, image, script, volumes={str(tmp_path): {"bind": "/git", "mode": "ro"}})
    assert "flagscale version 0.8.0" in out
    assert f"{VENV}/lib/python3.11/site-packages/flag_scale/examples/ernie45/conf/serve.yaml" in out
    assert out.strip().endswith("x: marker")  # edits made before `pip install .` are what it reads


# ---------------------------------------------------------------------------------------------
# PP=2 across two containers (heavy)


def _free_subnet(client) -> ipaddress.IPv4Network:
    used = []
    for net in client.networks.list():
        for cfg in (net.attrs.get("IPAM") or {}).get("Config") or []:
            if cfg.get("Subnet", "").count(".") == 3:
                used.append(ipaddress.ip_network(cfg["Subnet"], strict=False))
    for third in range(200, 250):
        candidate = ipaddress.ip_network(f"172.31.{third}.0/24")
        if not any(candidate.overlaps(u) for u in used):
            return candidate
    pytest.skip("no free 172.31.x.0/24 for the test network")


class Pair:
    """Two containers of the image on their own user-defined network."""

    def __init__(self, client, image: str, model_dir: Path) -> None:
        self.client = client
        self.tag = uuid.uuid4().hex[:8]
        self.subnet = _free_subnet(client)
        hosts = list(self.subnet.hosts())
        self.ips = {"master": str(hosts[10]), "worker": str(hosts[11])}
        pool = docker.types.IPAMPool(subnet=str(self.subnet))
        self.network = client.networks.create(
            f"flagos-pp-{self.tag}", driver="bridge", ipam=docker.types.IPAMConfig(pool_configs=[pool])
        )
        self.containers = {}
        for role, ip in self.ips.items():
            container = client.containers.create(
                image,
                ["sleep", "infinity"],
                name=f"flagos-pp-{role}-{self.tag}",
                hostname=role,
                init=True,  # reap the processes `ray stop` and vLLM leave behind
                shm_size="1g",
                environment={**ENVS, "VLLM_HOST_IP": ip},
                volumes={str(model_dir.parent): {"bind": "/models", "mode": "ro"}},
                network=self.network.name,
            )
            self.network.disconnect(container)
            self.network.connect(container, ipv4_address=ip)
            container.start()
            self.containers[role] = container

    def sh(self, role: str, script: str, timeout: int = 300) -> str:
        done = subprocess.run(
            ["docker", "exec", self.containers[role].name, "bash", "-c", f"{ACTIVATE} && {script}"],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise AssertionError(
                f"{role}: {script!r} exited {done.returncode}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
            )
        return done.stdout

    def close(self) -> None:
        for container in self.containers.values():
            container.remove(force=True)
        self.network.remove()


def _serve(pair: Pair, extra: str, port: int = 30000) -> float:
    """Start `vllm serve` on the master; returns seconds until /health answers 200."""
    pair.sh(
        "master",
        f"nohup vllm serve {MODEL} --enforce-eager --dtype float32 --max-model-len 512 --port {port} {extra}"
        " > /tmp/serve.log 2>&1 &",
    )
    started = time.monotonic()
    while time.monotonic() - started < 300:
        try:
            health = f"import urllib.request as u; u.urlopen('http://127.0.0.1:{port}/health', timeout=2)"
            pair.sh("master", f'python -c "{health}"', timeout=30)
            return time.monotonic() - started
        except AssertionError:
            time.sleep(2)
    raise AssertionError("no /health 200 within 300 s:\n" + pair.sh("master", "tail -50 /tmp/serve.log"))


PROBE = r"""
import json, urllib.request
B = "http://127.0.0.1:30000"
M = "@MODEL@"
def post(path, body):
    req = urllib.request.Request(B + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.read().decode()
out = {"models": [m["id"] for m in json.load(urllib.request.urlopen(B + "/v1/models"))["data"]]}
chat = json.loads(post("/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": "Hello"}],
                  "max_tokens": 16, "temperature": 0, "ignore_eos": True}))
out["chat"] = [chat["object"], chat["usage"]["completion_tokens"]]
stream = post("/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
              "temperature": 0, "stream": True, "ignore_eos": True})
out["stream"] = [l for l in stream.splitlines() if l.startswith("data: ")][-1]
out["ids"] = [json.loads(post("/v1/completions", {"model": M, "prompt": p, "max_tokens": 16, "temperature": 0,
              "ignore_eos": True, "return_token_ids": True}))["choices"][0]["token_ids"]
              for p in ["The quick brown fox", "def main():\n    return", "import os\nimport sys\n"]]
print(json.dumps(out))
""".replace("@MODEL@", MODEL)


@pytest.mark.slow
def test_pp2_spans_two_containers(client, image, model_dir):
    pair = Pair(client, image, model_dir)
    try:
        master, worker = pair.ips["master"], pair.ips["worker"]
        port = 6379
        # what FlagScale 0.8.0's host_0_localhost_run.sh does for `type=cpu slots=1` nodes
        pair.sh("master", f"ray start --head --port={port} --num-cpus=1")
        pair.sh("worker", f"ray start --address={master}:{port} --num-cpus=1")
        health_pp2 = _serve(pair, "--pipeline-parallel-size 2 --distributed-executor-backend ray")
        pp2 = json.loads(pair.sh("master", f"python - <<'EOF'\n{PROBE}EOF").splitlines()[-1])
        nodes = {n["node_id"]: n["node_ip"] for n in json.loads(pair.sh("master", "ray list nodes --format json"))}
        actors = json.loads(pair.sh("master", "ray list actors --filter class_name=RayWorkerProc --format json"))
        placed = {a["name"].rsplit("_", 1)[-1]: nodes[a["node_id"]] for a in actors if a["state"] == "ALIVE"}
        log = pair.sh("master", "cat /tmp/serve.log")
        pair.sh("master", "pkill -TERM -f '[v]llm serve' ; sleep 5")
        health_pp1 = _serve(pair, "")  # the reference: one process group on the master, no Ray
        pp1 = json.loads(pair.sh("master", f"python - <<'EOF'\n{PROBE}EOF").splitlines()[-1])
        pair.sh("master", "pkill -TERM -f '[v]llm serve' ; sleep 3; ray stop")
        pair.sh("worker", "ray stop")
    finally:
        pair.close()
    print(json.dumps({"health_pp2_s": round(health_pp2, 1), "health_pp1_s": round(health_pp1, 1), "placed": placed}))
    assert placed == {"PP0": master, "PP1": worker}
    assert f"ip={worker}" in log and "CPU SHM communicator disabled for group pp:0" in log
    assert pp2["models"] == [MODEL]
    assert pp2["chat"] == ["chat.completion", 16]
    assert pp2["stream"] == "data: [DONE]"
    assert pp2["ids"] == pp1["ids"] and all(len(ids) == 16 for ids in pp2["ids"])
