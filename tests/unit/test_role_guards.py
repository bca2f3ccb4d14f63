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


TRY = """\
- name: Hand the candidate to the role as its own before_start
  ansible.builtin.set_fact:
    "{{ case.0 }}_before_start": "{{ case.1 }}"
- name: Run the role's guard alone
  block:
    - name: The guard
      ansible.builtin.include_role:
        name: "{{ case.0 }}"
        tasks_from: guard
    - name: Accepted
      ansible.builtin.set_fact:
        verdicts: "{{ verdicts + [[case.0, case.1, 'accepted']] }}"
  rescue:
    - name: Refused
      ansible.builtin.set_fact:
        verdicts: "{{ verdicts + [[case.0, case.1, ansible_failed_result.msg | default('')]] }}"
"""


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], str]:
    """One plain ansible-playbook run: every role's guard, alone, on every value."""
    tmp = tmp_path_factory.mktemp("guards")
    cases = [[role, value] for role in ROLES for value in OK[:2] + BAD[1:3] + BAD[-2:]]
    out = tmp / "verdicts.json"
    play = [{"hosts": "localhost", "gather_facts": False, "connection": "local", "vars": {"verdicts": []},
             "tasks": [{"name": "Each case", "ansible.builtin.include_tasks": str(tmp / "try.yml"),
                        "loop": cases, "loop_control": {"loop_var": "case"}},
                       {"name": "Write the verdicts", "ansible.builtin.copy": {
                           "dest": str(out), "content": "{{ verdicts | to_json }}", "mode": "0600"}}]}]
    (tmp / "try.yml").write_text(TRY)
    (tmp / "play.yml").write_text(yaml.safe_dump(play))
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "ANSIBLE_ROLES_PATH": str(REPO / "roles"),
           "ANSIBLE_LOCALHOST_WARNING": "False", "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False"}
    res = subprocess.run([str(Path(sys.executable).with_name("ansible-playbook")), str(tmp / "play.yml")],
                         capture_output=True, text=True, env=env, cwd=tmp, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return {(role, value): verdict for role, value, verdict in json.loads(out.read_text())}


@pytest.mark.parametrize("role", ROLES)
def test_role_guard_alone(verdicts: dict[tuple[str, str], str], role: str) -> None:
    for value in OK[:2]:
        assert verdicts[(role, value)] == "accepted", value
    for value in BAD[1:3] + BAD[-2:]:
        assert "is pasted into bash -c" in verdicts[(role, value)], (value, verdicts[(role, value)])
