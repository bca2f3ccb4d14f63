"""How `flagops status` derives the service state from what it observed."""

from __future__ import annotations

from typing import Any

import pytest

from flagops.service import STAGES, ServiceState, derive_state

S = ServiceState
HEALTHY = dict(unreachable=False, problems=False, recorded=True, alive=True, health=200, ray_members=True,
               ray_ready=True, listed=True, probed=True, served=True)


def state(**changes: Any) -> ServiceState:
    return derive_state(**{**HEALTHY, **changes})


@pytest.mark.parametrize(("changes", "expected"), [
    ({}, S.SERVING),
    ({"probed": False, "served": False}, S.MODEL_LISTED),           # listed, not probed: not claimed SERVING
    ({"served": False}, S.MODEL_LISTED),                             # probed and the completion failed
    ({"listed": False, "served": False}, S.LOADING),                 # /health answers, model not listed yet
    ({"health": 0, "listed": False, "served": False}, S.LOADING),    # Ray complete, API not up yet
    ({"health": 0, "listed": False, "served": False, "ray_ready": False}, S.RAY_FORMING),
    ({"problems": True}, S.DEGRADED),                                # a container/process/Ray member is gone
    ({"unreachable": True, "problems": True}, S.UNREACHABLE),        # most severe first
    ({"unreachable": True, "recorded": False, "health": 0, "ray_members": False}, S.UNREACHABLE),
    ({"recorded": False, "health": 0, "ray_members": False, "alive": False, "listed": False}, S.STOPPED),
    ({"recorded": False, "health": 0, "ray_members": True, "ray_ready": False, "alive": False, "listed": False,
      "served": False}, S.STOPPED),                                  # stray Ray members but nothing recorded
    ({"recorded": False, "health": 0, "ray_members": True, "problems": True}, S.DEGRADED),
])
def test_derive_state(changes: dict[str, Any], expected: ServiceState) -> None:
    assert state(**changes) is expected


def test_states_are_one_enum_and_serialise_as_their_names() -> None:
    import json

    assert STAGES == (S.RAY_FORMING, S.RAY_READY, S.LOADING, S.MODEL_LISTED, S.SERVING)
    assert json.dumps({"state": S.SERVING}) == '{"state": "SERVING"}' and f"{S.DEGRADED}" == "DEGRADED"
    assert {s for s in S if s.settled} == {S.SERVING, S.MODEL_LISTED, S.STOPPED}


# --------------------------------------------------------------------------- engine deaths (issue 16 §2)

from flagops.service import engine_deaths  # noqa: E402

RECORD = {"pid": 4242, "started_at": "2026-12-03T14:00:00.123456Z",
          "containers_started_at": {"node1": "2026-12-03T13:00:00.5Z", "node2": "2026-12-03T13:00:01.5Z"}}


def ctr(node2_started: str = "2026-12-03T13:00:01.5Z", running: bool = True) -> dict[str, Any]:
    return {"node1": {"reachable": True, "running": True, "started_at": "2026-12-03T13:00:00.5Z"},
            "node2": {"reachable": True, "running": running, "started_at": node2_started}}


def test_unchanged_containers_and_no_dead_worker_is_no_death() -> None:
    assert engine_deaths(RECORD, ctr(), "flagos") == []


def test_container_restarted_after_the_service_names_the_node_at_once() -> None:
    (d,) = engine_deaths(RECORD, ctr("2026-12-03T14:05:07.987654321Z"), "flagos")
    assert d["node"] == "node2" and d["what"] == "container flagos"
    assert "node2: container flagos started at 2026-12-03T14:05:07.987654321Z" in d["reason"]
    assert "rebooted or the container was restarted" in d["reason"]


def test_old_record_without_container_times_compares_with_the_service_start() -> None:
    old = {k: v for k, v in RECORD.items() if k != "containers_started_at"}
    assert engine_deaths(old, ctr(), "flagos") == []  # started before the service: fine
    assert [d["node"] for d in engine_deaths(old, ctr("2026-12-03T14:00:09Z"), "flagos")] == ["node2"]


def test_stopped_container_is_not_judged_here_and_no_record_judges_nothing() -> None:
    assert engine_deaths(RECORD, ctr("0001-01-01T00:00:00Z", running=False), "flagos") == []
    assert engine_deaths(None, ctr("2026-12-03T14:05:07Z"), "flagos") == []


