"""flagops provision refuses, before any host is touched, a registry login whose env lookup
reads an unset variable: exit 2, the inventory's file:line:col, the variable, the fix.
Commands that do not pull (validate, render, provision --tags weights) never ask for it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from flagops import config, runner
from flagops.cli import main
from flagops.lab.paths import LabPaths

ENV = "FLAGOPS_REGISTRY_PASSWORD"
LOOKUP = "{{ lookup('env', 'FLAGOPS_REGISTRY_PASSWORD') }}"
LAB_REF = "172.30.0.1:5000/flagrelease/flagrelease:lab"
LINE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+):(?P<col>\d+): (?P<ptr>/\S*): found .+; expected .+; fix: .+$")


class Ran(Exception):
    """Raised by the stand-in for runner.run_playbook: the run reached Ansible."""


@pytest.fixture(autouse=True)
def no_ansible(monkeypatch: pytest.MonkeyPatch, flagops_home: Path) -> list[str]:  # noqa: ARG001
    calls: list[str] = []

    def fake(playbook: str, *args: object, **kwargs: object) -> None:
        calls.append(playbook)
        raise Ran(playbook)

    monkeypatch.setattr(runner, "run_playbook", fake)
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv("FLAGOPS_REGISTRY_USERNAME", raising=False)
    return calls


def _inventory(tmp_path: Path, ref: str | None = LAB_REF, **registry: object) -> Path:
    """A two-node inventory; ``registry``: the flagops_registry_* fields as written."""
    all_vars: dict[str, object] = {
        "flagops_release": "ernie45", "flagops_share_root": "/share", "flagops_container_name": "flagos",
        "flagops_slot_type": "gpu", "flagops_slots": 8, "ansible_user": "root", "ansible_port": 22,
    }
    all_vars.update({f"flagops_registry_{k}": v for k, v in registry.items()})
    if ref is not None:
        all_vars["flagops_release_overrides"] = {"image": {"ref": ref}}
    data = {"all": {"vars": all_vars, "children": {
        "master": {"hosts": {"node1": {"ansible_host": "192.0.2.10", "flagops_nic": "bond0"}}},
        "workers": {"hosts": {"node2": {"ansible_host": "192.0.2.11", "flagops_nic": "bond0"}}},
    }}}
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _provision(path: Path, *extra: str) -> tuple[int, str, BaseException | None]:
    result = CliRunner().invoke(main, ["provision", str(path), *extra])
    return result.exit_code, result.stdout + result.stderr, result.exception


def _where(path: Path, key: str) -> tuple[int, int]:
    """1-based line and column of ``key``'s value in ``path``."""
    for n, text in enumerate(path.read_text().splitlines(), 1):
        if text.lstrip().startswith(key + ":"):
            return n, text.index(":") + 3
    raise AssertionError(key)


def test_unset_password_refused_before_any_host(tmp_path: Path, no_ansible: list[str]) -> None:
    path = _inventory(tmp_path, username="flagops-lab", password=LOOKUP)
    code, out, _ = _provision(path)
    assert code == 2, out
    assert no_ansible == [], "provision reached Ansible"
    assert "Traceback" not in out
    (line, *_), last = out.strip().splitlines()[:-1], out.strip().splitlines()[-1]
    assert last == "1 problem found"
    m = LINE.match(line)
    assert m, line
    assert (int(m["line"]), int(m["col"])) == _where(path, "flagops_registry_password")
    assert m["file"].endswith("inventory.yaml") and m["ptr"] == "/all/vars/flagops_registry_password"
    assert f"{ENV}, which is unset" in line
    pw_file = LabPaths.default().root / "registry-auth" / "password"
    assert f'fix: export {ENV}="$(cat {pw_file})"' in line  # the lab's own password file


def test_json_names_the_field_and_the_fix(tmp_path: Path, no_ansible: list[str]) -> None:
    path = _inventory(tmp_path, username="flagops-lab", password=LOOKUP)
    code, out, _ = _provision(path, "--json")
    assert code == 2 and no_ansible == []
    payload = json.loads(out.splitlines()[0])
    assert payload["ok"] is False and payload["error"] == "ConfigError"
    (p,) = payload["problems"]
    assert (p["line"], p["col"]) == _where(path, "flagops_registry_password")
    assert p["pointer"] == "/all/vars/flagops_registry_password"
    assert ENV in p["found"] and p["fix"].startswith(f"export {ENV}=")


