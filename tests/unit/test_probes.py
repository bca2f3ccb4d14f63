"""The GPU probes, run as the container runs them: ``python3 probe.py`` in a subprocess.

On this CPU-only host they must report skip (with the reason) or, where a fake
package or a fake nvidia-smi stands in, pass/fail, always as one JSON document
on stdout and exit code 0. Where torch is installed, ops_consistency's
--self-test exercises the comparison harness on CPU.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PROBES = Path(__file__).resolve().parents[2] / "flagops" / "verify" / "probes"
PY = sys.executable


def _has(module):
    return subprocess.run([PY, "-c", "import " + module], capture_output=True).returncode == 0


HAS_TORCH = _has("torch")
HAS_FLAG_GEMS = _has("flag_gems")


def run_probe(name, *args, env=None, timeout=240):
    full_env = dict(os.environ)
    full_env.pop("USE_FLAGGEMS", None)
    full_env.update(env or {})
    proc = subprocess.run([PY, str(PROBES / (name + ".py")), *args], capture_output=True,
                          text=True, env=full_env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, f"stdout must hold exactly one JSON document: {proc.stdout[:500]!r}"
    doc = json.loads(lines[0])
    assert set(doc) == {"probe", "status", "reason", "values", "items"}
    assert doc["probe"] == name
    assert doc["status"] in ("pass", "fail", "skip")
    assert isinstance(doc["reason"], str) and doc["reason"]
    assert isinstance(doc["values"], dict) and isinstance(doc["items"], list)
    for it in doc["items"]:
        assert set(it) == {"name", "status", "reason", "values"}, it
        assert it["status"] in ("pass", "fail", "skip", "timeout")
    return doc


def items(doc, name):
    return [i for i in doc["items"] if i["name"] == name]


def test_probe_files_are_standalone():
    for name in ("gpu_info", "flaggems_env", "ops_consistency", "nccl_allreduce"):
        text = (PROBES / (name + ".py")).read_text()
        assert "import flagops" not in text and "from flagops" not in text, name


# ----------------------------------------------------------------------------- gpu_info
def fake_smi(tmp_path, body):
    exe = tmp_path / "nvidia-smi"
    exe.write_text("#!/bin/sh\n" + body)
    exe.chmod(0o755)
    return str(exe)


def test_gpu_info_skips_without_nvidia_smi(tmp_path):
    doc = run_probe("gpu_info", "--nvidia-smi", str(tmp_path / "nope" / "nvidia-smi"))
    assert doc["status"] == "skip"
    assert "nvidia-smi not found" in doc["reason"]


def test_gpu_info_parses_two_gpus(tmp_path):
    smi = fake_smi(tmp_path, textwrap.dedent("""\
        echo "0, NVIDIA H100 80GB HBM3, GPU-a, 580.159.04, 81559, 0, Enabled, 0"
        echo "1, NVIDIA H100 80GB HBM3, GPU-b, 580.159.04, 81559, 3, Enabled, 0"
        """))
    doc = run_probe("gpu_info", "--nvidia-smi", smi, "--expect-gpus", "2")
    assert doc["status"] == "pass", doc["reason"]
    assert doc["values"]["gpu_count"] == 2
    assert doc["values"]["driver_version"] == "580.159.04"
    assert doc["values"]["names"] == ["NVIDIA H100 80GB HBM3"]
    assert doc["values"]["memory_total_mib"] == [81559, 81559]


def test_gpu_info_fails_on_ecc_errors_and_count(tmp_path):
    smi = fake_smi(tmp_path, 'echo "0, NVIDIA H100 80GB HBM3, GPU-a, 580.159.04, 81559, 0, Enabled, 2"\n')
    doc = run_probe("gpu_info", "--nvidia-smi", smi, "--expect-gpus", "4")
    assert doc["status"] == "fail"
    assert "2 uncorrected volatile ECC errors" in doc["reason"]
    assert "1 GPUs, expected 4" in doc["reason"]
    assert items(doc, "gpu0")[0]["status"] == "fail"
    assert doc["values"]["ecc_uncorrected_volatile_total"] == 2


def test_gpu_info_na_ecc_is_not_an_error(tmp_path):
    smi = fake_smi(tmp_path, 'echo "0, NVIDIA A10, GPU-a, 580.1, 23028, 1, [N/A], [N/A]"\n')
    doc = run_probe("gpu_info", "--nvidia-smi", smi)
    assert doc["status"] == "pass", doc["reason"]
    assert "not available" in items(doc, "gpu0")[0]["reason"]


def test_gpu_info_no_devices_is_skip(tmp_path):
    smi = fake_smi(tmp_path, 'echo "No devices were found"; exit 6\n')
    doc = run_probe("gpu_info", "--nvidia-smi", smi)
    assert doc["status"] == "skip"
    assert "no GPUs" in doc["reason"]


def test_gpu_info_driver_failure_is_fail(tmp_path):
    smi = fake_smi(tmp_path, "echo \"NVIDIA-SMI has failed because it couldn't communicate with the "
                             "NVIDIA driver\" >&2; exit 9\n")
    doc = run_probe("gpu_info", "--nvidia-smi", smi)
    assert doc["status"] == "fail"
    assert "exited 9" in doc["reason"]


# ----------------------------------------------------------------------------- flaggems_env
def fake_packages(tmp_path, flag_gems_src):
    """A directory holding a fake flag_gems (and a stub torch if torch is absent)."""
    root = tmp_path / "site"
    (root / "flag_gems").mkdir(parents=True)
    (root / "flag_gems" / "__init__.py").write_text(textwrap.dedent(flag_gems_src))
    if not HAS_TORCH:
        (root / "torch").mkdir()
        (root / "torch" / "__init__.py").write_text("__version__ = '0.stub'\n")
    return {"PYTHONPATH": str(root)}


@pytest.mark.skipif(HAS_TORCH, reason="torch is installed here")
def test_flaggems_env_skips_without_torch():
    doc = run_probe("flaggems_env")
    assert doc["status"] == "skip"
    assert doc["reason"] == "torch not importable"


@pytest.mark.skipif(not HAS_TORCH or HAS_FLAG_GEMS, reason="needs torch without flag_gems")
def test_flaggems_env_fails_when_flag_gems_missing():
    doc = run_probe("flaggems_env", "--no-oplog", env={"USE_FLAGGEMS": "1"})
    assert doc["status"] == "fail"
    assert "flag_gems not importable: ModuleNotFoundError" in doc["reason"]
    assert items(doc, "import")[0]["status"] == "fail"
    assert items(doc, "enable_signature")[0]["status"] == "skip"


def test_flaggems_env_cpu_only_is_skip(tmp_path):
    env = fake_packages(tmp_path, """\
        raise RuntimeError("No device were detected on your machine !")
        """)
    doc = run_probe("flaggems_env", env=env)
    assert doc["status"] == "skip"
    assert "No device were detected" in doc["reason"]
    assert items(doc, "import")[0]["status"] == "skip"


NEW_ENABLE = """\
    __version__ = "5.0.2"
    print("chatter from import")  # must not reach stdout
    def enable(lib=None, unused=None, registrar=None, record=False, once=False, path=None):
        pass
    """
OLD_ENABLE = """\
    __version__ = "2.2"
    def enable(lib=None, unused=None, registrar=None, record=False, once=False, path=None,
               forward_only=False):
        pass
    """


FLAGSCALE_080_RUNNER = """\
    import os
    if os.environ.get("USE_FLAGGEMS", "0").lower() in ("1", "true", "yes"):
        try:
            import flag_gems
            flag_gems.enable(record=True, unused=["exponential_", "softmax"],
                             path="/tmp/gems_oplist.log.txt", forward_only=True)
        except Exception:
            print("Failed to enable 'flag_gems'. Falling back")
    """
FLAGSCALE_MAIN_RUNNER = FLAGSCALE_080_RUNNER.replace(", forward_only=True", "")


def fake_vllm(env, root, runner_src):
    """A vllm package whose worker makes FlagScale's flag_gems.enable call."""
    site = Path(env["PYTHONPATH"])
    worker = site / "vllm" / "v1" / "worker"
    worker.mkdir(parents=True)
    (site / "vllm" / "__init__.py").write_text("")
    (worker / "gpu_model_runner.py").write_text(textwrap.dedent(runner_src))
    return str(worker / "gpu_model_runner.py")


