"""CLI behaviour: lazy imports, JSON output, provision sequence."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from flagops import cli, runner, state

REPO = Path(__file__).resolve().parents[2]
A800 = str(REPO / "inventories/a800.yaml")


def test_help_imports_nothing_heavy() -> None:
    code = ("import sys; from flagops.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('yaml', 'jsonschema', 'rich', 'ansible_runner', 'ansible', 'fabric',"
            " 'docker', 'flagops.config', 'flagops.service_cli', 'flagops.lab.cli') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out
    for name in ("validate", "render", "provision", "deploy", "status", "logs", "stop", "verify", "lab"):
        assert f"  {name} " in out


def test_validate_json_ok() -> None:
    result = CliRunner().invoke(cli.main, ["validate", A800, "--json"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["ok"] is True and data["release_name"] == "ernie45"
    assert [h["address"] for h in data["hosts"]] == ["192.0.2.10", "192.0.2.11"]


def test_provision_validates_renders_locks_runs_and_remembers(monkeypatch: pytest.MonkeyPatch,
                                                             flagops_home: Path) -> None:
    calls: list[dict[str, Any]] = []

    def fake_run(name: str, inventory: str, extravars: dict[str, Any], **kw: Any) -> runner.Result:
        assert (flagops_home / "lock.json").exists()  # held during the run
        calls.append({"name": name, "inventory": inventory, "extravars": extravars, **kw})
        return runner.Result(name, 0, "successful", {}, flagops_home, 0.1)

    monkeypatch.setattr(runner, "run_playbook", fake_run)
    result = CliRunner().invoke(cli.main, ["provision", A800, "--check", "--diff", "--tags", "image",
                                           "--limit", "node2", "--json"])
    assert result.exit_code == 0, result.output
    (call,) = calls
    assert call["name"] == "provision" and call["check"] and call["diff"]
    assert call["tags"] == "image" and call["limit"] == "node2" and call["json_out"]
    fl = call["extravars"]["flagops"]
    assert set(fl) == {"release", "contract", "rendered", "inventory_file"}
    assert fl["contract"]["state_file"] == "/share/.flagops/service/ernie45.json"
    assert fl["contract"]["ray_nodes"] == 2 and fl["contract"]["ray_resource"] == "GPU"
    assert set(fl["rendered"]) == {"hostfile.txt", "serve.yaml", "serve/300b.yaml"}
    assert "password" not in json.dumps(call["extravars"]).lower()
    assert not (flagops_home / "lock.json").exists()
    assert state.last_inventory() is None  # --check does not record state


def test_provision_failure_exits_1(monkeypatch: pytest.MonkeyPatch, flagops_home: Path) -> None:
    monkeypatch.setattr(runner, "run_playbook", lambda *a, **k: runner.Result(
        "provision", 2, "failed", {}, flagops_home, 0.1,
        [{"host": "node1", "task": "preflight : driver", "msg": "too old"}]))
    result = CliRunner().invoke(cli.main, ["provision", A800])
    assert result.exit_code == 1
    assert "provision failed (ansible rc=2) at node1: preflight : driver" in result.stderr
    assert state.last_inventory() == str(Path(A800).resolve())


def test_provision_bad_inventory_never_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "run_playbook", lambda *a, **k: pytest.fail("must not run"))
    result = CliRunner().invoke(cli.main, ["provision", str(REPO / "tests/bad/two_masters.yaml")])
    assert result.exit_code == 2 and "2 master hosts" in result.stderr
