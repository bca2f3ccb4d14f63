"""Host processes the lab starts, each recorded by pid and stopped by pid.

A record is ``<lab>/pids/<name>.json``: pid, the kernel start time of that pid (so a
recycled pid is never signalled), argv and log path. Nothing is ever matched by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from flagops.lab import LabError


@dataclass(frozen=True)
class ProcRecord:
    name: str
    pid: int
    start_ticks: int
    argv: list[str]
    log: str


def _start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks); None if no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces
    if fields[0] == "Z":
        return None
    return int(fields[19])


def read(pids_dir: Path, name: str) -> ProcRecord | None:
    try:
        return ProcRecord(**json.loads((pids_dir / f"{name}.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def alive(record: ProcRecord | None) -> bool:
    """True while the recorded process (that very one, not a pid reuse) runs."""
    return record is not None and _start_ticks(record.pid) == record.start_ticks


def start(pids_dir: Path, log_dir: Path, name: str, argv: list[str]) -> ProcRecord:
    """Start ``argv`` detached (own session, output to ``<log_dir>/<name>.log``) and record it."""
    pids_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    ticks = _start_ticks(proc.pid)
    if ticks is None:
        raise LabError(f"{name}: {argv[0]} exited at once; see {log}")
    record = ProcRecord(name, proc.pid, ticks, argv, str(log))
    (pids_dir / f"{name}.json").write_text(json.dumps(asdict(record)))
    return record


def stop(pids_dir: Path, name: str, timeout: float = 10.0) -> bool:
    """SIGTERM the recorded process, SIGKILL after ``timeout``; drop the record. True if one ran."""
    record = read(pids_dir, name)
    ran = alive(record)
    if record is not None and ran:
        _signal(record, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while alive(record) and time.monotonic() < deadline:
            time.sleep(0.1)
        if alive(record):
            _signal(record, signal.SIGKILL)
            while alive(record):
                time.sleep(0.05)
    (pids_dir / f"{name}.json").unlink(missing_ok=True)
    return ran


def _signal(record: ProcRecord, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(record.pid, sig)
    with contextlib.suppress(ChildProcessError):  # reap it if this process is its parent
        os.waitpid(record.pid, os.WNOHANG)


def names(pids_dir: Path) -> list[str]:
    """Every recorded process name."""
    return sorted(p.stem for p in pids_dir.glob("*.json")) if pids_dir.is_dir() else []
