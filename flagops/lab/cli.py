"""`flagops lab up | down | status`: the local lab, 1 to 4 nodes (see docs/DESIGN.md, "Lab")."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from flagops.cli import handle_errors, json_option
from flagops.lab.paths import LabPaths


def _progress(line: str) -> None:
    """Progress lines go to stderr, so stdout stays one JSON object with --json."""
    click.echo(line, err=True)


def _emit(report: dict[str, Any], json_out: bool) -> None:
    if json_out:
        click.echo(json.dumps(report, sort_keys=True, default=str))


@click.group()
def lab() -> None:
    """The local lab (two nodes, or 1-4 with `up --nodes N`): up, down, status."""


@lab.command()
@click.option("--bastion", is_flag=True, help="Nodes reachable only through a jump host (172.30.0.10); "
              "use inventories/lab-bastion.yaml. Without it, `lab up` restores the default lab.")
@click.option("--nodes", "count", type=click.IntRange(1, 4), default=2, show_default=True,
              help="How many nodes (node1 = 172.30.0.11, ...). The inventory written to "
              "$FLAGOPS_HOME/lab/inventory.yaml serves the tiny ERNIE with one pipeline stage per node "
              "(PP=N); nodes beyond N are removed. 2 is inventories/lab.yaml.")
@json_option
@handle_errors
def up(bastion: bool, count: int, json_out: bool) -> None:
    """Build what is missing and start the lab (idempotent)."""
    from flagops.lab import lab as core

    if bastion and count != 2:
        raise click.BadParameter("bastion mode is the 2-node lab only (inventories/lab-bastion.yaml)",
                                 param_hint="--nodes")
    report = core.up(LabPaths.default(), _progress, bastion=bastion, count=count)
    _emit(report, json_out)
    if not json_out:
        click.echo(
            f"lab up ({count} node{'s' * (count > 1)}) in {report['seconds']:.1f}s; inventory: {report['inventory']}; "
            f"flagscale commit {report['flagscale_commit']}"
        )
        # the lab inventory's registry login reads its password from the environment
        from flagops.lab import services

        click.echo("before provision: " + services.credential_fixes(f"{services.GATEWAY}:{services.REGISTRY_PORT}")
                   [services.REGISTRY_PASSWORD_ENV])


@lab.command()
@click.option("--purge", is_flag=True, help="Also remove caches: lab images, registry data, the lab dir.")
@json_option
@handle_errors
def down(purge: bool, json_out: bool) -> None:
    """Remove the nodes, network and host services; keep caches unless --purge."""
    from flagops.lab import lab as core

    report = core.down(LabPaths.default(), _progress, purge=purge)
    _emit(report, json_out)
    left = {k: v for k, v in report["left"].items() if v}
    if left:
        click.echo(f"left behind: {left}", err=True)
        sys.exit(1)


@lab.command()
@json_option
@handle_errors
def status(json_out: bool) -> None:
    """Each lab component: up or down, with details (exit 1 unless all are up)."""
    from flagops.lab import lab as core

    report = core.status(LabPaths.default())
    _emit(report, json_out)
    if not json_out:
        _print_status(report)
    sys.exit(0 if report["ok"] else 1)


def _print_status(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("component", "state", "detail")

    def row(name: str, entry: dict[str, Any], detail: str) -> None:
        table.add_row(name, "[green]up[/]" if entry.get("up") else "[red]down[/]", detail)

    engine = report["engine"]
    row(
        "engine",
        engine,
        f"{engine.get('detail', 'not answering')}"
        + (f" (started by the lab, pid {engine['pid']})" if engine.get("started_by_lab") else ""),
    )
    if "network" in report:
        row("network", report["network"], report["network"].get("detail", "absent"))
    for name, node in report.get("nodes", {}).items():
        row(
            name,
            node,
            f"{node['container']} {node['ip']} {node['state']} {node.get('detail', '')}".strip(),
        )
    for name, svc in report["services"].items():
        row(name, svc, f"{svc['detail']}" + (f" (pid {svc['pid']})" if svc.get("pid") else ""))
    row(
        "image",
        report["image"],
        f"{report['image']['ref']} {report['image'].get('digest') or ''}".strip(),
    )
    if report.get("bastion", {}).get("mode") == "bastion":
        b = report["bastion"]
        row("bastion", b, f"{b['container']} {b['ip']} {b.get('state')} (nodes only through it)")
    row("model", report["model"], report["model"]["path"])
    row("git repo", report["git_repo"], report["git_repo"]["path"])
    Console().print(table)
