"""Controller-side state under ``$FLAGOPS_HOME`` (default ``~/.flagops``).

- ``state.json``: the last inventory path and release, so later commands can omit ``-i``;
- ``lock``: an ``fcntl`` lock held for the whole of a run that changes hosts, with a JSON
  holder record (pid, host, start time, command) so a refused run can say who holds it;
- ``runs/``: ansible-runner private data dirs (see :mod:`flagops.runner`).

The kernel drops an ``fcntl`` lock when its holder dies, so a dead holder can never
block; the record it leaves behind is only reported ("taking over from dead pid N").
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flagops.errors import LockError


def home() -> Path:
    """``$FLAGOPS_HOME`` or ``~/.flagops``, created on first use (mode 700: run
    artifacts can hold host facts)."""
    path = Path(os.environ.get("FLAGOPS_HOME") or Path.home() / ".flagops").expanduser()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def runs_dir() -> Path:
    path = home() / "runs"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


# --------------------------------------------------------------------------- state.json


def _state_path() -> Path:
    return home() / "state.json"


def read_state() -> dict[str, Any]:
    try:
        data = json.loads(_state_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_state(**updates: Any) -> dict[str, Any]:
    """Merge ``updates`` into state.json atomically (write + rename)."""
    data = read_state()
    data.update(updates)
    data["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    path = _state_path()
    tmp = path.with_suffix(f".tmp.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return data


def remember(inventory: str | os.PathLike[str], release: str) -> None:
    write_state(last_inventory=str(Path(inventory).resolve()), last_release=release)


def last_inventory() -> str | None:
    value = read_state().get("last_inventory")
    return value if isinstance(value, str) else None


# --------------------------------------------------------------------------- lock


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    started_at: float
    command: str

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_at))
        return f"pid {self.pid} on {self.host} since {started}: {self.command}"


def _read_holder(path: Path) -> Holder | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Holder(int(data["pid"]), str(data["host"]), float(data["started_at"]),
                      str(data["command"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def lock(command: str | None = None, *, on_takeover: Any = None) -> Iterator[Holder]:
    """Hold ``$FLAGOPS_HOME/lock`` for the duration of the ``with`` block.

    Args:
        command: what this run does (stored in the holder record); default ``sys.argv``.
        on_takeover: called with the stale :class:`Holder` when a dead run's record is
            found and replaced (the CLI prints a notice).

    Raises:
        LockError: another live flagops process holds the lock; the message names it.
    """
    lock_path = home() / "lock"
    holder_path = home() / "lock.json"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = _read_holder(holder_path)
            who = other.describe() if other else "another flagops process"
            raise LockError(
                f"another flagops run holds {lock_path} ({who}); wait for it to finish"
            ) from None
        stale = _read_holder(holder_path)
        if stale and stale.pid != os.getpid() and on_takeover is not None:
            # Same host and the pid is gone, or another host (shared home): either way the
            # flock is ours, so the record is stale.
            on_takeover(stale)
        me = Holder(os.getpid(), socket.gethostname(), time.time(),
                    command or " ".join(["flagops", *sys.argv[1:]]))
        tmp = holder_path.with_suffix(f".tmp.{os.getpid()}")
        tmp.write_text(json.dumps(asdict(me)) + "\n", encoding="utf-8")
        os.replace(tmp, holder_path)
        try:
            yield me
        finally:
            with contextlib.suppress(OSError):
                if (_read_holder(holder_path) or me).pid == me.pid:
                    holder_path.unlink()
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def stale_holder() -> Holder | None:
    """The holder record of a run that died without cleaning up, if any."""
    holder = _read_holder(home() / "lock.json")
    if holder and holder.host == socket.gethostname() and not pid_alive(holder.pid):
        return holder
    return None