def test_flaggems_env_fails_when_the_workers_call_passes_forward_only(tmp_path):
    env = fake_packages(tmp_path, NEW_ENABLE)
    runner = fake_vllm(env, tmp_path, FLAGSCALE_080_RUNNER)
    env["USE_FLAGGEMS"] = "1"
    doc = run_probe("flaggems_env", "--no-oplog", "--expect-version", "5.0.2", env=env)
    assert doc["status"] == "fail"
    sig = items(doc, "enable_signature")[0]
    assert sig["status"] == "fail"
    assert "forward_only" in sig["reason"] and "native torch" in sig["reason"]
    assert sig["values"]["caller"] == runner + ":5"
    assert doc["values"] == {"flag_gems_version": "5.0.2", "forward_only": False}
    assert items(doc, "version")[0]["status"] == "pass"


def test_flaggems_env_passes_flaggems_5_when_the_worker_does_not_pass_forward_only(tmp_path):
    """flag_gems 5.0.2 with FlagScale's current patch (no forward_only): a pass."""
    env = fake_packages(tmp_path, NEW_ENABLE)
    runner = fake_vllm(env, tmp_path, FLAGSCALE_MAIN_RUNNER)
    doc = run_probe("flaggems_env", "--no-oplog", env=dict(env, USE_FLAGGEMS="1"))
    sig = items(doc, "enable_signature")[0]
    assert sig["status"] == "pass", sig["reason"]
    assert sig["values"]["caller"] == runner + ":5" and "forward_only" not in sig["values"]["caller_keywords"]
    assert doc["status"] == "pass"


