"""deploy / status / logs / stop: argument parsing and printing over :mod:`flagops.api`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from flagops.cli import _emit_json, _resolve_inventory, handle_errors, json_option, takeover_notice
from flagops.errors import FlagopsError

STATE_STYLE = {
    "SERVING": "green",
    "MODEL_LISTED": "yellow",
    "LOADING": "yellow",
    "RAY_READY": "yellow",
    "RAY_FORMING": "yellow",
    "DEGRADED": "red",
    "FAILED": "red",
    "RECOVERING": "yellow",
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


def _progress(json_out: bool) -> tuple[Any, Any]:
    """deploy's and rollback's live output: the playbook's action, then each readiness stage."""

    def on_played(action: str, seconds: float, why: str = "") -> None:
        if not json_out:
            click.echo(f"service: {action}{f' ({why})' if why else ''}; {seconds:.1f}s of flagops + ansible; "
                       "readiness:")

    def on_stage(st: Any) -> None:
        if json_out:
            _emit_json({"event": "stage", **vars(st)})
        else:
            mark = click.style("ok", fg="green") if st.ok else click.style("FAILED", fg="red")
            click.echo(f"  {st.name:<13} {mark}  {st.seconds:7.1f}s  {st.detail}")

    return on_played, on_stage


@click.command()
@click.argument("release")
@click.option("-i", "--inventory", metavar="INVENTORY", help="Default: the last provisioned inventory.")
@click.option(
    "--timeout",
    "timeouts",
    multiple=True,
    metavar="STAGE=SECONDS",
    help="Per-stage readiness timeout (RAY_READY, LOADING, MODEL_LISTED, SERVING, SUPERVISED).",
)
@click.option("--restart", is_flag=True, help="Restart even when nothing changed.")
@click.option("--force", is_flag=True, help="Launch even when flagops check fails (says what it skipped).")
@json_option
@handle_errors
def deploy(release: str, inventory: str | None, timeouts: tuple[str, ...], restart: bool, force: bool,
           json_out: bool) -> None:
    """Install the rendered configs and start RELEASE; wait until it really serves.

    Re-running with nothing changed keeps the service up. A changed engine argument
    or env value restarts it, Ray included.
    """
    from flagops import api

    limits = _parse_timeouts(timeouts)

    on_played, on_stage = _progress(json_out)

    def on_check(report: Any) -> None:
        if json_out:
            _emit_json({"event": "check", **report.to_dict()})
        elif report.ok:
            click.echo(f"check: healthy ({report.seconds:.1f}s)")
        elif force:
            click.echo(click.style(f"check: {len(report.failures)} failure(s); --force: launching anyway, "
                                   "skipping:", fg="yellow"), err=True)
            for f in report.failures:
                click.echo(f"  - {f.line()}", err=True)

    def on_rollback(failed: Any, old: dict[str, Any]) -> None:
        if json_out:
            _emit_json({"event": "rollback", "reason": failed.reason, "to": old.get("fingerprint", "")[:16]})
        else:
            click.echo(click.style(f"deploy stopped at {failed.state}: {failed.reason}", fg="red"), err=True)
            click.echo(click.style(f"rolling back to the previous version {old.get('fingerprint', '')[:16]} "
                                   f"(deployed {old.get('deployed_at')}); readiness:", fg="yellow"), err=True)

    ready = api.deploy(release, inventory, timeouts=limits, restart=restart, on_stage=on_stage, on_played=on_played,
                       json_out=json_out, on_takeover=takeover_notice, force=force, on_check=on_check,
                       on_rollback=on_rollback)
    _report(ready, json_out)


