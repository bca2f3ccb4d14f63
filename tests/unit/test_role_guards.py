"""The roles that paste ``before_start`` into ``bash -c`` refuse what ``flagops validate``
refuses, also when run alone: their copy of the rule equals Python's, and a plain
ansible-playbook run of each role's guard accepts and refuses the same values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flagops import config

REPO = Path(__file__).resolve().parents[2]
ROLES = ["serve", "flagscale_install", "vllm_build"]
OK = ["source /root/miniconda3/bin/activate flagscale-inference", "source /opt/venvs/x/bin/activate",
      "conda activate fs && export GLOO_SOCKET_IFNAME=bond0", "cd /repos/FlagScale && source /opt/v/bin/activate"]
BAD = ["source ~/x/bin/activate", "conda activate fs; id", "export A=$(id)", "source /x/bin/activate env | tee",
       "pip install x", "cd ../x", "conda activate fs\nid", "cd /x && touch /tmp/canary #"]


@pytest.mark.parametrize("role", ROLES)
def test_role_copy_equals_python_rule(role: str) -> None:
    data = yaml.safe_load((REPO / "roles" / role / "vars" / "main.yml").read_text())
    assert data[f"{role}_before_start_pattern"] == config.CMD_PATTERN


def test_python_verdicts() -> None:
    assert [config._check_command(c) for c in OK] == [None] * len(OK)
    assert all(config._check_command(c) for c in BAD)


def _run_guard(tmp_path: Path, role: str, value: str) -> subprocess.CompletedProcess[str]:
    play = [{"hosts": "localhost", "gather_facts": False, "connection": "local",
             "tasks": [{"ansible.builtin.include_role": {"name": role, "tasks_from": "guard"}}]}]
    (tmp_path / "play.yml").write_text(yaml.safe_dump(play))
    (tmp_path / "vars.json").write_text(json.dumps({f"{role}_before_start": value}))
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "ANSIBLE_ROLES_PATH": str(REPO / "roles"),
           "ANSIBLE_LOCALHOST_WARNING": "False", "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False"}
    return subprocess.run(
        [str(Path(sys.executable).with_name("ansible-playbook")), str(tmp_path / "play.yml"),
         "-e", f"@{tmp_path / 'vars.json'}"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)


@pytest.mark.parametrize("role", ROLES)
def test_role_guard_alone(tmp_path: Path, role: str) -> None:
    for value in OK[:2]:
        res = _run_guard(tmp_path, role, value)
        assert res.returncode == 0, res.stdout + res.stderr
    for value in BAD[1:3] + BAD[-2:]:
        res = _run_guard(tmp_path, role, value)
        assert res.returncode != 0, value
        assert "is pasted into bash -c" in res.stdout, res.stdout