def test_flaggems_env_without_a_vllm_binds_the_base_call(tmp_path):
    """A bare GPU host (no vLLM): enable(record, unused, path) is bound; the reason says
    that forward_only is missing and what that means for a FlagScale 0.8.0 worker."""
    env = fake_packages(tmp_path, NEW_ENABLE)
    doc = run_probe("flaggems_env", "--no-oplog", env=dict(env, USE_FLAGGEMS="1"))
    sig = items(doc, "enable_signature")[0]
    assert sig["status"] == "pass" and sig["values"]["caller"] is None
    assert "no forward_only" in sig["reason"] and "FlagScale 0.8.0" in sig["reason"]
    assert doc["values"]["forward_only"] is False
    broken = fake_packages(tmp_path / "b", NEW_ENABLE.replace("record=False, ", ""))
    doc = run_probe("flaggems_env", "--no-oplog", env=dict(broken, USE_FLAGGEMS="1"))
    assert items(doc, "enable_signature")[0]["status"] == "fail"


def test_flaggems_env_passes_with_forward_only_env_and_oplog(tmp_path):
    env = fake_packages(tmp_path, OLD_ENABLE)
    env["USE_FLAGGEMS"] = "true"
    log = tmp_path / "gems_oplist.log.txt"
    log.write_text("[DEBUG] flag_gems.ops.mm: GEMS MM\n[DEBUG] flag_gems.ops.softmax: GEMS SOFTMAX\n")
    raylet = subprocess.Popen(["sleep", "60"], env={"USE_FLAGGEMS": "1", "PATH": os.environ["PATH"]})
    try:
        doc = run_probe("flaggems_env", "--oplog", str(log), "--raylet-pid", str(raylet.pid), env=env)
    finally:
        raylet.kill()
        raylet.wait()
    assert doc["status"] == "pass", doc["reason"]
    assert doc["values"]["forward_only"] is True
    assert items(doc, "env_raylet")[0]["status"] == "pass"
    assert items(doc, "oplog")[0]["values"]["distinct_ops"] == 2


def test_flaggems_env_fails_on_missing_env_raylet_and_oplog(tmp_path):
    env = fake_packages(tmp_path, OLD_ENABLE)
    raylet = subprocess.Popen(["sleep", "60"], env={"PATH": os.environ["PATH"]})
    try:
        doc = run_probe("flaggems_env", "--oplog", str(tmp_path / "absent.log"),
                        "--raylet-pid", str(raylet.pid), env=env)
    finally:
        raylet.kill()
        raylet.wait()
    assert doc["status"] == "fail"
    assert {i["name"] for i in doc["items"] if i["status"] == "fail"} == {
        "env_process", "env_raylet", "oplog"}
    empty = tmp_path / "empty.log"
    empty.write_text("")
    doc = run_probe("flaggems_env", "--oplog", str(empty), env=dict(env, USE_FLAGGEMS="1"))
    assert items(doc, "oplog")[0]["status"] == "fail"