def _report(ready: Any, json_out: bool) -> None:
    """Print a deploy's or a rollback's result; exit 1 unless it serves the version asked for."""
    doc = ready.to_dict()
    total = ready.seconds["total"]
    rb = ready.rollback
    if json_out:
        _emit_json(doc)
    elif rb and not ready.ok:
        ok, to = rb["ok"], rb["to"]
        back = (f"SERVING again in {rb['seconds']['total']:.1f}s" if ok
                else f"rollback stopped at {rb['state']}: {rb['reason']}")
        click.echo(click.style(f"deploy failed ({ready.reason}); rolled back to {to['fingerprint']} "
                               f"(deployed {to['deployed_at']}): {back}", fg="yellow" if ok else "red"), err=True)
        for name, text in ready.logs.items():
            click.echo(click.style(f"--- {name}", bold=True), err=True)
            click.echo(text.rstrip() or "(empty)", err=True)
    elif ready.ok:
        click.echo(click.style(f"SERVING {doc['model']} at {doc['endpoint']}/v1 ({total:.1f}s)"
                               + (f"; rolled back to {rb['to']['fingerprint']}" if rb else ""), fg="green"))
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
@click.option(
    "--timeout",
    "timeouts",
    multiple=True,
    metavar="STAGE=SECONDS",
    help="Per-stage readiness timeout (RAY_READY, LOADING, MODEL_LISTED, SERVING, SUPERVISED).",
)
@json_option
@handle_errors
def rollback(inventory: str | None, release: str | None, timeouts: tuple[str, ...], json_out: bool) -> None:
    """Deploy the version before the running one again (its recorded configs, FlagScale commit
    and engine args); the running one becomes the previous (roll forward the same way)."""
    from flagops import api

    on_played, on_stage = _progress(json_out)

    ready = api.rollback(inventory, release, timeouts=_parse_timeouts(timeouts), on_stage=on_stage,
                         on_played=on_played, json_out=json_out, on_takeover=takeover_notice)
    _report(ready, json_out)


@click.command()
@click.option("-i", "--inventory", metavar="INVENTORY", help="Default: the last provisioned inventory.")
@click.option("--release", metavar="NAME")
@click.option("--probe/--no-probe", default=True, show_default=True,
              help="Send a one-token completion: SERVING is only claimed when one succeeds.")
@json_option
@handle_errors
def status(inventory: str | None, release: str | None, probe: bool, json_out: bool) -> None:
    """Per node: container, Ray membership, serve process; the service state and endpoint."""
    from flagops import api

    result = api.status(inventory, release, probe=probe)
    st = result.to_dict()
    if json_out:
        _emit_json(st)
    else:
        from rich.console import Console
        from rich.table import Table

        con = Console()
        con.print(
            f"[bold]{st['release']}[/] [{STATE_STYLE.get(st['state'], 'white')}]{st['state']}[/]  "
            f"model {st['model']}  endpoint {st['endpoint']}/v1"
            + (f" ({st['via']}, port forwarded)" if st.get("via") else "") + f"  ({st['seconds']}s)"
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
        sup = st.get("supervision") or {}
        if sup.get("known") and sup.get("present"):
            last = sup.get("last_restart") or {}
            con.print(
                f"supervision: {sup.get('state') or '?'}"
                + ("" if sup.get("running") else " [red](container not running)[/]")
                + f", {sup.get('restart_count', 0)} restart(s)"
                + (f", last at {last.get('at')}: {sup.get('last_cause')}" if last else "")
                + (f" ({last['seconds_to_serving']}s to SERVING)" if last.get("seconds_to_serving") else "")
            )
            if sup.get("warning"):
                con.print(f"[yellow]supervision warning:[/] {sup['warning']}")
        for label in ("version", "previous"):
            v = st.get(label)
            if v:
                con.print(f"{label}: {v['fingerprint']} deployed {v['deployed_at']} image {v.get('image_ref')} "
                          f"FlagScale {str(v.get('flagscale_commit'))[:12]}")
        for p in st["problems"]:
            con.print(f"[red]problem:[/] {p}")
    if not result.state.settled:
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
    from flagops import api

    res = api.stop(inventory, release, containers=containers, json_out=json_out, on_takeover=takeover_notice)
    if json_out:
        _emit_json(res.to_dict())
    else:
        click.echo(f"service {res.state}")
    if not res.ok:
        raise FlagopsError(f"after stop the service is {res.state}: {json.dumps(res.problems)}")