def test_other_registry_gets_the_generic_fix(tmp_path: Path) -> None:
    path = _inventory(tmp_path, ref=None, username="robot", password=LOOKUP)  # the catalog's aliyun ref
    code, out, _ = _provision(path)
    assert code == 2, out
    assert "flagrelease-registry.cn-beijing.cr.aliyuncs.com" in out
    assert f"fix: export {ENV} (the" in out and "registry-auth" not in out


def test_empty_variable_is_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_ansible: list[str]) -> None:
    monkeypatch.setenv(ENV, "")
    code, out, _ = _provision(_inventory(tmp_path, username="flagops-lab", password=LOOKUP))
    assert code == 2 and no_ansible == [], out


def test_username_lookup_unset_while_password_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "s3cret-value")
    user = "{{ lookup('env', 'FLAGOPS_REGISTRY_USERNAME') }}"
    path = _inventory(tmp_path, username=user, password=LOOKUP)
    code, out, _ = _provision(path)
    assert code == 2, out
    assert "/all/vars/flagops_registry_username" in out and "FLAGOPS_REGISTRY_USERNAME, which is unset" in out
    assert "s3cret-value" not in out


def test_username_without_password(tmp_path: Path) -> None:
    code, out, _ = _provision(_inventory(tmp_path, username="robot"))
    assert code == 2 and "flagops_registry_username without a flagops_registry_password" in out, out


@pytest.mark.parametrize("registry", [
    {"username": "flagops-lab", "password": LOOKUP, "env": "set"},
    {"username": "flagops-lab", "password": "{{ lookup('env', 'FLAGOPS_REGISTRY_PASSWORD') | default('pw') }}"},
    {},  # no login: an anonymous pull
    {"username": "{{ lookup('env', 'FLAGOPS_REGISTRY_USERNAME') }}", "password": LOOKUP},  # both unset: anonymous
], ids=["set", "default", "no-login", "both-unset"])
def test_runs_when_the_login_is_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_ansible: list[str],
                                         registry: dict[str, str]) -> None:
    if registry.pop("env", None):
        monkeypatch.setenv(ENV, "pw")
    _, out, exc = _provision(_inventory(tmp_path, **registry))
    assert isinstance(exc, Ran), out
    assert no_ansible == ["provision"]


def test_vault_password_is_set(tmp_path: Path, no_ansible: list[str]) -> None:
    path = _inventory(tmp_path, username="flagops-lab", password="PLACEHOLDER")
    vault = "!vault |\n      $ANSIBLE_VAULT;1.1;AES256\n      6162636465666768696a6b6c6d6e6f70"
    path.write_text(path.read_text().replace("PLACEHOLDER", vault))
    cfg = config.load(path)
    assert config.unset_credentials(cfg, {}) == []


@pytest.mark.parametrize("args", [["--tags", "weights"], ["--tags", "preflight,container"], ["--skip-tags", "image"]])
def test_runs_that_do_not_pull_need_no_password(tmp_path: Path, no_ansible: list[str], args: list[str]) -> None:
    _, out, exc = _provision(_inventory(tmp_path, username="flagops-lab", password=LOOKUP), *args)
    assert isinstance(exc, Ran), out


@pytest.mark.parametrize("args", [["--tags", "image"], ["--tags", "weights,image"], ["--check"]])
def test_runs_that_pull_need_it(tmp_path: Path, no_ansible: list[str], args: list[str]) -> None:
    code, out, _ = _provision(_inventory(tmp_path, username="flagops-lab", password=LOOKUP), *args)
    assert code == 2 and no_ansible == [], out


@pytest.mark.parametrize("argv", [["validate"], ["render", "ernie45", "-i"]])
def test_commands_that_do_not_pull_never_ask(tmp_path: Path, argv: list[str]) -> None:
    path = _inventory(tmp_path, username="flagops-lab", password=LOOKUP)
    extra = ["--out", str(tmp_path / "out")] if argv[0] == "render" else []
    result = CliRunner().invoke(main, [*argv, str(path), *extra])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("name", ["lab.yaml", "lab-bastion.yaml"])
def test_shipped_lab_inventories_are_refused_without_it(name: str, no_ansible: list[str]) -> None:
    path = Path(__file__).resolve().parents[2] / "inventories" / name
    code, out, _ = _provision(path)
    assert code == 2 and no_ansible == [], out
    assert f"inventories/{name}:" in out and "/all/vars/flagops_registry_password" in out
