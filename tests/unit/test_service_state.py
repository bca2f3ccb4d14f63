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
