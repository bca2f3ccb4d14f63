"""The one Ansible driver: run a playbook through ansible-runner and report progress.

``$FLAGOPS_HOME/runs`` is ansible-runner's private data dir; every playbook run is one
artifact dir ``runs/artifacts/<timestamp>-<playbook>-<random>/``, named (``ident``) and
rotated (``rotate_artifacts``, the newest ``KEEP_RUNS``) by ansible-runner itself.
``ANSIBLE_CONFIG``, roles and playbooks come from the installed package
(:mod:`flagops.resources`), the collections from ``$FLAGOPS_HOME/collections``, so the CLI
works from any directory.

Secrets: credentials never travel as extra vars; playbooks read them with
``lookup('env', ...)`` from the controller's environment. Extra vars are written by us to
``runs/vars/<ident>.json`` (mode 600, passed as ``-e @file``, never as values in argv) and
removed after the run. ansible-runner also records the full process environment in
``artifacts/<ident>/command``; we redact secret-looking variables there as soon as the run
starts and again at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from flagops import resources, state
from flagops.errors import RunError

KEEP_RUNS = 10
SECRET_ENV_RE = re.compile(r"PASS|TOKEN|SECRET|CREDENTIAL|PRIVATE|API_KEY|_KEY$|^AWS_", re.I)
REDACTED = "**redacted by flagops**"

_HOST_EVENTS = {
    "runner_on_ok": "ok",
    "runner_on_failed": "failed",
    "runner_on_skipped": "skipped",
    "runner_on_unreachable": "unreachable",
}


@dataclass
class HostRecap:
    ok: int = 0
    changed: int = 0
    failed: int = 0
    unreachable: int = 0
    skipped: int = 0
    rescued: int = 0
    ignored: int = 0


@dataclass
class Result:
    """Outcome of one playbook run."""

    playbook: str
    rc: int
    status: str
    recap: dict[str, HostRecap]
    artifact_dir: Path
    elapsed: float
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.rc == 0 and self.status == "successful"

    def to_dict(self) -> dict[str, Any]:
        return {
            "playbook": self.playbook,
            "rc": self.rc,
            "status": self.status,
            "ok": self.ok,
            "elapsed": round(self.elapsed, 3),
            "recap": {h: vars(r) for h, r in self.recap.items()},
            "failures": self.failures,
            "artifact_dir": str(self.artifact_dir),
        }


class Interrupted(RunError):
    """The run was stopped by SIGINT (Ctrl-C) or SIGTERM; ansible-playbook was stopped too."""

    exit_code = 130


# --------------------------------------------------------------------------- views


@dataclass
class _Task:
    name: str
    started: float
    hosts: dict[str, str] = field(default_factory=dict)  # host -> running|ok|changed|...
    ended: float | None = None
    progress: str = ""  # the latest progress record of a polled task (weights download)


def _progress(ev: dict[str, Any]) -> dict[str, Any] | None:
    """The progress record a polled task returns on each retry (roles/weights), if any."""
    if ev.get("event") != "runner_retry":
        return None
    res = (ev.get("event_data") or {}).get("res")
    prog = res.get("progress") if isinstance(res, dict) else None
    return prog if isinstance(prog, dict) and "bytes_done" in prog else None


def progress_text(p: dict[str, Any]) -> str:
    """``1.2/4.0 GiB 31% 95.3 MB/s ETA 30s`` from a progress record."""
    done, total = p.get("bytes_done") or 0, p.get("bytes_total") or 0
    pct = f" {100 * done / total:.0f}%" if total else ""
    rate = p.get("rate_Bps") or 0
    eta = p.get("eta_s")
    eta_s = f" ETA {eta:.0f}s" if isinstance(eta, (int, float)) else ""
    files = f" files {p.get('files_done', 0)}/{p.get('files_total', 0)}" if p.get("files_total") else ""
    return f"{done / 2**30:.2f}/{total / 2**30:.2f} GiB{pct} {rate / 1e6:.1f} MB/s{eta_s}{files}"


class JsonView:
    """One compact JSON object per line (no rich, no colour) for machines."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout

    def emit(self, obj: dict[str, Any]) -> None:
        self.stream.write(json.dumps(obj, default=str, sort_keys=True) + "\n")
        self.stream.flush()

    def start(self) -> None:  # noqa: D102 - views share one interface
        pass

    def event(self, ev: dict[str, Any]) -> None:
        data = ev.get("event_data") or {}
        rec: dict[str, Any] = {
            "event": ev.get("event"),
            "counter": ev.get("counter"),
            "created": ev.get("created"),
        }
        for key in ("play", "task", "host", "task_action", "task_uuid", "duration"):
            if data.get(key) is not None:
                rec[key] = data[key]
        res = data.get("res")
        if isinstance(res, dict):
            rec["changed"] = bool(res.get("changed"))
            if ev.get("event") in ("runner_on_failed", "runner_on_unreachable"):
                rec["msg"] = _failure_msg(res)
        if ev.get("event") == "playbook_on_stats":
            rec["recap"] = {h: vars(r) for h, r in _recap(data).items()}
        prog = _progress(ev)
        if prog is not None:
            rec["event"] = "flagops_progress"
            rec["progress"] = {k: prog.get(k) for k in (
                "bytes_done", "bytes_total", "rate_Bps", "eta_s", "files_done", "files_total", "file")}
        self.emit(rec)

    def finish(self, result: Result) -> None:
        self.emit({"event": "flagops_result", **result.to_dict()})


