"""`flagops releases` and `flagops releases show NAME`: printing over :mod:`flagops.catalog`."""

from __future__ import annotations

from typing import Any

import click

from flagops.cli import _emit_json, handle_errors, json_option


def _topology(s: dict[str, Any]) -> str:
    nodes = f"{s['nodes']}x{s['gpus_per_node']}" if s["nodes"] else "?"
    return f"{nodes}, TP{s['tp']}/PP{s['pp']}"


@click.group(invoke_without_command=True)
@json_option
@click.pass_context
@handle_errors
def releases(ctx: click.Context, json_out: bool) -> None:
    """List the release catalog: size, nodes x GPUs, TP/PP, image, stack, unverified fields."""
    if ctx.invoked_subcommand is not None:
        return
    from flagops import catalog

    rows = catalog.summaries()
    if json_out:
        _emit_json({"ok": True, "releases": rows})
        return
    for s in rows:
        unverified = ", ".join(s["unverified"]) or "none"
        click.echo(f"{s['name']}  ({s['vendor']}, {s['model']}, {s['size']})")
        click.echo(f"  topology:   {_topology(s)}")
        click.echo(f"  image:      {s['image']}")
        click.echo(f"  stack:      {catalog.stack_text(s['stack'])}")
        click.echo(f"  unverified: {unverified}")


@releases.command()
@click.argument("name")
@json_option
@handle_errors
def show(name: str, json_out: bool) -> None:
    """Show catalog release NAME (its summary, its unverified fields with reasons, the entry)."""
    import yaml

    from flagops import catalog, config

    rel = config.load_release(name)
    s = catalog.summary(rel)
    if json_out:
        _emit_json({"ok": True, **s, "release": rel.data})
        return
    click.echo(f"{s['name']}: {s['model']} ({s['size']}) from {s['source']}; vendor {s['vendor']}")
    click.echo(f"  file:       {s['file']}")
    click.echo(f"  topology:   {_topology(s)}; API port {s['port']}")
    click.echo(f"  image:      {s['image']}")
    click.echo(f"  stack:      {catalog.stack_text(s['stack'])}")
    if rel.warnings:
        click.echo("  unverified:")
        for w in rel.warnings:
            click.echo(f"    {w.field}: {w.reason} ({w.location.file}:{w.location.line})")
    else:
        click.echo("  unverified: none")
    click.echo("---")
    click.echo(yaml.safe_dump(rel.data, sort_keys=False, width=1000).rstrip())
