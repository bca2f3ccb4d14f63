"""The Ansible driver against localhost (connection local): events, JSON lines, rc,
artifact rotation and secret hygiene."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from flagops import runner

PLAYBOOK = """\
- hosts: all
  gather_facts: false
  tasks:
    - name: echo extra var
      ansible.builtin.debug:
        msg: "release={{ flagops.release.name }}"
    - name: make a change
      ansible.builtin.command: "true"
    - name: skipped task
      ansible.builtin.command: "false"
      when: false
{failing}
"""
FAIL_TASK = """\
    - name: deliberate failure
      ansible.builtin.fail:
        msg: boom from the test
"""


@pytest.fixture
def local_inventory(tmp_path: Path) -> Path:
    inv = tmp_path / "inv.yaml"
    inv.write_text(
        "all:\n  hosts:\n    localhost:\n      ansible_connection: local\n"
        "      ansible_python_interpreter: \"{{ ansible_playbook_python }}\"\n"
    )
    return inv


def _playbook(tmp_path: Path, failing: bool) -> Path:
    pb = tmp_path / ("fail.yml" if failing else "ok.yml")
    pb.write_text(PLAYBOOK.replace("{failing}\n", FAIL_TASK if failing else ""))
    return pb


def test_success_recap_and_json_lines(tmp_path: Path, local_inventory: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    events: list[dict[str, Any]] = []
    result = runner.run_playbook(str(_playbook(tmp_path, False)), local_inventory,
                                 {"flagops": {"release": {"name": "ernie45"}}},
                                 json_out=True, on_event=events.append)
    assert result.ok and result.rc == 0
    assert vars(result.recap["localhost"]) == {
        "ok": 2, "changed": 1, "failed": 0, "unreachable": 0, "skipped": 1, "rescued": 0, "ignored": 0}
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    kinds = [ln["event"] for ln in lines]
    assert kinds[-1] == "flagops_result" and lines[-1]["ok"] is True
    assert "playbook_on_stats" in kinds
    tasks = [ln["task"] for ln in lines if ln["event"] == "playbook_on_task_start"]
    assert tasks == ["echo extra var", "make a change", "skipped task"]
    changed = [ln for ln in lines if ln["event"] == "runner_on_ok" and ln["task"] == "make a change"]
    assert changed and changed[0]["changed"] is True and changed[0]["host"] == "localhost"
    # the extra var reached the play
    debug = [e for e in events if e.get("event") == "runner_on_ok"
             and e["event_data"].get("task") == "echo extra var"]
    assert debug[0]["event_data"]["res"]["msg"] == "release=ernie45"


def test_failure_sets_rc_and_reports_task(tmp_path: Path, local_inventory: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    result = runner.run_playbook(str(_playbook(tmp_path, True)), local_inventory, {"flagops": {
        "release": {"name": "x"}}}, json_out=True)
    assert result.rc != 0 and not result.ok
    assert result.recap["localhost"].failed == 1
    assert result.failures == [{"host": "localhost", "task": "deliberate failure",
                                "msg": "boom from the test"}]
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    failed = [ln for ln in lines if ln["event"] == "runner_on_failed"]
    assert failed and failed[0]["msg"] == "boom from the test"
    assert lines[-1]["event"] == "flagops_result" and lines[-1]["ok"] is False


def test_rich_view_lines(tmp_path: Path, local_inventory: Path) -> None:
    from rich.console import Console

    console = Console(record=True, width=120, force_terminal=False)
    result = runner.run_playbook(str(_playbook(tmp_path, True)), local_inventory,
                                 {"flagops": {"release": {"name": "x"}}},
                                 view=runner.RichView(console))
    text = console.export_text()
    assert result.rc != 0
    assert "make a change changed: localhost" in text
    assert "skipped task skipped: localhost" in text
    assert "deliberate failure failed: localhost" in text
    assert "localhost: boom from the test" in text
    assert "rc=2" in text  # recap title


def test_secrets_do_not_leak_to_disk_or_argv(tmp_path: Path, local_inventory: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLAGOPS_REGISTRY_PASSWORD", "s3cr3t-value")
    pb = tmp_path / "secret.yml"
    pb.write_text(
        "- hosts: all\n  gather_facts: false\n  tasks:\n"
        "    - name: use the secret\n"
        "      ansible.builtin.set_fact:\n"
        "        pw: \"{{ lookup('env', 'FLAGOPS_REGISTRY_PASSWORD') }}\"\n"
        "      no_log: true\n"
        "    - ansible.builtin.assert: {that: [pw == 's3cr3t-value']}\n"
        "      no_log: true\n"
    )
    result = runner.run_playbook(str(pb), local_inventory, {"flagops": {"k": "v"}}, json_out=True)
    assert result.ok, result.failures
    pdd = result.artifact_dir.parents[1]  # $FLAGOPS_HOME/runs, ansible-runner's private data dir
    assert list((pdd / "vars").iterdir()) == []  # the extra vars file is removed after the run
    assert not (pdd / "env" / "extravars").exists()
    cmd = json.loads((result.artifact_dir / "command").read_text())
    assert "-e" in cmd["command"] and all("{" not in a for a in cmd["command"])  # vars by file
    assert cmd["env"]["FLAGOPS_REGISTRY_PASSWORD"] == runner.REDACTED
    for path in pdd.rglob("*"):
        if path.is_file():
            assert b"s3cr3t-value" not in path.read_bytes(), path
    assert oct(pdd.stat().st_mode & 0o777) == "0o700"


def test_runs_rotate(tmp_path: Path, local_inventory: Path, monkeypatch: pytest.MonkeyPatch,
                     flagops_home: Path) -> None:
    """ansible-runner names (ident) and rotates the artifact dirs; runs in the same second
    never collide."""
    monkeypatch.setattr(runner, "KEEP_RUNS", 1)
    pb = tmp_path / "tiny.yml"
    pb.write_text("- hosts: all\n  gather_facts: false\n  tasks:\n    - ansible.builtin.ping:\n")
    monkeypatch.setattr(runner.time, "strftime", lambda fmt: "20261202-120000")  # one second
    dirs = []
    for _ in range(2):
        result = runner.run_playbook(str(pb), local_inventory, {}, json_out=True)
        assert result.ok, result.failures
        dirs.append(result.artifact_dir)
    assert len({d.name for d in dirs}) == 2
    remaining = sorted(p.name for p in (flagops_home / "runs" / "artifacts").iterdir())
    assert remaining == sorted(d.name for d in dirs[1:])


def test_missing_playbook_is_a_clean_error(local_inventory: Path) -> None:
    from flagops.errors import RunError

    with pytest.raises(RunError, match="playbook not found"):
        runner.run_playbook("no-such-playbook", local_inventory, {})


PROGRESS_PLAYBOOK = """\
- hosts: all
  gather_facts: false
  tasks:
    - name: a long job
      ansible.builtin.command: sleep 8
      async: 60
      poll: 0
      register: job
    - name: its progress record
      ansible.builtin.copy:
        dest: "{progress}"
        content: '{{"bytes_done": 1073741824, "bytes_total": 4294967296, "rate_Bps": 95000000,
          "eta_s": 33.9, "files_done": 2, "files_total": 10}}'
    - name: downloading (bytes, rate, ETA)
      flagops_weights_status:
        jid: "{{{{ job.ansible_job_id }}}}"
        progress_file: "{progress}"
        wait_s: 0.3
      register: st
      until: st.finished | default(false)
      retries: 100
      delay: 0