class RichView:
    """A line per finished task (per-host status + elapsed) and a live line for the
    running one (task, hosts still running, elapsed so far)."""

    STYLE = {"ok": "green", "changed": "yellow", "failed": "bold red",
             "unreachable": "bold red", "skipped": "cyan", "running": "dim"}

    def __init__(self, console: Any = None) -> None:
        from rich.console import Console

        self.console = console or Console()
        self.task: _Task | None = None
        self.live: Any = None
        self.play = ""

    def start(self) -> None:
        from rich.live import Live

        self.live = Live(self._render_current(), console=self.console, refresh_per_second=8,
                         transient=True, get_renderable=self._render_current)
        self.live.start()

    def _hosts_text(self, task: _Task) -> Any:
        from rich.text import Text

        text = Text()
        by_state: dict[str, list[str]] = {}
        for host, st in task.hosts.items():
            by_state.setdefault(st, []).append(host)
        for st in ("failed", "unreachable", "changed", "ok", "skipped", "running"):
            if st in by_state:
                text.append(f" {st}: ", style=self.STYLE[st])
                text.append(",".join(by_state[st]))
        return text

    def _render_current(self) -> Any:
        from rich.spinner import Spinner
        from rich.text import Text

        if self.task is None:
            return Text("")
        elapsed = time.monotonic() - self.task.started
        line = Text(f"{elapsed:6.1f}s  {self.task.name}")
        line.append_text(self._hosts_text(self.task))
        if self.task.progress:
            line.append("  " + self.task.progress, style="cyan")
        return Spinner("dots", text=line)

    def _close_task(self) -> None:
        from rich.text import Text

        task = self.task
        if task is None:
            return
        task.ended = time.monotonic()
        line = Text(f"{task.ended - task.started:6.1f}s  ", style="dim")
        line.append(task.name, style="bold" if any(
            s in ("failed", "unreachable") for s in task.hosts.values()) else "")
        line.append_text(self._hosts_text(task))
        self.console.print(line)
        self.task = None

    def event(self, ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        data = ev.get("event_data") or {}
        if kind == "playbook_on_play_start":
            self._close_task()
            self.play = data.get("play", "")
            self.console.print(f"[bold]PLAY[/] {self.play}")
        elif kind in ("playbook_on_task_start", "playbook_on_handler_task_start"):
            self._close_task()
            prefix = "handler: " if kind == "playbook_on_handler_task_start" else ""
            self.task = _Task(prefix + (data.get("task") or data.get("name") or "?"), time.monotonic())
        elif kind == "runner_retry" and self.task is not None and _progress(ev) is not None:
            self.task.progress = progress_text(_progress(ev) or {})
        elif kind == "runner_on_start" and self.task is not None:
            self.task.hosts.setdefault(data.get("host", "?"), "running")
        elif kind in _HOST_EVENTS and self.task is not None:
            res = _res(data)
            st = _HOST_EVENTS[kind]
            if st == "ok" and res.get("changed"):
                st = "changed"
            if st == "failed" and data.get("ignore_errors"):
                st = "ok"
            self.task.hosts[data.get("host", "?")] = st
            if kind in ("runner_on_failed", "runner_on_unreachable") and not data.get("ignore_errors"):
                from rich.text import Text

                # Text, not markup: task output may contain [brackets].
                self.console.print(Text(f"    {data.get('host')}: {_failure_msg(res)}", style="red"))
        elif kind == "playbook_on_stats":
            self._close_task()

    def finish(self, result: Result) -> None:
        from rich.table import Table

        self._close_task()
        if self.live is not None:
            self.live.stop()
        table = Table(title=f"{result.playbook}: {result.status} (rc={result.rc}, "
                            f"{result.elapsed:.1f}s)", title_justify="left")
        for col in ("host", "ok", "changed", "failed", "unreachable", "skipped"):
            table.add_column(col, justify="left" if col == "host" else "right")
        for host, r in result.recap.items():
            table.add_row(host, str(r.ok), str(r.changed), str(r.failed), str(r.unreachable),
                          str(r.skipped))
        self.console.print(table)
        for f in result.failures:
            if f.get("host") is None:
                from rich.text import Text

                self.console.print(Text(str(f["msg"]), style="red"))


def _res(event_data: dict[str, Any]) -> dict[str, Any]:
    res = event_data.get("res")
    return res if isinstance(res, dict) else {}


def _failure_msg(res: dict[str, Any]) -> str:
    msg = res.get("msg") or res.get("reason") or ""
    if not isinstance(msg, str):
        msg = json.dumps(msg, default=str)
    # A failed command's own words are the explanation: add the tail of its output.
    out = res.get("stderr") or res.get("stdout") or ""
    if isinstance(out, str) and out.strip():
        tail = out.strip().splitlines()[-15:]
        msg = (msg.strip() + "\n" if msg.strip() else "") + "\n".join(tail)
    # Keep every line: preflight reports all failures of all nodes in one message.
    # A long line keeps its head and its tail: the cause ("connection refused") is often
    # at the end of a long one (docker's "Error pulling image ... 500 Server Error for <url>: ...").
    lines = [ln if len(ln) <= 400 else ln[:200] + " ... " + ln[-195:] for ln in msg.strip().splitlines()[:60]]
    return "\n".join(lines) if lines else "failed"


def _recap(stats: dict[str, Any]) -> dict[str, HostRecap]:
    recap: dict[str, HostRecap] = {}
    mapping = {"ok": "ok", "changed": "changed", "failures": "failed", "dark": "unreachable",
               "skipped": "skipped", "rescued": "rescued", "ignored": "ignored"}
    for src, dst in mapping.items():
        for host, n in (stats.get(src) or {}).items():
            setattr(recap.setdefault(host, HostRecap()), dst, int(n))
    for host in stats.get("processed") or {}:
        recap.setdefault(host, HostRecap())
    return recap


# --------------------------------------------------------------------------- driver


# Files ansible-runner reads from <private_data_dir>/env/ and lets override the run's kwargs.
STALE_ENV_FILES = ("envvars", "cmdline", "extravars", "settings", "passwords", "ssh_key")


def ansible_env() -> dict[str, str]:
    """Environment that makes ansible-playbook use this checkout's config and content."""
    # ansible-runner execs `ansible-playbook` from PATH: use the one next to this Python
    # so a non-activated venv (console script, tests) still finds it.
    from flagops.loader import INVENTORY_ENV

    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {
        **INVENTORY_ENV,
        "PATH": path,
        "ANSIBLE_CONFIG": str(resources.data("ansible.cfg")),
        "ANSIBLE_ROLES_PATH": str(resources.data("roles")),
        "ANSIBLE_COLLECTIONS_PATH": str(resources.collections_dir()),
        # Keep module arguments (which may carry templated secrets) out of the output.
        "ANSIBLE_DISPLAY_ARGS_TO_STDOUT": "False",
        "ANSIBLE_NOCOLOR": "1",
        "PYTHONUNBUFFERED": "1",
    }


def _playbook_path(name: str) -> Path:
    if name.endswith((".yml", ".yaml")) or os.sep in name:
        return Path(name).resolve()
    return resources.playbook(name)


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def redact_command_artifacts(artifact_dir: Path) -> None:
    """Replace secret-looking env values in ansible-runner's ``command`` artifact."""
    for cmd_file in artifact_dir.glob("command"):
        try:
            data = json.loads(cmd_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        env = data.get("env")
        if isinstance(env, dict):
            data["env"] = {k: (REDACTED if SECRET_ENV_RE.search(k) else v) for k, v in env.items()}
            _write_private(cmd_file, json.dumps(data, ensure_ascii=False))


def run_playbook(
    name: str,
    inventory: str | os.PathLike[str],
    extravars: dict[str, Any] | None = None,
    *,
    check: bool = False,
    diff: bool = False,
    tags: str | None = None,
    skip_tags: str | None = None,
    limit: str | None = None,
    json_out: bool = False,
    view: Any = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> Result:
    """Run ``playbooks/<name>.yml`` (or a playbook path) against ``inventory``.

    Args:
        name: playbook name under playbooks/ (``provision``) or a path to a .yml file.
        inventory: inventory file path.
        extravars: extra vars (``{"flagops": {...}}``); must not contain credentials.
        check, diff, tags, skip_tags, limit: ansible-playbook's options of the same name.
        json_out: one JSON object per event on stdout instead of the rich view.
        view: a custom view (tests); default JsonView or RichView.
        on_event: also called with every raw ansible-runner event.

    Returns:
        :class:`Result` with rc, status and the per-host recap. ``rc != 0`` on failure.
    """
    import ansible_runner

    playbook = _playbook_path(name)
    if not playbook.is_file():
        from flagops.errors import RunError

        raise RunError(f"playbook not found: {playbook}")
    resources.ensure_collections(say=lambda msg: print(msg, file=sys.stderr))
    runs = state.runs_dir()
    # Unique even for two runs in the same second (the random part), sortable by time.
    ident = f"{time.strftime('%Y%m%d-%H%M%S')}-{playbook.stem}-{secrets.token_hex(3)}"
    artifact_dir = runs / "artifacts" / ident
    vars_file = runs / "vars" / f"{ident}.json"
    _write_private(vars_file, json.dumps(extravars or {}))

    cmdline = " ".join([f"-e @{vars_file}", *(flag for flag, on in (("--check", check), ("--diff", diff)) if on)])
    the_view = view or (JsonView() if json_out else RichView())
    redacted = False

    def handler(ev: dict[str, Any]) -> bool:
        nonlocal redacted
        if not redacted:
            redact_command_artifacts(artifact_dir)
            redacted = True
        if on_event is not None:
            on_event(ev)
        the_view.event(ev)
        return True  # keep the event in artifacts/job_events

    kwargs: dict[str, Any] = {
        "private_data_dir": str(runs),
        "project_dir": str(playbook.parent),
        "playbook": str(playbook),
        "inventory": str(Path(inventory).resolve()),
        "envvars": ansible_env(),
        "event_handler": handler,
        "quiet": True,
        "rotate_artifacts": KEEP_RUNS,
        "ident": ident,
        "cmdline": cmdline,
        # ansible-runner otherwise writes envvars/cmdline into runs/env/ on the first run and
        # from then on lets that file override every later run's values: every checkout or
        # installed flagops sharing this $FLAGOPS_HOME then ran the first one's ansible.cfg
        # and roles (seen on the lab: a worktree's playbook with /tmp/ci's roles path).
        "suppress_env_files": True,
    }
    for stale in STALE_ENV_FILES:  # left by an earlier flagops (or another checkout); we hold the lock
        with contextlib.suppress(FileNotFoundError):
            (runs / "env" / stale).unlink()
    if tags:
        kwargs["tags"] = tags
    if skip_tags:
        kwargs["skip_tags"] = skip_tags
    if limit:
        kwargs["limit"] = limit

    # Ctrl-C must not leave ansible-playbook running without us (or a traceback): the
    # signal only sets a flag, ansible-runner's cancel callback sees it within its poll
    # interval and kills the playbook's process group; the lock is released on the way out.
    interrupted: list[str] = []
    kwargs["cancel_callback"] = lambda: bool(interrupted)
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, _frame: interrupted.append(signal.Signals(signum).name))

    started = time.monotonic()
    the_view.start()
    try:
        r = ansible_runner.run(**kwargs)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        with contextlib.suppress(OSError):
            vars_file.unlink()
        redact_command_artifacts(artifact_dir)
    stats = r.stats or {}
    failures = []
    for ev in r.events:
        if ev.get("event") in ("runner_on_failed", "runner_on_unreachable"):
            data = ev.get("event_data") or {}
            if data.get("ignore_errors"):
                continue
            res = _res(data)
            failures.append({"host": data.get("host"), "task": data.get("task"),
                             "msg": _failure_msg(res)})
    if r.rc and not failures:
        # ansible-playbook died before any task (syntax error, bad inventory): its
        # stdout is the only explanation.
        tail = [ln for ln in (r.stdout.read() if r.stdout else "").splitlines() if ln.strip()]
        failures.append({"host": None, "task": None, "msg": "\n".join(tail[-5:]) or "failed"})
    result = Result(
        playbook=playbook.stem,
        rc=int(r.rc if r.rc is not None else 1),
        status=str(r.status),
        recap=_recap(stats),
        artifact_dir=artifact_dir,
        elapsed=time.monotonic() - started,
        failures=failures,
    )
    the_view.finish(result)
    if interrupted:
        raise Interrupted(
            f"{playbook.stem} interrupted by {interrupted[0]} after {result.elapsed:.1f}s; "
            f"ansible-playbook was stopped and the lock released. Re-run to converge "
            f"(run artifacts: {artifact_dir})"
        )
    return result
