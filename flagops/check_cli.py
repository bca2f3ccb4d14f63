"""``flagops check [INVENTORY]``: argument parsing and printing over :mod:`flagops.check`."""

from __future__ import annotations

import sys
from typing import Any

import click

from flagops.cli import _emit_json, _resolve_inventory, handle_errors, json_option, release_option, takeover_notice


def print_report(report: Any, *, err: bool = False) -> None:
    """The failures (node: check: found; required; fix), then what passed and was skipped."""
    for f in report.failures:
        click.echo(click.style("FAIL ", fg="red") + f"{f.node}: {f.check}", err=err)
        click.echo(f"     found:    {f.found}", err=err)
        click.echo(f"     required: {f.required}", err=err)
        click.echo(f"     fix:      {f.fix}", err=err)
    if report.passed:
        click.echo(click.style("ok   ", fg="green") + ", ".join(report.passed), err=err)
    for name, why in report.skipped.items():
        click.echo(click.style("skip ", fg="yellow") + f"{name}: {why}", err=err)
    verdict = "healthy" if report.ok else f"{len(report.failures)} failure(s)"
    click.echo(f"flagops check: {verdict} in {report.seconds:.1f}s", err=err)


@click.command()
@click.argument("inventory", required=False, type=click.Path(dir_okay=False))
@release_option
@click.option("--no-collective", is_flag=True, help="Skip the short all-reduce across the containers.")
@json_option
@handle_errors
def check(inventory: str | None, release: str | None, no_collective: bool, json_out: bool) -> None:
    """Read-only: the host preflight plus the cluster checks, from inside the running
    containers, every failure on every node at once (exit 1 on a failure, 0 when healthy)."""
    from flagops import api

    report = api.check(_resolve_inventory(inventory), release, collective=not no_collective,
                       on_takeover=takeover_notice)
    if json_out:
        _emit_json(report.to_dict())
    else:
        print_report(report)
    sys.exit(0 if report.ok else 1)
