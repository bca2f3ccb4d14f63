"""The supervisor (roles/serve/files/supervisor.py) against a fake Docker API and fake HTTP:
what it calls a failure, its backoff and crash-loop limit, its log rotation, its record."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("flagops_supervisor", REPO / "roles/serve/files/supervisor.py")
sup = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sup)  # type: ignore[union-attr]

T0 = "2026-12-03T10:00:00.000000000Z"


class FakeDocker:
    """The master's FlagOS container and, through its ssh, node2's."""

    def __init__(self) -> None:
        self.started = {"node1": T0, "node2": T0}
        self.alive_pids = {100: "555"}
        self.launches = 0
        self.launch_ok = True
        self.calls: list[list[str]] = []

    def inspect(self, name: str) -> dict[str, Any]:
        t = self.started["node1"]
        return {"State": {"Running": t is not None, "StartedAt": t},
                "Config": {"Labels": {"io.flagops.managed": "true"}}}

    def start(self, name: str) -> bool:
        return True

    def logs(self, name: str, tail: int = 500) -> str:
        return "container log\n"

    def exec(self, name: str, argv: list[str], timeout: float = 60) -> tuple[int, str]:
        self.calls.append(argv)
        if argv[0] == "ssh":
            cmd = argv[-1]
            if "docker inspect" in cmd:
                t = self.started["node2"]
                return (0, f"true {t}\n") if t else (255, "ssh: connect: No route to host")
            return 0, "worker log\n"
        if argv[0] == "awk":
            pid = int(argv[-1].split("/")[2])
            return (0, self.alive_pids[pid] + "\n") if pid in self.alive_pids else (2, "")
        if argv[:2] == ["bash", "-c"] and "flagscale serve" in argv[2]:
            self.launches += 1
            if not self.launch_ok:
                return 1, "launch failed"
            pid = 200 + self.launches
            self.alive_pids[pid] = "777"
            return 0, f"{pid}\n"
        return 0, ""


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    state = tmp_path / "svc.json"
    rec = {"generation": "g1", "pid": 100, "pid_start": "555", "started_at": "2026-12-03T10:00:01Z",
           "containers_started_at": {"node1": T0, "node2": T0}, "version": {"fingerprint": "abc"}}
    state.write_text(json.dumps(rec))
    spec = {"release": "ernie45", "generation": "g1", "container": "flagos", "master": "node1",
            "master_address": "172.30.0.11", "workers": [{"name": "node2", "address": "172.30.0.12", "port": 22}],
            "workdir": "/repos/FlagScale", "serve_name": "ernie45", "before_start": "true", "pid_file": "/p",
            "log_file": "/l", "state_file": str(state), "status_file": str(tmp_path / "status.json"),
            "logs_dir": str(tmp_path / "restarts"), "api_port": 30000, "dashboard_port": 8265, "expected_nodes": 2,
            "model": "/models/m", "owner_label": "io.flagops.managed", "poll_s": 0, "health_failures": 2,
            "backoff_s": [0, 0, 0], "max_restarts": 3, "window_s": 600, "start_timeout_s": 5, "keep_logs": 2,
            "log_lines": 10, "proc_tree": "exit 0"}
    web = {"health": 200, "ray_alive": 2, "actors": []}

    def http_get(url: str, timeout: float = 3) -> tuple[int, bytes]:
        if url.endswith("/health"):
            return web["health"], b""
        if "/v1/models" in url:
            return (200, json.dumps({"data": [{"id": "/models/m"}]}).encode()) if web["health"] == 200 else (0, b"")
        if "/api/v0/nodes" in url:
            rows = [{"node_ip": ip, "node_id": ip, "state": "ALIVE" if i < web["ray_alive"] else "DEAD"}
                    for i, ip in enumerate(["172.30.0.11", "172.30.0.12"])]
            return 200, json.dumps({"data": {"result": {"result": rows}}}).encode()
        if "/api/v0/actors" in url:
            return 200, json.dumps({"data": {"result": {"result": web["actors"]}}}).encode()
        return 0, b""

    monkeypatch.setattr(sup, "http_get", http_get)
    monkeypatch.setattr(sup, "http_post", lambda url, body, timeout: 200 if web["health"] == 200 else 0)
    monkeypatch.setattr(sup, "STOP", False)
    d = FakeDocker()
    return {"spec": spec, "docker": d, "web": web, "state": state, "sup": sup.Supervisor(spec, d)}


def test_a_healthy_service_is_no_failure(env: dict[str, Any]) -> None:
    s = env["sup"]
    rec = json.loads(env["state"].read_text())
    assert [s.failure(rec) for _ in range(3)] == [None, None, None]


@pytest.mark.parametrize("fault, expect", [
    ("worker_container_restarted", "node2: container flagos started at 2026-12-03T10:05"),
    ("master_container_restarted", "node1: container flagos started at 2026-12-03T10:05"),
    ("serve_pid_exited", "node1: serve process 100 exited"),
    ("ray_node_dead", "Ray sees 1/2 nodes alive (dead: node2)"),
    ("actor_dead", "node2: engine worker RayWorkerWrapper pid 42 died"),
])
def test_each_fault_is_named_at_the_first_check(env: dict[str, Any], fault: str, expect: str) -> None:
    d, web, s = env["docker"], env["web"], env["sup"]
    rec = json.loads(env["state"].read_text())
    if fault == "worker_container_restarted":
        d.started["node2"] = "2026-12-03T10:05:00Z"
    elif fault == "master_container_restarted":
        d.started["node1"] = "2026-12-03T10:05:00Z"
    elif fault == "serve_pid_exited":
        d.alive_pids.clear()
    elif fault == "ray_node_dead":
        web["ray_alive"] = 1
    else:
        died = {"actor_died_error_context": {"reason": "WORKER_DIED"}}
        web["actors"] = [{"state": "DEAD", "node_id": "172.30.0.12", "pid": 42, "class_name": "RayWorkerWrapper",
                          "end_time": 1796300000000, "death_cause": died}]
    cause = s.failure(rec)
    assert cause is not None and expect in cause, cause


def test_an_actor_that_died_before_this_start_or_on_purpose_is_ignored(env: dict[str, Any]) -> None:
    env["web"]["actors"] = [
        {"state": "DEAD", "node_id": "172.30.0.12", "pid": 1, "end_time": 1000, "death_cause": {}},  # 1970
        {"state": "DEAD", "node_id": "172.30.0.12", "pid": 2, "end_time": 1796300000000,
         "death_cause": {"actor_died_error_context": {"reason": "RAY_KILL", "error_message": "INTENDED_USER_EXIT"}}},
    ]
    assert env["sup"].failure(json.loads(env["state"].read_text())) is None


def test_health_must_fail_twice_in_a_row_and_unreachable_twice(env: dict[str, Any]) -> None:
    s, rec = env["sup"], json.loads(env["state"].read_text())
    env["web"]["health"] = 503
    assert s.failure(rec) is None
    assert "GET /health -> 503 (2 checks in a row)" in s.failure(rec)
    env["web"]["health"] = 200
    s.bad_health = 0
    env["docker"].started["node2"] = None  # node2 going down: its ssh fails, the engine stops answering
    env["web"]["health"] = 503
    assert s.failure(rec) is None
    cause = s.failure(rec)
    assert "node2: container flagos not running or node unreachable" in cause and "engine GET /health -> 503" in cause


def test_a_worker_only_its_ssh_cannot_reach_is_a_warning_not_a_restart(env: dict[str, Any]) -> None:
    """The master container's key removed from node2 (a rebuilt worker host): Ray still sees
    node2 and the engine answers, so restarting would kill a serving group whose launch needs
    that very ssh. It warns, and acts as soon as the group really loses the node."""
    s, d, web = env["sup"], env["docker"], env["web"]
    rec = json.loads(env["state"].read_text())
    d.started["node2"] = None
    assert [s.failure(rec) for _ in range(4)] == [None] * 4
    assert "node2: container flagos not running or node unreachable" in s.warning
    assert "not restarting" in s.warning
    web["ray_alive"] = 1  # now Ray lost it too
    cause = s.failure(rec)
    assert cause and "node2: container flagos not running" in cause and "Ray sees 1/2 nodes alive" in cause
    web["ray_alive"] = 2
    d.started["node2"] = T0  # ssh back
    assert s.failure(rec) is None and s.warning is None


def test_a_failure_restarts_the_group_records_it_and_serves_again(env: dict[str, Any],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    d, s, web = env["docker"], env["sup"], env["web"]
    d.alive_pids.clear()  # the engine died
    rounds = iter(range(100))

    def stop_when_serving(_s: float) -> None:
        st = json.loads(Path(env["spec"]["status_file"]).read_text())
        if st["state"] == "WATCHING" and st.get("restart_count") or next(rounds) > 50:
            sup.STOP = True

    s.status = {"generation": "g1", "restarts": [], "armed": True, "state": "WATCHING"}
    monkeypatch.setattr(sup.time, "sleep", stop_when_serving)
    assert web["health"] == 200
    s.run()
    st = json.loads(Path(env["spec"]["status_file"]).read_text())
    rec = json.loads(env["state"].read_text())
    assert d.launches == 1
    assert rec["pid"] == 201 and rec["pid_start"] == "777" and rec["restarted_by"] == "supervisor"
    assert rec["generation"] == "g1" and rec["version"] == {"fingerprint": "abc"}  # the deploy's, kept
    assert st["restart_count"] == 1 and st["restarts"][0]["ok"] is True
    assert st["restarts"][0]["cause"] == "node1: serve process 100 exited"
    logs = Path(st["restarts"][0]["logs"])
    assert {p.name for p in logs.iterdir()} >= {"cause.txt", "node1-flagscale.log", "node1-container.log",
                                                "node2-ray.log", "node2-container.log"}


def test_a_crash_loop_ends_in_failed_with_the_cause(env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    d, s = env["docker"], env["sup"]
    d.launch_ok = True
    d.alive_pids.clear()
    orig_restart = s.restart

    def restart_dies(rec: dict[str, Any]) -> tuple[bool, str]:
        ok, detail = orig_restart(rec)
        d.alive_pids.clear()  # every new engine dies at once
        return ok, detail

    s.restart = restart_dies  # type: ignore[method-assign]
    calls = iter(range(1000))

    def until_failed(_s: float) -> None:
        st = json.loads(Path(env["spec"]["status_file"]).read_text())
        if st["state"] == "FAILED" or next(calls) > 500:
            sup.STOP = True

    s.status = {"generation": "g1", "restarts": [], "armed": True, "state": "WATCHING"}
    monkeypatch.setattr(sup.time, "sleep", until_failed)
    s.run()
    st = json.loads(Path(env["spec"]["status_file"]).read_text())
    assert d.launches == 3  # max_restarts
    assert st["restart_count"] == 3 and "did not keep it SERVING" in st["reason"]
    assert "exited while starting" in st["last_cause"]
    # keep_logs 2: the oldest restart's logs were rotated away
    assert len([p for p in Path(env["spec"]["logs_dir"]).iterdir()]) == 2


def test_a_first_start_is_deploys_to_judge_and_another_deploy_is_not_ours(env: dict[str, Any],
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    d, s = env["docker"], env["sup"]
    d.alive_pids.clear()
    env["web"]["health"] = 0
    n = iter(range(10))

    def few(_s: float) -> None:
        if next(n) >= 5:
            sup.STOP = True

    monkeypatch.setattr(sup.time, "sleep", few)
    s.run()  # not armed: a start that never served is not restarted
    assert d.launches == 0
    rec = json.loads(env["state"].read_text())
    rec["generation"] = "g2"  # a newer deploy owns the service now
    env["state"].write_text(json.dumps(rec))
    s2 = sup.Supervisor(env["spec"], d)
    s2.status = {"generation": "g1", "restarts": [], "armed": True}
    sup.STOP = False
    n2 = iter(range(10))
    monkeypatch.setattr(sup.time, "sleep", lambda _s: setattr(sup, "STOP", next(n2) >= 3))
    s2.run()
    assert d.launches == 0
    assert json.loads(Path(env["spec"]["status_file"]).read_text())["state"] == "STOPPED"


@pytest.mark.parametrize("state", ["RECOVERING", "STOPPED"])  # killed / SIGTERM while it launched
def test_a_supervisor_restarted_after_its_own_launch_judges_that_start_not_a_failure(
        env: dict[str, Any], monkeypatch: pytest.MonkeyPatch, state: str) -> None:
    """The script stopped (dockerd started it again) while the group it relaunched was loading:
    a loading engine is its start to wait for, not two failed health checks of a WATCHING one."""
    d, s, web = env["docker"], env["sup"], env["web"]
    rec = json.loads(env["state"].read_text())
    rec.update(pid=201, pid_start="777")
    env["state"].write_text(json.dumps(rec))
    d.alive_pids[201] = "777"
    web["health"] = 0  # loading
    s.status = {"generation": "g1", "armed": True, "state": state, "restart_count": 1,
                "restarts": [{"epoch": sup.time.time() - 1, "cause": "node1: serve process 100 exited",
                              "attempt": 1, "ok": False, "launch": "launched pid 201",
                              "launched_epoch": sup.time.time() - 1}]}
    env["spec"]["start_timeout_s"] = 60
    polls = iter(range(100))

    def load_then_serve(_s: float) -> None:
        i = next(polls)
        web["health"] = 200 if i >= 6 else 0
        st = json.loads(Path(env["spec"]["status_file"]).read_text())
        if st["state"] == "WATCHING" or i > 50:
            sup.STOP = True

    monkeypatch.setattr(sup.time, "sleep", load_then_serve)
    s.run()
    st = json.loads(Path(env["spec"]["status_file"]).read_text())
    assert d.launches == 0, "relaunched a start that was only loading"
    assert st["restarts"][-1]["ok"] is True and st["restarts"][-1]["seconds_to_serving"] >= 0
    assert st["restart_count"] == 1 and st["serving_pid"] == 201


@pytest.mark.parametrize("how", ["sigterm", "kill"])
def test_a_restart_interrupted_before_its_launch_is_no_restart(env: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                               how: str) -> None:
    """The master shutting down: the supervisor sees the engine die, then is stopped itself
    before it launched anything (SIGTERM in its backoff, or killed outright). Back after the
    reboot it restarts the group once: restart 1, not 2, and the crash-loop window agrees."""
    d, s = env["docker"], env["sup"]
    d.alive_pids.clear()  # the engine died with the shutdown
    env["spec"]["backoff_s"] = [5, 5, 5]
    s.status = {"generation": "g1", "restarts": [], "armed": True, "state": "WATCHING"}
    if how == "sigterm":
        monkeypatch.setattr(sup.time, "sleep", lambda _s: setattr(sup, "STOP", True))
        s.run()
    else:  # what a kill -9 in the backoff leaves: RECOVERING, an attempt with no launch
        s.status.update(state="RECOVERING", restart_count=1, restarts=[
            {"at": sup.now_iso(), "epoch": sup.time.time(), "cause": "node1: serve process 100 exited",
             "attempt": 1, "ok": False}])
        s.save()
    assert d.launches == 0
    env["spec"]["backoff_s"] = [0, 0, 0]
    sup.STOP = False
    s2 = sup.Supervisor(env["spec"], d)
    rounds = iter(range(100))

    def until_serving(_s: float) -> None:
        st = json.loads(Path(env["spec"]["status_file"]).read_text())
        if st["state"] == "WATCHING" and d.launches or next(rounds) > 50:
            sup.STOP = True

    monkeypatch.setattr(sup.time, "sleep", until_serving)
    s2.run()
    st = json.loads(Path(env["spec"]["status_file"]).read_text())
    assert d.launches == 1
    assert st["restart_count"] == 1, st
    assert [r.get("interrupted", False) for r in st["restarts"]] == [True, False]
    assert st["restarts"][-1]["attempt"] == 1 and st["restarts"][-1]["ok"] is True


def test_demux_reads_dockers_multiplexed_stream() -> None:
    frame = lambda kind, data: bytes([kind, 0, 0, 0]) + struct.pack(">I", len(data)) + data  # noqa: E731
    assert sup._demux(frame(1, b"out ") + frame(2, b"err")) == "out err"
    assert sup._demux(b"plain text") == "plain text"


def test_the_record_keeps_its_key_order(tmp_path: Path) -> None:
    """The record's release snapshot renders FlagScale's files again on a rollback: sorted keys
    would render other text, another fingerprint and another FlagScale install key."""
    doc = {"version": {"release": {"serve": {"engine_args": {"model": "m", "host": "0.0.0.0", "b": 1, "a": 2}}}}}
    sup.write_json(str(tmp_path / "r.json"), doc)
    back = json.loads((tmp_path / "r.json").read_text())
    assert list(back["version"]["release"]["serve"]["engine_args"]) == ["model", "host", "b", "a"]