# ----------------------------------------------------------------------------- nccl_allreduce
def test_nccl_allreduce_skips_on_cpu_host_and_forces_nvls_off():
    doc = run_probe("nccl_allreduce", env={"NCCL_NVLS_ENABLE": "1"})
    assert doc["status"] == "skip"
    assert doc["values"]["env"]["NCCL_NVLS_ENABLE"] == "0"
    if HAS_TORCH:
        assert doc["reason"] == "no CUDA GPU visible to torch"
    else:
        assert doc["reason"].startswith("torch not importable")


# ----------------------------------------------------------------------------- ops_consistency
def test_ops_consistency_skips_on_cpu_host():
    doc = run_probe("ops_consistency")
    assert doc["status"] == "skip"
    if HAS_TORCH:
        assert doc["reason"] == "no CUDA GPU visible to torch"
    else:
        assert doc["reason"].startswith("torch not importable")


needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch not importable")


def test_ops_consistency_default_set_is_ernie_tp8():
    """The default set: the ops ERNIE-4.5-300B-A47B runs per GPU at TP8, at its shapes,
    listed without torch (the coordinator never needs it to plan)."""
    doc = run_probe("ops_consistency", "--list")
    names = [i["name"] for i in doc["items"]]
    assert {i["name"].split("[")[0] for i in doc["items"]} == {
        "linear", "rms_norm", "fused_add_rms_norm", "silu_and_mul", "embedding", "softmax", "sort",
        "topk", "topk_softmax", "moe_align_block_size", "fused_experts", "moe_sum"}
    assert all(i["values"]["default"] for i in doc["items"])
    # per-rank shapes: qkv 8192->(8+1+1)*128, o_proj 1024->8192, lm_head 8192->103424/8
    assert {"linear[bfloat16,qkv-256x8192x1280]", "linear[bfloat16,o_proj-256x1024x8192]",
            "linear[bfloat16,lm_head-256x8192x12928]", "embedding[bfloat16,vocab-shard-12928x8192]",
            "fused_experts[bfloat16,256x8192-64e-k8-n448-silu]", "rms_norm[bfloat16,weight-256x8192]",
            "topk_softmax[float32,router-256x64-k8-renorm]", "softmax[float32,vocab-256x103424]"} <= set(names)
    # one dtype per op: no bf16/fp16/fp32 sweep in the default set
    assert len({n.split("[")[0] + n.split(",", 1)[-1] for n in names}) == len(names)
    # heaviest first in the queue
    assert names[0].startswith("topk[") and names.index("moe_sum[bfloat16,256x8x8192]") == len(names) - 1
    assert doc["values"]["case_set"] == "default" and doc["values"]["cases"] == len(names)


def test_ops_consistency_all_keeps_the_full_sweep():
    doc = run_probe("ops_consistency", "--list", "--all")
    ops = {i["name"].split("[")[0] for i in doc["items"]}
    assert ops >= {"mm", "bmm", "addmm", "softmax", "silu", "gelu", "rms_norm", "layer_norm",
                   "embedding", "topk", "sort", "cumsum", "topk_softmax", "grouped_topk",
                   "moe_align_block_size", "fused_experts"}
    names = {i["name"] for i in doc["items"]}
    assert {"rms_norm[bfloat16,weight]", "rms_norm[bfloat16,no-weight]", "mm[float32]"} <= names
    default = run_probe("ops_consistency", "--list")
    assert {i["name"] for i in default["items"]} < names and len(names) == 61 + len(default["items"])
    only = run_probe("ops_consistency", "--list", "--all", "--ops", "mm,linear", "--dtypes", "bf16")
    assert {i["name"] for i in only["items"]} == {
        "mm[bfloat16]", "linear[bfloat16,qkv-256x8192x1280]", "linear[bfloat16,o_proj-256x1024x8192]",
        "linear[bfloat16,lm_head-256x8192x12928]"}


