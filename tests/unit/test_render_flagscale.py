"""Rendered files, read back by FlagScale 0.8.0's own code, hold the runbook's values.

The flag-scale 0.8.0 wheel is fetched with `pip download` into a cache dir (not
committed) and installed `--no-deps` together with what parse_hostfile and the Hydra
compose import. FLAGOPS_FLAGSCALE_WHEEL points at a local wheel instead;
FLAGOPS_TEST_CACHE moves the cache (default: <repo>/.cache/flagscale-0.8.0).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from flagops import config, render

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("flagscale_probe.py")
# What flagscale/runner/utils.py (parse_hostfile), runner_serve.py (the run script
# generator) and the Hydra compose import.
FLAGSCALE_RUNTIME = ["hydra-core>=1.3,<1.4", "omegaconf>=2.3,<2.4", "aiohttp", "numpy", "tqdm", "psutil"]

# The runbook, transcribed by hand (examples/ernie45/conf/* after its vim edits).
RUNBOOK_SERVE_ENTRY = {
    "serve_id": "vllm_model",
    "engine": "vllm",
    "engine_args": {
        "model": "/models/ERNIE-4.5-300B-A47B-PT",
        "host": "0.0.0.0",
        "max_model_len": 128000,
        "max_num_seqs": 256,
        "uvicorn_log_level": "warning",
        "port": 30000,
    },
    "engine_args_specific": {
        "vllm": {
            "tensor_parallel_size": 8,
            "pipeline_parallel_size": 2,
            "gpu_memory_utilization": 0.98,
            "trust_remote_code": True,
            "enforce_eager": True,
            "enable_chunked_prefill": True,
        }
    },
    "profile": {"prefix_len": 0, "input_len": 1024, "output_len": 1024, "num_prompts": 128, "range_ratio": 1},
}
RUNBOOK_EXPERIMENT = {
    "exp_name": "ernie45_300b",
    "exp_dir": "outputs/ernie45_300b",
    "task": {"type": "serve"},
    "runner": {
        "hostfile": "examples/ernie45/conf/hostfile.txt",
        "nnodes": 2,
        "nproc_per_node": 8,
        "docker": "flagos",
        "ssh_port": 22,
    },
    "deploy": {"use_fs_serve": False},
    "envs": {
        "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
        "CUDA_DEVICE_MAX_CONNECTIONS": 1,
        "USE_FLAGGEMS": True,
        "RAY_CGRAPH_get_timeout": 60,
    },
    "cmds": {"before_start": "source /root/miniconda3/bin/activate flagscale-inference"},
}


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
                   check=True)


@pytest.fixture(scope="session")
def flagscale_site() -> Path:
    cache = Path(os.environ.get("FLAGOPS_TEST_CACHE") or REPO / ".cache" / "flagscale-0.8.0")
    site = cache / "site"
    marker = site / ".flagops-ready"
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("a") as lock:  # pytest-xdist workers build it once, one at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        _build_site(cache, site, marker)
    return site


def _build_site(cache: Path, site: Path, marker: Path) -> None:
    ready = "ok " + " ".join(FLAGSCALE_RUNTIME) + "\n"  # a new runtime list rebuilds the cache
    if not marker.exists() or marker.read_text() != ready:
        shutil.rmtree(site, ignore_errors=True)
        wheel_env = os.environ.get("FLAGOPS_FLAGSCALE_WHEEL")
        if wheel_env:
            wheel = Path(wheel_env)
        else:
            dl = cache / "dl"
            _pip("download", "--no-deps", "--only-binary=:all:", "-d", str(dl), "flag-scale==0.8.0")
            wheel = next(dl.glob("flag_scale-0.8.0-*.whl"))
        _pip("install", "--no-deps", "--target", str(site), str(wheel))
        _pip("install", "--target", str(site), *FLAGSCALE_RUNTIME)
        marker.write_text(ready)


def _flagscale_read(site: Path, root: Path, **conf_dirs: Path) -> dict[str, Any]:
    """Run the probe with CWD = a FlagScale root, as `flagscale serve` runs."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(site / "flag_scale")]))
    args = [a for name, d in conf_dirs.items() for a in (name, str(d))]
    out = subprocess.run([sys.executable, str(PROBE), *args], cwd=root, env=env,
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def a800_read(flagscale_site: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    cfg = config.load(REPO / "inventories" / "a800.yaml")
    root = tmp_path_factory.mktemp("FlagScale")
    conf = root / render.conf_dir(cfg)
    render.write(cfg, conf)
    # FlagScale's own, unedited example for the same release, for a shape diff.
    shipped = root / "shipped"
    shutil.copytree(flagscale_site / "flag_scale" / "examples" / "ernie45" / "conf", shipped)
    return _flagscale_read(flagscale_site, root, ours=conf, shipped=shipped) | {"root": str(root)}


def test_hostfile_master_first(a800_read: dict[str, Any]) -> None:
    ours = a800_read["ours"]
    assert ours["hostfile_path"] == os.path.join(a800_read["root"], "examples/ernie45/conf/hostfile.txt")
    assert ours["hosts"] == [
        ["192.0.2.10", {"slots": 8, "type": "gpu"}],
        ["192.0.2.11", {"slots": 8, "type": "gpu"}],
    ]


def test_serve_yaml_matches_runbook(a800_read: dict[str, Any]) -> None:
    cfg = a800_read["ours"]["config"]
    assert cfg["experiment"] == RUNBOOK_EXPERIMENT
    assert cfg["action"] == "run"
    assert a800_read["ours"]["hydra_run_dir"] == "outputs/ernie45_300b/hydra"
    assert set(cfg) == {"experiment", "action", "serve"}


def test_serve_entry_matches_runbook(a800_read: dict[str, Any]) -> None:
    assert a800_read["ours"]["config"]["serve"] == [RUNBOOK_SERVE_ENTRY]


def test_vllm_command_and_exports(a800_read: dict[str, Any]) -> None:
    ours = a800_read["ours"]
    assert ours["vllm_command"] == [
        "vllm", "serve", "/models/ERNIE-4.5-300B-A47B-PT",
        "--tensor-parallel-size", "8", "--pipeline-parallel-size", "2",
        "--gpu-memory-utilization", "0.98", "--trust-remote-code", "--enforce-eager",
        "--enable-chunked-prefill", "--host", "0.0.0.0", "--max-model-len", "128000",
        "--max-num-seqs", "256", "--uvicorn-log-level", "warning", "--port", "30000",
    ]
    assert ours["exports"] == (
        "export CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 && export CUDA_DEVICE_MAX_CONNECTIONS=1"
        " && export USE_FLAGGEMS=True && export RAY_CGRAPH_get_timeout=60"
    )
    # Why config.py rejects `false` engine args: FlagScale drops them.
    assert ours["false_flag"] == ["--no-enable-prefix-caching"]


def test_same_shape_as_flagscale_example(a800_read: dict[str, Any]) -> None:
    """Against FlagScale's shipped ernie45 conf, only the runbook's edits differ."""

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, dict):
            return {k: v for key, val in d.items() for k, v in flat(val, f"{prefix}/{key}").items()}
        if isinstance(d, list):
            return {k: v for i, val in enumerate(d) for k, v in flat(val, f"{prefix}/{i}").items()}
        return {prefix: d}

    ours, shipped = flat(a800_read["ours"]["config"]), flat(a800_read["shipped"]["config"])
    assert set(ours) == set(shipped)
    diff = {k: (shipped[k], ours[k]) for k in ours if ours[k] != shipped[k]}
    assert diff == {
        "/experiment/runner/docker": ("fs_ernie", "flagos"),
        "/experiment/envs/USE_FLAGGEMS": (False, True),
        "/serve/0/engine_args/model": ("PaddlePaddle/ERNIE-4.5-300B-A47B-PT", "/models/ERNIE-4.5-300B-A47B-PT"),
    }


def test_cpu_lab_shape(flagscale_site: Path, tmp_path: Path) -> None:
    """A cpu-slot, TP=1 x PP=2 inventory (the lab's shape) renders what FlagScale parses."""
    inv = tmp_path / "lab.yaml"
    inv.write_text(
        "all:\n"
        "  vars:\n"
        "    flagops_release: ernie45\n"
        "    flagops_share_root: /srv/share\n"
        "    flagops_container_name: flagops-node\n"
        "    flagops_slot_type: cpu\n"
        "    flagops_slots: 1\n"
        "    flagops_release_overrides:\n"
        "      runner:\n"
        "        before_start: source /opt/venvs/flagscale-inference/bin/activate\n"
        "        envs: {CUDA_VISIBLE_DEVICES: null, VLLM_CPU_KVCACHE_SPACE: 1}\n"
        "      serve:\n"
        "        engine_args_specific: {vllm: {tensor_parallel_size: 1, dtype: float32}}\n"
        "  children:\n"
        "    master: {hosts: {node1: {ansible_host: 172.30.0.11}}}\n"
        "    workers: {hosts: {node2: {ansible_host: 172.30.0.12, ansible_port: 2222}}}\n"
    )
    cfg = config.load(inv)
    root = tmp_path / "FlagScale"
    render.write(cfg, root / render.conf_dir(cfg))
    got = _flagscale_read(flagscale_site, root, lab=root / render.conf_dir(cfg))["lab"]
    assert got["hosts"] == [["172.30.0.11", {"slots": 1, "type": "cpu"}],
                            ["172.30.0.12", {"slots": 1, "type": "cpu"}]]
    runner = got["config"]["experiment"]["runner"]
    assert (runner["docker"], runner["ssh_port"], runner["nnodes"], runner["nproc_per_node"]) == (
        "flagops-node", 2222, 2, 1)
    assert got["config"]["experiment"]["envs"] == {
        "CUDA_DEVICE_MAX_CONNECTIONS": 1, "USE_FLAGGEMS": True, "RAY_CGRAPH_get_timeout": 60,
        "VLLM_CPU_KVCACHE_SPACE": 1}
    assert got["config"]["experiment"]["cmds"]["before_start"] == (
        "source /opt/venvs/flagscale-inference/bin/activate")
    assert "--tensor-parallel-size" in got["vllm_command"]
    i = got["vllm_command"].index("--tensor-parallel-size")
    assert got["vllm_command"][i + 1] == "1"
    assert got["vllm_command"][got["vllm_command"].index("--dtype") + 1] == "float32"


def test_render_cli_writes_three_files(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from flagops.cli import main

    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["render", "ernie45", "-i", str(REPO / "inventories/a800.yaml"),
                                       "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    files = sorted(Path(p).relative_to(out).as_posix() for p in json.loads(result.stdout)["files"])
    assert files == ["hostfile.txt", "serve.yaml", "serve/300b.yaml"]
    assert (out / "hostfile.txt").read_text().splitlines()[-1] == "192.0.2.11 slots=8 type=gpu"


SHIPPED = sorted((REPO / "inventories").glob("*.yaml"))


def _ssh_lines(script: str) -> list[str]:
    return [ln for ln in script.splitlines() if ln.lstrip().startswith("ssh ")]


@pytest.mark.parametrize("inventory", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_inventory_validates_and_flagscale_reads_it(
    inventory: Path, flagscale_site: Path, tmp_path: Path
) -> None:
    """Every release x its example inventory (and the lab's): validate passes, render writes
    the three files, and FlagScale 0.8.0's own parse_hostfile, Hydra compose and run-script
    generator read them: every host in the hostfile, every worker reached by one
    `ssh ... docker exec <container> ... ray start --address=<master>` line, a one-node
    release with no ssh line at all."""
    cfg = config.load(inventory)
    root = tmp_path / "FlagScale"
    conf = root / render.conf_dir(cfg)
    written = render.write(cfg, conf)
    variant = cfg.release["flagscale"]["variant"]
    assert sorted(p.relative_to(conf).as_posix() for p in written) == sorted(
        ["hostfile.txt", "serve.yaml", f"serve/{variant}.yaml"])
    got = _flagscale_read(flagscale_site, root, inv=conf)["inv"]
    assert [h for h, _ in got["hosts"]] == [h.address for h in cfg.hosts]
    assert [info["slots"] for _, info in got["hosts"]] == [h.slots for h in cfg.hosts]
    assert {info["type"] for _, info in got["hosts"]} == {cfg.slot_type}
    runner = got["config"]["experiment"]["runner"]
    assert runner["nnodes"] == len(cfg.hosts)
    tp, pp = config.tp_pp(cfg.release)
    command = got["vllm_command"]
    assert command[2] == f"/models/{cfg.release['model']['name']}"
    assert command[command.index("--tensor-parallel-size") + 1] == str(tp)
    assert ("--pipeline-parallel-size" not in command and pp == 1) or (
        command[command.index("--pipeline-parallel-size") + 1] == str(pp))
    assert tp * pp == cfg.total_slots
    script = got["run_script"]
    resource = "gpus" if cfg.slot_type == "gpu" else "cpus"
    head = [ln for ln in script.splitlines() if "ray_path} start --head" in ln]
    assert len(head) == 1 and f"--num-{resource}={cfg.master.slots}" in head[0]
    ssh = _ssh_lines(script)
    if not cfg.workers:
        assert "docker" not in runner and "ssh_port" not in runner
        assert ssh == [], ssh
        return
    assert (runner["docker"], runner["ssh_port"]) == (cfg.container_name, cfg.ssh_port)
    for worker in cfg.workers:
        starts = [ln for ln in ssh if f" {worker.address} " in ln and "start --address=" in ln]
        assert len(starts) == 1, (worker, ssh)
        assert starts[0].startswith(f"ssh -n -p {cfg.ssh_port} {worker.address} ")
        assert f"docker exec {cfg.container_name} " in starts[0]
        assert f"start --address={cfg.master.address}:" in starts[0]
        assert f"--num-{resource}={worker.slots}" in starts[0]
    # one ray stop and one ray start per worker, nothing else over ssh
    assert len(ssh) == 2 * len(cfg.workers)


def test_every_release_has_an_example_inventory() -> None:
    """The catalog and inventories/ stay in step: each release ships a validating example."""
    from flagops.loader import load_doc

    examples: dict[str, list[str]] = {}
    for inv in SHIPPED:
        doc, _ = load_doc(inv, inv.name)
        name = ((doc.data or {}).get("all", {}).get("vars") or {}).get("flagops_release")
        examples.setdefault(str(name), []).append(inv.stem)
    assert set(config.list_releases()) <= set(examples), examples
    for name in config.list_releases():
        topo = config.load_release(name).data["topology"]
        sizes = {len(config.load(REPO / "inventories" / f"{stem}.yaml").hosts) for stem in examples[name]}
        assert topo["nodes"] in sizes, (name, sizes)
