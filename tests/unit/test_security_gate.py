"""`flagops validate` as a security gate: each class of hostile or careless input is
refused through the CLI (exit 2, no traceback, the field named, found/expected/fix), and
what Ansible accepts and flagops can use passes.

The inventories are built from one valid base so that each case differs in one thing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from flagops.cli import main

BASE = {
    "all": {
        "vars": {
            "flagops_release": "ernie45",
            "flagops_share_root": "/share",
            "flagops_container_name": "flagos",
            "flagops_slot_type": "gpu",
            "flagops_slots": 8,
            "ansible_user": "root",
            "ansible_port": 22,
        },
        "children": {
            "master": {"hosts": {"node1": {"ansible_host": "192.0.2.10", "flagops_nic": "bond0"}}},
            "workers": {"hosts": {"node2": {"ansible_host": "192.0.2.11", "flagops_nic": "bond0"}}},
        },
    }
}
LINE = re.compile(r"^[^:]+:\d+:\d+: /\S*: found .+; expected .+; fix: .+$")


def _inventory(tmp_path: Path, all_vars: dict | None = None, node1: dict | None = None,
               node2: dict | None = None, text: str | None = None) -> Path:
    data = json.loads(json.dumps(BASE))
    data["all"]["vars"].update(all_vars or {})
    data["all"]["children"]["master"]["hosts"]["node1"].update(node1 or {})
    data["all"]["children"]["workers"]["hosts"]["node2"].update(node2 or {})
    path = tmp_path / "inv.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _validate(path: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["validate", str(path), *extra])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout + result.stderr


def _refused(path: Path, field: str, *fragments: str) -> str:
    code, out = _validate(path)
    assert code == 2, out
    assert "Traceback" not in out
    lines = out.splitlines()
    assert re.fullmatch(r"\d+ problems? found", lines[-1]), out
    for ln in lines[:-1]:
        assert LINE.match(ln), ln
    named = [ln for ln in lines[:-1] if field in ln]
    assert named, f"{field!r} not named in:\n{out}"
    for frag in fragments:
        assert any(frag in ln for ln in named), f"{frag!r} not in:\n{out}"
    return out


# --------------------------------------------------------------------------- 1. ssh options

SSH_SPELLINGS = [
    "-o ProxyCommand=nc %h %p",
    "-oProxyCommand=nc",
    "-o proxycommand nc",
    "-o PROXYCOMMAND=nc",
    "-o StrictHostKeyChecking=no -oLocalCommand=id -oPermitLocalCommand=yes",
    "-o KnownHostsCommand=/bin/id",
    "-o Match=exec",
    "-F /tmp/ssh_config",
    "-oPKCS11Provider=/tmp/x.so",
    "-o Include=/tmp/cfg",
]


@pytest.mark.parametrize("value", SSH_SPELLINGS)
@pytest.mark.parametrize("key", ["ansible_ssh_common_args", "ansible_ssh_extra_args", "ansible_ssh_args",
                                 "ansible_scp_extra_args", "ansible_sftp_extra_args"])
def test_ssh_options_that_run_commands(tmp_path: Path, key: str, value: str) -> None:
    out = _refused(_inventory(tmp_path, node2={key: value}), key, "runs or loads a program")
    assert "ProxyJump" in out


def test_ssh_option_in_group_vars_file(tmp_path: Path) -> None:
    inv = _inventory(tmp_path)
    (tmp_path / "group_vars").mkdir()
    (tmp_path / "group_vars" / "workers.yml").write_text("ansible_ssh_common_args: -oProxyCommand=id\n")
    out = _refused(inv, "ansible_ssh_common_args", "runs or loads a program")
    assert "group_vars/workers.yml:1:" in out


def test_proxyjump_is_accepted(tmp_path: Path) -> None:
    code, out = _validate(_inventory(tmp_path, all_vars={
        "ansible_ssh_common_args": "-o ProxyJump=jump@192.0.2.1 -o UserKnownHostsFile=~/.ssh/known_hosts"}))
    assert code == 0, out


# --------------------------------------------------------------------------- 2. templates

CREDENTIAL_TEMPLATES = [
    "{{ lookup('pipe', 'id') }}",
    "{{ lookup('env', 'X') | default(lookup('pipe', 'id')) }}",
    "{{ query('env', 'X') }}",
    "{{ lookup('file', '/etc/passwd') }}",
    "{{ lookup('env', 'X') ~ lookup('pipe', 'id') }}",
    "{{ lookup('env', 'X') | b64decode }}",
    "{% for x in [1] %}{{ x }}{% endfor %}",
    "{{ lookup('env', 'X') }}{{ lookup('pipe', 'id') }}",
]


@pytest.mark.parametrize("value", CREDENTIAL_TEMPLATES)
@pytest.mark.parametrize("key", ["flagops_registry_password", "flagops_hub_token", "flagops_registry_username",
                                 "ansible_password", "ansible_become_password"])
def test_credential_templates_other_than_env_lookup(tmp_path: Path, key: str, value: str) -> None:
    _refused(_inventory(tmp_path, all_vars={key: value}), key, "not a plain env lookup")


@pytest.mark.parametrize("key", ["ansible_host", "ansible_user", "flagops_nic", "my_own_var"])
def test_templates_outside_credentials(tmp_path: Path, key: str) -> None:
    _refused(_inventory(tmp_path, node1={key: "{{ lookup('pipe', 'touch /tmp/canary') }}"}), key, "a template")


def test_env_lookup_with_literal_default_is_accepted(tmp_path: Path) -> None:
    code, out = _validate(_inventory(tmp_path, all_vars={
        "flagops_hub_token": "{{ lookup('ansible.builtin.env', 'MODELSCOPE_API_TOKEN') | default('') }}",
        "flagops_registry_password": '{{ lookup("env", "FLAGOPS_REGISTRY_PASSWORD") }}'}))
    assert code == 0, out


# --------------------------------------------------------------------------- 3. addresses


@pytest.mark.parametrize("address", ["fe80::1%eth0;id", "fe80::1%$(id)", "192.0.2.1%eth0",
                                     "010.0.0.1", "999.1.1.1", "192.11", "0x7f.1", "1.2.3.4.5"])
def test_addresses_that_are_not_what_they_look_like(tmp_path: Path, address: str) -> None:
    _refused(_inventory(tmp_path, node2={"ansible_host": address}), "ansible_host")


def test_host_listed_twice_in_different_case(tmp_path: Path) -> None:
    text = yaml.safe_dump(BASE, sort_keys=False).replace(
        "      hosts:\n        node2:",
        "      hosts:\n        NODE1:\n          ansible_host: 192.0.2.12\n        node2:")
    _refused(_inventory(tmp_path, text=text), "NODE1", "letter case")


def test_same_address_spelled_twice(tmp_path: Path) -> None:
    _refused(_inventory(tmp_path, node1={"ansible_host": "2001:db8::1"}, node2={"ansible_host": "2001:DB8:0::1"}),
             "ansible_host", "unique address")


# --------------------------------------------------------------------------- 4. become / connection


@pytest.mark.parametrize("key,value", [
    ("ansible_become_user", "root; id"),
    ("ansible_become_method", "sudo -s"),
    ("ansible_become_flags", "-H; id"),
    ("ansible_become_exe", "sudo $(id)"),
    ("ansible_python_interpreter", "/usr/bin/python3; id"),
    ("ansible_python_interpreter", "python3 -c id"),
    ("ansible_ssh_private_key_file", "~/.ssh/id $(id)"),
    ("ansible_ssh_executable", "/tmp/evil"),
    ("ansible_shell_executable", "/bin/sh -c id"),
    ("ansible_shell_type", "powershell"),
    ("ansible_connection", "winrm"),
    ("ansible_user", "root`id`"),
    ("ansible_become", "yes please"),
])
def test_connection_fields_have_strict_forms(tmp_path: Path, key: str, value: str) -> None:
    _refused(_inventory(tmp_path, node2={key: value}), key)


@pytest.mark.parametrize("typo,hint", [("ansible_hots", "ansible_host"),
                                        ("ansible_becom_user", "ansible_become_user"),
                                        ("ansible_pyhton_interpreter", "ansible_python_interpreter")])
def test_unknown_ansible_variable_did_you_mean(tmp_path: Path, typo: str, hint: str) -> None:
    _refused(_inventory(tmp_path, node1={typo: "x"}), typo, f'did you mean "{hint}"?')


def test_own_variables_pass_through(tmp_path: Path) -> None:
    code, out = _validate(_inventory(tmp_path, all_vars={"site_rack": "r12", "ansible_become": True,
                                                         "ansible_become_user": "root"}))
    assert code == 0, out


# --------------------------------------------------------------------------- 5. numbers


@pytest.mark.parametrize("where,key,value", [
    ("node1", "flagops_slots", 8.0), ("node2", "ansible_port", 22.0), ("all", "flagops_slots", 4.0)])
def test_float_where_an_integer_is_meant(tmp_path: Path, where: str, key: str, value: float) -> None:
    path = _inventory(tmp_path, **({"all_vars": {key: value}} if where == "all" else {where: {key: value}}))
    _refused(path, key, "integer")


def test_float_parallel_size_in_overrides(tmp_path: Path) -> None:
    path = _inventory(tmp_path, all_vars={"flagops_release_overrides": {
        "serve": {"engine_args_specific": {"vllm": {"tensor_parallel_size": 8.0}}}}})
    _refused(path, "tensor_parallel_size", "integer")


# --------------------------------------------------------------------------- 6. YAML hazards

BOMB = """\
a: &a ["x","x","x","x","x","x","x","x","x","x"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def test_alias_bomb_fails_fast(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text("all:\n  vars:\n" + "".join("    " + ln + "\n" for ln in BOMB.splitlines()))
    start = time.perf_counter()
    out = _refused(path, "bomb.yaml", "aliases that expand")
    assert time.perf_counter() - start < 1.0, out


def test_alias_bomb_in_group_vars(tmp_path: Path) -> None:
    inv = _inventory(tmp_path)
    (tmp_path / "group_vars").mkdir()
    (tmp_path / "group_vars" / "all.yml").write_text(BOMB)
    _refused(inv, "group_vars/all.yml", "aliases that expand")


def test_size_cap(tmp_path: Path) -> None:
    text = yaml.safe_dump(BASE) + "# " + "x" * (1024 * 1024) + "\n"
    _refused(_inventory(tmp_path, text=text), "inv.yaml", "at most 1048576 bytes (1 MiB)")


@pytest.mark.parametrize("text,fragment", [
    (b"all:\n  vars:\n    flagops_release: ern\xffie45\n", "not UTF-8"),
    (b"all: !include other.yaml\n", "the tag"),
    (b"all:\n  vars:\n    x: !!python/object/apply:os.system ['touch /tmp/canary']\n", "the tag"),
    (b"all: {}\n---\nall: {}\n", "second YAML document"),
    (b"- all\n- vars\n", "a list at the top"),
    (b"just a string\n", "at the top"),
    (b"all:\n  vars: {a: 1\n", "invalid YAML"),
    (b"all:\n  vars:\n    x: \"a\x1b[2Jb\"\n", ""),
])
def test_malformed_yaml_exit_2_with_position(tmp_path: Path, text: bytes, fragment: str) -> None:
    path = tmp_path / "inv.yaml"
    path.write_bytes(text)
    code, out = _validate(path)
    assert code == 2 and "Traceback" not in out, out
    assert re.search(r"inv\.yaml:\d+:\d+: ", out), out
    assert fragment in out
    assert "\x1b" not in out


def test_python_tag_never_runs(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    path = tmp_path / "inv.yaml"
    path.write_text(f"all:\n  vars:\n    x: !!python/object/apply:os.system ['touch {canary}']\n")
    assert _validate(path)[0] == 2
    assert not canary.exists()


# --------------------------------------------------------------------------- 7. terminal control


@pytest.mark.parametrize("value", ["bond0\x1b[31m", "a\u202eb", "a\rb", "x\u200by"])
def test_control_characters_never_echoed_raw(tmp_path: Path, value: str) -> None:
    out = _refused(_inventory(tmp_path, node1={"flagops_nic": value}), "flagops_nic")
    for ch in ("\x1b", "\u202e", "\r", "\u200b"):
        assert ch not in out


def test_control_characters_in_the_path_are_escaped(tmp_path: Path) -> None:
    sub = tmp_path / "evil\u202edir"
    sub.mkdir()
    path = _inventory(sub, node1={"flagops_nic": "a;b"})
    code, out = _validate(path)
    assert code == 2
    assert "\u202e" not in out and "\\u202e" in out


# --------------------------------------------------------------------------- 8. honest messages


def test_misindented_children_is_named(tmp_path: Path) -> None:
    # children: at the top level, next to all: (a common paste error): Ansible would read
    # it as a group named "children"; the message must not claim flagops_release is missing.
    text = ("all:\n  vars:\n    flagops_release: ernie45\n    flagops_share_root: /share\n"
            "    flagops_container_name: flagos\n    flagops_slots: 8\n"
            "children:\n  master:\n    hosts:\n      node1: {ansible_host: 192.0.2.10}\n")
    out = _refused(_inventory(tmp_path, text=text), "/children", 'unknown key "children"')
    assert "no flagops_release" not in out


def test_misindented_vars_named_where_they_are(tmp_path: Path) -> None:
    text = ("all:\n  children:\n    master:\n      hosts:\n        node1: {ansible_host: 192.0.2.10}\n"
            "      vars:\n        flagops_release: ernie45\n        flagops_share_root: /share\n"
            "        flagops_container_name: flagos\n        flagops_slots: 8\n"
            "    workers:\n      hosts:\n        node2: {ansible_host: 192.0.2.11}\n")
    out = _refused(_inventory(tmp_path, text=text), "flagops_release", "not for node2")
    assert "inv.yaml:7:26: /all/children/master/vars/flagops_release" in out
    assert "inv.yaml:10:9 (/all/children/master/vars/flagops_slots), where it does not apply to node2" in out


def test_master_under_wrong_parent_named(tmp_path: Path) -> None:
    text = yaml.safe_dump(BASE, sort_keys=False).replace("    master:\n", "    ignored:\n      children:\n"
                                                         "        master_:\n")
    code, out = _validate(_inventory(tmp_path, text=text))
    assert code == 2 and "Traceback" not in out, out
    assert "no group 'master'" in out


@pytest.mark.parametrize("text", ["all:\n", "all: {}\n", "all:\n  vars:\n    flagops_release: ernie45\n",
                                  "all:\n  children:\n    master:\n      hosts:\n        n1:\n"])
def test_near_empty_inventory_reports_everything(tmp_path: Path, text: str) -> None:
    code, out = _validate(_inventory(tmp_path, text=text))
    assert code == 2 and "Traceback" not in out, out
    assert re.fullmatch(r"\d+ problems? found", out.splitlines()[-1]), out


def test_empty_file(tmp_path: Path) -> None:
    code, out = _validate(_inventory(tmp_path, text=""))
    assert code == 2 and "an empty file" in out


# --------------------------------------------------------------------------- §3 valid inputs


def test_nccl_exclusion_syntax_is_accepted(tmp_path: Path) -> None:
    code, out = _validate(_inventory(tmp_path, all_vars={"flagops_release_overrides": {"runner": {"envs": {
        "NCCL_SOCKET_IFNAME": "^lo,docker0", "NCCL_IB_HCA": "^mlx5_2"}}}}))
    assert code == 0, out


def test_caret_only_leads(tmp_path: Path) -> None:
    _refused(_inventory(tmp_path, all_vars={"flagops_release_overrides": {"runner": {"envs": {
        "NCCL_SOCKET_IFNAME": "lo^x"}}}}), "NCCL_SOCKET_IFNAME")


def test_what_ansible_accepts(tmp_path: Path) -> None:
    text = (
        "\ufeff# a comment first\r\n"
        "all:\r\n"
        "  children:   # groups first, vars after\r\n"
        "    workers:\r\n"
        "      hosts:\r\n"
        "        gpu-node-2.example.com:   # hyphens and dots\r\n"
        "          ansible_host: 2001:db8::11\r\n"
        "          ansible_port: 2222\r\n"
        "    master:\r\n"
        "      hosts:\r\n"
        "        gpu-node-1:\r\n"
        "          ansible_host: \"2001:db8::10\"\r\n"
        "          ansible_port: 2222\r\n"
        "  vars:\r\n"
        "    flagops_slots: 8\r\n"
        "    flagops_container_name: flagos\r\n"
        "    flagops_share_root: /share\r\n"
        "    flagops_release: ernie45   # trailing comment\r\n"
    )
    path = tmp_path / "inv.yml"
    path.write_bytes(text.encode("utf-8"))
    code, out = _validate(path)
    assert code == 0, out
    assert "gpu-node-1 2001:db8::10 (master" in out


def test_group_vars_host_vars_and_vault(tmp_path: Path) -> None:
    inv = tmp_path / "hosts.yml"
    inv.write_text("all:\n  children:\n    master:\n      hosts:\n        node1:\n"
                   "    workers:\n      hosts:\n        node2:\n")
    (tmp_path / "group_vars").mkdir()
    (tmp_path / "host_vars").mkdir()
    cluster = {k: v for k, v in BASE["all"]["vars"].items()}
    (tmp_path / "group_vars" / "all.yml").write_text(yaml.safe_dump(cluster) + (
        "flagops_registry_password: !vault |\n"
        "  $ANSIBLE_VAULT;1.1;AES256\n"
        "  62313365396662343061393464336163383764373764613633653634306231386433626436623361\n"))
    (tmp_path / "group_vars" / "workers.yml").write_text("flagops_slots: 8\n")
    (tmp_path / "host_vars" / "node1.yml").write_text("ansible_host: 192.0.2.10\n")
    (tmp_path / "host_vars" / "node2.yaml").write_text("ansible_host: 192.0.2.11\nflagops_slots: 4\n")
    result = CliRunner().invoke(main, ["validate", str(inv), "--json"])
    assert result.exit_code == 2  # TP 8 x PP 2 != 8 + 4: the host_vars value won over group_vars
    assert "node2 4" in result.stderr
    (tmp_path / "host_vars" / "node2.yaml").write_text("ansible_host: 192.0.2.11\n")
    result = CliRunner().invoke(main, ["validate", str(inv), "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert [(h["name"], h["address"], h["slots"]) for h in doc["hosts"]] == [
        ("node1", "192.0.2.10", 8), ("node2", "192.0.2.11", 8)]
    assert "62313365" not in result.stdout


def test_group_vars_problem_points_into_its_file(tmp_path: Path) -> None:
    inv = _inventory(tmp_path)
    (tmp_path / "group_vars").mkdir()
    (tmp_path / "group_vars" / "all.yml").write_text("# shared\nflagops_share_root: share\n")
    out = _refused(inv, "flagops_share_root", "a relative path")
    assert "group_vars/all.yml:2:21: /flagops_share_root:" in out


def test_no_cwd_ansible_cfg_or_plugin_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An ansible.cfg and an inventory plugin in the current directory are not used."""
    canary = tmp_path / "canary"
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "yaml.py").write_text(f"open({str(canary)!r}, 'w').close()\n")
    (tmp_path / "ansible.cfg").write_text(f"[defaults]\ninventory_plugins = {plugins}\nvars_plugins = {plugins}\n"
                                          "[inventory]\nenable_plugins = script, yaml\n")
    script = tmp_path / "inv.sh"
    script.write_text(f"#!/bin/sh\ntouch {canary}\necho '{{}}'\n")
    script.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    code, out = _validate(script)
    assert code == 2, out
    code, out = _validate(_inventory(tmp_path))
    assert code == 0, out
    assert not canary.exists()


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("hole", ["proxycommand", "pipe_lookup"])
def test_provision_check_runs_nothing_for_controller_holes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           hole: str) -> None:
    """The two confirmed controller-side holes, through `flagops provision --check` with the
    real runner: were either accepted, Ansible would run ssh (ProxyCommand) or render the
    lookup on this machine and the canary would appear."""
    canary = tmp_path / "canary"
    monkeypatch.setenv("FLAGOPS_HOME", str(tmp_path / "home"))
    if hole == "proxycommand":
        path = _inventory(tmp_path, all_vars={"ansible_ssh_common_args": f"-oProxyCommand=touch {canary}"})
    else:
        path = _inventory(tmp_path, all_vars={
            "flagops_registry_password": f"{{{{ lookup('pipe', 'touch {canary}') }}}}"})
    result = CliRunner().invoke(main, ["provision", str(path), "--check"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert not canary.exists()
    assert not (tmp_path / "home" / "runs").exists() or not any((tmp_path / "home" / "runs").iterdir())


def test_executable_yaml_inventory_is_never_run_as_a_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A YAML inventory may start with a '#!' comment and carry the exec bit: Ansible's
    default plugin order would run it as a script. validate reads it as YAML, and every
    playbook run gets the same restriction (flagops.loader.INVENTORY_ENV)."""
    from flagops import runner

    canary = tmp_path / "canary"
    path = _inventory(tmp_path)
    path.write_text(f"#!/bin/sh\n# touch {canary}; exit 1\n" + path.read_text())
    path.chmod(0o755)
    code, out = _validate(path)
    assert code == 0, out
    env = {**os.environ, **runner.ansible_env()}
    res = subprocess.run([str(Path(sys.executable).with_name("ansible-inventory")), "-i", str(path), "--list"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "node2" in res.stdout
    assert not canary.exists()
