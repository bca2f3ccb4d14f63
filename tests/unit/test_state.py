"""$FLAGOPS_HOME state and the run lock."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
from pathlib import Path

import pytest

from flagops import state
from flagops.errors import LockError


def _hold_lock(ready: multiprocessing.synchronize.Event, release: multiprocessing.synchronize.Event,
               home: str) -> None:
    os.environ["FLAGOPS_HOME"] = home
    with state.lock("flagops provision inv.yaml"):
        ready.set()
        release.wait(30)


def test_state_roundtrip(tmp_path: Path, flagops_home: Path) -> None:
    inv = tmp_path / "inv.yaml"
    inv.write_text("all: {}\n")
    state.remember(inv, "ernie45")
    assert state.last_inventory() == str(inv.resolve())
    data = json.loads((flagops_home / "state.json").read_text())
    assert data["last_release"] == "ernie45"


def test_second_run_is_refused_naming_the_holder(flagops_home: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(ready, release, str(flagops_home)))
    proc.start()
    try:
        assert ready.wait(10)
        with pytest.raises(LockError) as exc, state.lock("flagops deploy"):
            pass
        msg = str(exc.value)
        assert f"pid {proc.pid} on {socket.gethostname()}" in msg
        assert "flagops provision inv.yaml" in msg
    finally:
        release.set()
        proc.join(10)
    with state.lock("after") as me:  # free again once the holder exits
        assert me.pid == os.getpid()
    assert not (flagops_home / "lock.json").exists()


def test_stale_record_of_dead_pid_is_taken_over(flagops_home: Path) -> None:
    dead = multiprocessing.get_context("fork").Process(target=lambda: None)
    dead.start()
    dead.join()
    state.home()  # creates $FLAGOPS_HOME
    (flagops_home / "lock.json").write_text(json.dumps(
        {"pid": dead.pid, "host": socket.gethostname(), "started_at": 0, "command": "flagops provision x"}))
    assert state.stale_holder() is not None and state.stale_holder().pid == dead.pid
    seen = []
    with state.lock("flagops provision y", on_takeover=seen.append) as me:
        holder = json.loads((flagops_home / "lock.json").read_text())
        assert holder["pid"] == me.pid and holder["command"] == "flagops provision y"
    assert [h.pid for h in seen] == [dead.pid]
