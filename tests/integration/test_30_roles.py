"""Every role's molecule scenario against the running lab, in provision order.

Each scenario converges the role's real play (playbooks/provision.yml or
deploy.yml, selected by tag) on the two lab nodes, converges it again and
fails on any change (molecule's idempotence step), then runs a verify play
that asserts real state on the nodes.  Running them in order on a fresh lab
is itself the proof that each role does its job from nothing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flagops import resources

REPO = Path(__file__).resolve().parents[2]
ROLES = [
    "preflight",
    "weights",
    "flagscale_source",
    "image",
    "container",
    "ssh_trust",
    "flagscale_install",
    "vllm_build",
    "serve",
    "check",
]

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def molecule_env(lab, tmp_path_factory):  # noqa: ARG001 - lab: the running lab fixture
    out = tmp_path_factory.mktemp("render")
    vars_file = out / "flagops-vars.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "flagops",
            "render",
            "ernie45",
            "-i",
            str(REPO / "inventories/lab.yaml"),
            "-o",
            str(out),
            "--ansible-vars",
            str(vars_file),
        ],
        check=True,
        cwd=REPO,
    )
    env = dict(
        os.environ,
        FLAGOPS_REPO=str(REPO),
        FLAGOPS_MOLECULE_VARS=str(vars_file),
        FLAGOPS_COLLECTIONS=str(resources.collections_dir()),
        ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        NO_COLOR="1",
        PY_COLORS="0",
        ANSIBLE_FORCE_COLOR="0",
    )
    return env


@pytest.mark.parametrize("role", ROLES)
def test_role_scenario(role, molecule_env):
    proc = subprocess.run(
        ["molecule", "test"], cwd=REPO / "roles" / role, env=molecule_env, capture_output=True, text=True, timeout=900
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    # Each step really ran (a disabled or skipped step must not pass silently).
    for step in ("syntax", "converge", "idempotence", "check", "verify"):
        assert re.search(rf"{step}: Executed: Successful", out), f"{step} did not run:\n{out[-3000:]}"