def test_ops_consistency_bad_dtype_is_reported():
    doc = run_probe("ops_consistency", "--list", "--dtypes", "fp8")
    assert doc["status"] == "fail" and "unknown dtype 'fp8'" in doc["reason"]


# The coordinator with torch-free fake cases: real worker processes, real kills.
def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_ops_consistency_times_out_a_slow_case_and_carries_on(tmp_path):
    import time

    out = tmp_path / "ops.json"
    t0 = time.monotonic()
    doc = run_probe("ops_consistency", "--fake-cases", "ok,sleep:60,ok,crash,ok,raise,ok,ok",
                    "--gpus", "0,1", "--workers-per-gpu", "1", "--case-timeout", "2", "--out", str(out),
                    timeout=60)
    wall = time.monotonic() - t0
    assert wall < 30, wall  # the 60 s case was cut at 2 s, not waited for
    by = {i["name"]: i for i in doc["items"]}
    assert len(doc["items"]) == 8  # every case reported, none lost with the killed worker
    slow = by["fake[sleep:60#1]"]
    assert slow["status"] == "timeout" and 2 <= slow["values"]["case_s"] < 10
    assert "still running after" in slow["reason"] and "limit 2 s" in slow["reason"]
    assert by["fake[crash#3]"]["status"] == "fail" and "worker died (exit code 3)" in by["fake[crash#3]"]["reason"]
    assert by["fake[raise#5]"]["status"] == "fail"
    oks = [i for n, i in by.items() if n.startswith("fake[ok")]
    assert len(oks) == 5 and all(i["status"] == "pass" for i in oks)
    # the cases went to both GPUs' workers (which worker takes which case is a race: the
    # killed and crashed cases may all land on one GPU), each worker saw only its own GPU
    assert {i["values"]["gpu"] for i in doc["items"]} == {"0", "1"}
    assert {i["values"]["cuda_visible_devices"] for i in oks} <= {"0", "1"}
    assert all(i["values"]["cuda_visible_devices"] == i["values"]["gpu"] for i in oks)
    # killed and crashed workers were replaced: more than two worker pids served cases
    pids = {i["values"]["pid"] for i in oks}
    assert not any(_alive(p) for p in pids)  # and none is left behind
    assert doc["status"] == "fail" and doc["values"]["timeout"] == 1 and doc["values"]["pass"] == 5
    assert json.loads(out.read_text()) == doc


def test_ops_consistency_budget_reports_unrun_cases():
    doc = run_probe("ops_consistency", "--fake-cases", "ok,sleep:30,ok,ok", "--gpus", "0",
                    "--workers-per-gpu", "1", "--budget-s", "1.5", "--case-timeout", "100", timeout=60)
    st = [(i["name"], i["status"]) for i in doc["items"]]
    assert st == [("fake[ok#0]", "pass"), ("fake[sleep:30#1]", "timeout"),
                  ("fake[ok#2]", "skip"), ("fake[ok#3]", "skip")]
    assert "budget of 1.5 s" in doc["items"][2]["reason"]


def test_ops_consistency_two_workers_share_one_gpu_by_default():
    """Fewer than 4 GPUs: two workers per GPU (a cold run is CPU-bound compiling)."""
    doc = run_probe("ops_consistency", "--fake-cases", "sleep:1,sleep:1,sleep:1,sleep:1", "--gpus", "7",
                    timeout=60)
    assert doc["values"]["workers"] == 2 and doc["values"]["workers_per_gpu"] == 2
    assert doc["status"] == "pass" and doc["values"]["wall_s"] < 3.9  # 4 x 1 s on two workers
    eight = run_probe("ops_consistency", "--fake-cases", "ok", "--gpus", "0,1,2,3,4,5,6,7", timeout=60)
    assert eight["values"]["workers"] == 8


def test_ops_consistency_runs_from_python_c_like_verify():
    """verify ships the probe as ``python3 -c "$source"``: workers still start."""
    src = (PROBES / "ops_consistency.py").read_text()
    proc = subprocess.run([PY, "-c", src, "--fake-cases", "env,env", "--gpus", "5"],
                          capture_output=True, text=True, timeout=60)
    doc = json.loads(proc.stdout)
    assert doc["status"] == "pass" and [i["values"]["cuda_visible_devices"] for i in doc["items"]] == ["5", "5"]