def test_dead_engine_worker_names_node_and_pid() -> None:
    (d,) = engine_deaths(RECORD, ctr(), "flagos",
                         [{"node": "node2", "pid": 812, "name": "RayWorkerProc_PP1", "cause": "WORKER_DIED"}])
    assert d["node"] == "node2" and d["pid"] == 812
    assert d["reason"] == "node2: engine worker RayWorkerProc_PP1 (pid 812) is dead (WORKER_DIED)"


@pytest.mark.parametrize("changes", [
    {"listed": False, "served": False, "health": 0},     # the API went down with the engine: was LOADING
    {"listed": False, "served": False, "health": 500},
    {"problems": True},
])
def test_recorded_service_with_a_dead_engine_is_failed_never_loading(changes: dict[str, Any]) -> None:
    assert state(engine_dead=True, **changes) is S.FAILED
    assert not S.FAILED.settled


def test_engine_dead_without_a_record_keeps_the_old_judgement() -> None:
    assert state(engine_dead=True, recorded=False, health=0, ray_members=False) is S.STOPPED
    assert state(engine_dead=True, unreachable=True) is S.UNREACHABLE


def test_recovering_wins_while_the_supervisor_restarts_even_over_an_unreachable_rebooting_node() -> None:
    from flagops.service import ServiceState, derive_state

    base = dict(unreachable=True, problems=True, recorded=True, alive=False, health=0, ray_members=False,
                ray_ready=False, listed=False, probed=True, served=False, engine_dead=True)
    assert derive_state(**base, recovering=True) is ServiceState.RECOVERING
    assert derive_state(**base) is ServiceState.UNREACHABLE
    assert derive_state(**{**base, "unreachable": False}) is ServiceState.FAILED
    # nothing recorded (stopped): a stale supervisor status never makes it RECOVERING
    assert derive_state(**{**base, "unreachable": False, "recorded": False, "engine_dead": False,
                           "problems": False}, recovering=True) is ServiceState.STOPPED


# --------------------------------------------------------------------------- deploy's SUPERVISED stage

SUP = {"known": True, "present": True, "running": True, "container": "flagops-supervisor-ernie45",
       "generation": "g1", "state": "WATCHING", "serving_pid": 201, "restart_count": 0, "last_cause": None,
       "reason": None}
PROC = {"recorded": True, "alive": True, "pid": 201, "record": {"generation": "g1", "pid": 201}}


@pytest.mark.parametrize(("sup", "proc", "verdict", "words"), [
    ({}, {}, "armed", "WATCHING pid 201"),
    ({"present": False, "running": False}, {}, "absent", ""),                     # serve_supervise off
    ({"state": "FAILED", "reason": "3 restarts", "last_cause": "node2: died"}, {}, "failed", "node2: died"),
    ({"state": "RECOVERING", "restart_count": 1, "last_cause": "node2: unreachable"}, {}, "wait",
     "recovering (restart 1): node2: unreachable"),
    ({"state": "STARTING", "serving_pid": None}, {}, "wait", "not yet seen pid 201 serve"),
    # its restart rewrote the record (pid 202) but it has not seen that process serve yet
    ({"serving_pid": 201}, {"pid": 202, "record": {"generation": "g1", "pid": 202}}, "wait", "pid 202"),
    ({"generation": "g0"}, {}, "wait", "not yet on this deploy"),                 # the old supervisor's status
    ({"running": False}, {}, "wait", "not running"),
    ({"known": False, "reason": "ssh: timeout"}, {}, "wait", "ssh: timeout"),
    ({}, {"alive": False}, "wait", "not yet seen"),                              # the process it saw is gone
    ({"restart_count": 1, "last_cause": "node2: rebooted"}, {}, "armed", "after 1 restart(s), last: node2: rebooted"),
])
def test_deploy_returns_only_once_the_supervisor_has_seen_the_recorded_process_serve(
        sup: dict[str, Any], proc: dict[str, Any], verdict: str, words: str) -> None:
    from flagops.service import judge_supervision

    got, detail = judge_supervision({**SUP, **sup}, {**PROC, **proc})
    assert got == verdict
    assert words in detail
