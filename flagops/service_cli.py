"""deploy / status / logs / stop: the service commands (see flagops.service)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from flagops.cli import _emit_json, _resolve_inventory, extravars_for, handle_errors, json_option
from flagops.errors import FlagopsError, RunError

STATE_STYLE = {
    "SERVING": "green",
    "MODEL_LISTED": "yellow",
    "LOADING": "yellow",
    "RAY_READY": "yellow",
    "RAY_FORMING": "yellow",
    "DEGRADED": "red",
    "UNREACHABLE": "red",
    "STOPPED": "dim",
}


def _load(inventory: str | None, release: str | None) -> Any:
    from flagops import config

    return config.load(_resolve_inventory(inventory), release)


def _parse_timeouts(values: tuple[str, ...]) -> dict[str, float]:
    from flagops.service import DEFAULT_TIMEOUTS

    out: dict[str, float] = {}
    for v in values:
        stage, _, secs = v.partition("=")
        stage = stage.strip().upper()
        if stage not in DEFAULT_TIMEOUTS or not secs.replace(".", "", 1).isdigit():
            raise click.BadParameter(f"{v!r}: expected STAGE=SECONDS with STAGE one of {', '.join(DEFAULT_TIMEOUTS)}")
        out[stage] = float(secs)
    return out


def _run(cfg: Any, playbook: str, json_out: bool, **flagops_extra: Any) -> tuple[Any, list[dict[str, Any]]]:
    from flagops import runner, state

    extravars = extravars_for(cfg)
    extravars["flagops"].update(flagops_extra)
    facts: list[dict[str, Any]] = []

    def on_event(ev: dict[str, Any]) -> None:
        if ev.get("event") == "runner_on_ok":
            res = (ev.get("event_data") or {}).get("res") or {}
            if isinstance(res, dict) and res.get("ansible_facts"):
                facts.append(res["ansible_facts"])

    def notice(stale: state.Holder) -> None:
        click.echo(f"note: taking over the lock left by a dead run ({stale.describe()})", err=True)

    with state.lock(f"flagops {playbook} {cfg.inventory_file}", on_takeover=notice):
        result = runner.run_playbook(playbook, cfg.inventory_file, extravars, json_out=json_out, on_event=on_event)
    if not result.ok:
        where = ", ".join(f"{f['host']}: {f['task']}: {f['msg']}" for f in result.failures)
        raise RunError(f"{playbook} failed (ansible rc={result.rc}): {where}")
    return result, facts


@click.command()
@click.argument("release")
@click.option("-i", "--inventory", metavar="INVENTORY", help="Default: the last provisioned inventory.")
@click.option(
    "--timeout",
    "timeouts",
    multiple=True,
    metavar="STAGE=SECONDS",
    help="Per-stage readiness timeout (RAY_READY, LOADING, MODEL_LISTED, SERVING).",
)
@click.option("--restart", is_flag=True, help="Restart even when nothing changed.")
@json_option
@handle_errors
def deploy(release: str, inventory: str | None, timeouts: tuple[str, ...], restart: bool, json_out: bool) -> None:
    """Install the rendered configs and start RELEASE; wait until it really serves.

    Re-running with nothing changed keeps the service up. A changed engine argument
    or env value restarts it, Ray included.
    """
    from flagops import service, state
    from flagops.nodes import Nodes

    t0 = time.monotonic()
    cfg = _load(inventory, release)
    limits = _parse_timeouts(timeouts)
    result, facts = _run(cfg, "deploy", json_out, force_restart=restart)
    state.remember(str(cfg.inventory_file), cfg.release_name)
    action = next((f["serve_action"] for f in reversed(facts) if "serve_action" in f), "unknown")
    t_play = time.monotonic() - t0

    def on_stage(st: service.Stage) -> None:
        if json_out:
            _emit_json({"event": "stage", **vars(st)})
        else:
            mark = click.style("ok", fg="green") if st.ok else click.style("FAILED", fg="red")
            click.echo(f"  {st.name:<13} {mark}  {st.seconds:7.1f}s  {st.detail}")

    if not json_out:
        click.echo(f"service: {action} ({t_play:.1f}s of flagops + ansible); readiness:")
    with Nodes(cfg) as nodes:
        ready = service.wait_ready(cfg, nodes, limits, on_stage)
    total = time.monotonic() - t0
    doc = {
        "ok": ready.ok,
        "release": cfg.release_name,
        "action": action,
        "state": ready.state,
        "reason": ready.reason,
        "endpoint": service.endpoint(cfg),
        "model": service.served_model(cfg),
        "seconds": {"playbook": round(t_play, 2), "readiness": round(total - t_play, 2), "total": round(total, 2)},
        "stages": [vars(s) for s in ready.stages],
        "logs": ready.logs,
    }
    if json_out:
        _emit_json(doc)
    elif ready.ok:
        click.echo(click.style(f"SERVING {doc['model']} at {doc['endpoint']}/v1 ({total:.1f}s)", fg="green"))
    else:
        click.echo(click.style(f"deploy stopped at {ready.state}: {ready.reason}", fg="red"), err=True)
        for name, text in ready.logs.items():
            click.echo(click.style(f"--- {name}", bold=True), err=True)
            click.echo(text.rstrip() or "(empty)", err=True)
    if not ready.ok:
        sys.exit(1)


@click.command()
@click.option("-i", "--inventory", metavar="INVENTORY", help="Default: the last provisioned inventory.")
@click.option("--release", metavar="NAME")
@click.option("--probe/--no-probe", default=True, show_default=True,
              help="Send a one-token completion: SERVING is only claimed when one succeeds.")
@json_option
@handle_errors
def status(inventory: str | None, release: str | None, probe: bool, json_out: bool) -> None:
    """Per node: container, Ray membership, serve process; the service state and endpoint."""
    from flagops import service
    from flagops.nodes import Nodes

    t0 = time.monotonic()
    cfg = _load(inventory, release)
    with Nodes(cfg) as nodes:
        st = service.status(cfg, nodes, probe_completion=probe)
    st["seconds"] = round(time.monotonic() - t0, 3)
    if json_out:
        _emit_json(st)
    else:
        from rich.console import Console
        from rich.table import Table

        con = Console()
        con.print(
            f"[bold]{st['release']}[/] [{STATE_STYLE.get(st['state'], 'white')}]{st['state']}[/]  "
            f"model {st['model']}  endpoint {st['endpoint']}/v1  ({st['seconds']}s)"
        )
        t = Table("node", "role", "address", "container", "ray", "serve")
        for name, n in st["nodes"].items():
            c = n["container"]
            ctr = "running" if c.get("running") else f"[red]{c.get('reason') or c.get('status') or 'down'}[/]"
            r = n["ray"]
            res = st["ray"]["resource"]
            ray = (
                f"{r.get(res, 0):g}/{r.get('expected', {}).get(res, 0)} {res}"
                if r.get("member")
                else "[red]not a member[/]"
            )
            sv = ""
            if "serve" in n:
                p = n["serve"]
                sv = f"pid {p['pid']} alive" if p.get("alive") else p.get("reason", "")
            t.add_row(name, n["role"], n["address"], ctr, ray, sv)
        con.print(t)
        for p in st["problems"]:
            con.print(f"[red]problem:[/] {p}")
    if st["state"] not in ("SERVING", "MODEL_LISTED", "STOPPED"):
        sys.exit(1)


@click.command()
@click.option("-i", "--inventory", metavar="INVENTORY", help="Default: the last provisioned inventory.")
@click.option("--release", metavar="NAME")
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False), help="Tarball path (default: flagops-logs-<time>.tgz)."
)
@json_option
@handle_errors
def logs(inventory: str | None, release: str | None, output: str | None, json_out: bool) -> None:
    """One tarball: each node's FlagScale output, Ray logs, container logs, rendered configs."""
    from flagops import render, service
    from flagops.nodes import Nodes

    cfg = _load(inventory, release)
    out = Path(output or time.strftime("flagops-logs-%Y%m%d-%H%M%S.tgz")).resolve()
    with Nodes(cfg) as nodes:
        res = service.collect_logs(cfg, nodes, render.render_files(cfg), out)
    if json_out:
        _emit_json({"ok": True, **res})
    else:
        click.echo(f"wrote {res['file']}")


@click.command()
@click.option("-i", "--inventory", metavar="INVENTORY", help="Default: the last provisioned inventory.")
@click.option("--release", metavar="NAME")
@click.option("--containers", is_flag=True, help="Also stop the FlagOS containers (flagops' own only).")
@json_option
@handle_errors
def stop(inventory: str | None, release: str | None, containers: bool, json_out: bool) -> None:
    """Stop the service on every node: recorded pids, then `ray stop`; never pkill patterns."""
    from flagops import service
    from flagops.nodes import Nodes

    cfg = _load(inventory, release)
    result, _ = _run(cfg, "stop", json_out, stop_containers=containers)
    with Nodes(cfg) as nodes:
        st = service.status(cfg, nodes)
    doc = {
        "ok": st["state"] == "STOPPED",
        "state": st["state"],
        "problems": st["problems"],
        "seconds": round(result.elapsed, 2),
    }
    if json_out:
        _emit_json(doc)
    else:
        click.echo(f"service {st['state']}")
    if st["state"] != "STOPPED":
        raise FlagopsError(f"after stop the service is {st['state']}: {json.dumps(st['problems'])}")