@needs_torch
def test_ops_consistency_default_set_self_test_passes():
    doc = run_probe("ops_consistency", "--self-test", "--iters", "2", "--warmup", "1")
    assert doc["status"] == "pass", doc["reason"]
    lin = items(doc, "linear[bfloat16,qkv-256x8192x1280]")[0]["values"]
    assert lin["rtol"] == 0.016 and lin["atol"] == pytest.approx(1e-4 * lin["reduce_dim"])
    # every case says how far from its tolerance it was (moe_align_block_size: exact lists)
    assert all("err_over_tol" in i["values"] or "experts_wrong" in i["values"] for i in doc["items"])


@needs_torch
def test_ops_consistency_self_test_harness_passes(tmp_path):
    out = tmp_path / "ops.json"
    doc = run_probe("ops_consistency", "--self-test", "--all", "--iters", "2", "--warmup", "1",
                    "--out", str(out))
    assert doc["status"] == "pass", doc["reason"]
    assert doc["values"]["fail"] == 0 and doc["values"]["skip"] == 0
    mm = items(doc, "mm[bfloat16]")[0]["values"]
    # FlagGems' rule: atol = 1e-4 * K, rtol(bf16) = 0.016
    assert mm["rtol"] == 0.016 and mm["atol"] == pytest.approx(1e-4 * mm["reduce_dim"])
    assert 0 <= mm["err_over_tol"] <= 1
    assert items(doc, "embedding[float32]")[0]["values"]["rtol"] == 0.0
    assert json.loads(out.read_text()) == doc


@needs_torch
def test_ops_consistency_reports_a_raising_op_per_case():
    doc = run_probe("ops_consistency", "--self-test", "--all", "--no-timing", "--inject-raise", "rms_norm")
    assert doc["status"] == "fail"
    failed = [i for i in doc["items"] if i["status"] == "fail"]
    assert failed and all(i["values"]["op"] == "rms_norm" for i in failed)
    assert all(i["reason"].startswith("flag_gems raised TypeError") for i in failed)
    assert items(doc, "layer_norm[bfloat16]")[0]["status"] == "pass"


@needs_torch
def test_ops_consistency_catches_a_wrong_result():
    doc = run_probe("ops_consistency", "--self-test", "--all", "--no-timing", "--inject-error", "topk_softmax")
    bad = {i["name"] for i in doc["items"] if i["status"] == "fail"}
    assert bad == {"topk_softmax[bfloat16,64e-k8-renorm]", "topk_softmax[float16,64e-k8-renorm]",
                   "topk_softmax[float32,64e-k8-renorm]", "topk_softmax[float32,router-256x64-k8-renorm]"}
    assert doc["status"] == "fail"


def _probe_module(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, PROBES / (name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ops_consistency_kernel_cache_state(tmp_path):
    """cold / warm / partial from the kernels the cases compiled and what the cache held."""
    oc = _probe_module("ops_consistency")
    cache_dir = tmp_path / "triton"
    for entry, kernel in (("AAA", "mm_kernel_general_host_tma"), ("BBB", "sweep")):
        (cache_dir / entry).mkdir(parents=True)
        (cache_dir / entry / f"{kernel}.json").write_text("{}")
        (cache_dir / entry / f"__grp__{kernel}.json").write_text("{}")
    known = oc.cached_kernel_names(str(cache_dir))
    assert known == {"mm_kernel_general_host_tma", "sweep"}

    def state(entries_before, *compiled):
        items = [{"values": {"compiled_kernels": len(c), "compiled_names": list(c)}} for c in compiled]
        return oc.cache_state({"entries_before": entries_before}, items, known if entries_before else set())
    assert state(0, ["mm_kernel_general_host_tma"] * 3)["state"] == "cold"
    assert state(2, [], [])["state"] == "warm"
    rebuilt = state(2, ["sweep"], [])
    assert rebuilt["state"] == "warm" and rebuilt["rebuilt_every_process"] == ["sweep"]
    part = state(2, ["sweep", "topk_stage2_kernel"])
    assert part["state"] == "partial" and part["new_kernels"] == ["topk_stage2_kernel"]
    assert oc.cache_state({"entries_before": 0}, [{"values": {}}], set())["state"] == "unknown"