"""


def test_polled_progress_reaches_json_and_live_view(tmp_path: Path, local_inventory: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """roles/weights' status poll: each retry's progress record is a flagops_progress event."""
    lib = tmp_path / "library"
    lib.mkdir()
    (lib / "flagops_weights_status.py").symlink_to(
        Path(runner.__file__).resolve().parents[1] / "roles" / "weights" / "library" / "flagops_weights_status.py")
    pb = tmp_path / "progress.yml"
    pb.write_text(PROGRESS_PLAYBOOK.format(progress=tmp_path / "progress.json"))
    events: list[dict[str, Any]] = []
    result = runner.run_playbook(str(pb), local_inventory, {}, json_out=True, on_event=events.append)
    assert result.ok, result.failures
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    prog = [ln for ln in lines if ln["event"] == "flagops_progress"]
    assert prog, [ln["event"] for ln in lines]
    assert prog[0]["progress"]["bytes_done"] == 1 << 30 and prog[0]["progress"]["eta_s"] == 33.9
    assert prog[0]["task"] == "downloading (bytes, rate, ETA)"
    retry = next(e for e in events if e.get("event") == "runner_retry")
    assert runner.progress_text(retry["event_data"]["res"]["progress"]) == (
        "1.00/4.00 GiB 25% 95.0 MB/s ETA 34s files 2/10")
    final = [e for e in events if e.get("event") == "runner_on_ok" and e["event_data"]["task"].startswith("downl")]
    assert final and final[0]["event_data"]["res"]["finished"] is True
    assert not (tmp_path / "progress.json").exists()  # the poll removes the record with the job


def test_each_run_uses_its_own_environment_not_a_stale_env_file(tmp_path: Path, local_inventory: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """ansible-runner lets <runs>/env/envvars (written by the first run of any flagops
    sharing $FLAGOPS_HOME) override every later run's environment; flagops' run must not."""
    from flagops import state

    env_dir = state.runs_dir() / "env"
    env_dir.mkdir(parents=True, exist_ok=True)
    (env_dir / "envvars").write_text(json.dumps({"FLAGOPS_TEST_MARK": "stale", "ANSIBLE_ROLES_PATH": "/nowhere"}))
    real = runner.ansible_env
    monkeypatch.setattr(runner, "ansible_env", lambda: {**real(), "FLAGOPS_TEST_MARK": "this-run"})
    pb = tmp_path / "env.yml"
    pb.write_text("- hosts: all\n  gather_facts: false\n  tasks:\n    - name: mark\n"
                  "      ansible.builtin.debug:\n        msg: \"{{ lookup('env', 'FLAGOPS_TEST_MARK') }}\"\n")
    events: list[dict[str, Any]] = []
    result = runner.run_playbook(str(pb), local_inventory, {}, json_out=True, on_event=events.append)
    assert result.ok
    msg = next(e["event_data"]["res"]["msg"] for e in events if e.get("event") == "runner_on_ok")
    assert msg == "this-run"
    assert not (env_dir / "envvars").exists()
