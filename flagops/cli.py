"""The ``flagops`` command line.

Start-up cost matters (``flagops --help`` < 0.3 s), so this module imports only click and
flagops.errors; yaml/jsonschema/rich/ansible_runner load inside the commands that need
them, and commands owned by other modules are registered by ``module:attr`` and imported
only when invoked.
"""

from __future__ import annotations

import functools
import importlib
import json
import sys
from collections.abc import Callable
from typing import Any

import click

from flagops.errors import ConfigError, FlagopsError

# name -> (import target, one-line help shown by --help without importing the target)
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "deploy": ("flagops.service_cli:deploy", "Install configs and start the service (deploy.yml + readiness)."),
    "rollback": ("flagops.service_cli:rollback", "Go back to the version deployed before the running one."),
    "status": ("flagops.service_cli:status", "Show service, Ray and API status."),
    "logs": ("flagops.service_cli:logs", "Show the service logs."),
    "stop": ("flagops.service_cli:stop", "Stop the service (stop.yml)."),
    "verify": ("flagops.verify.cli:verify", "Run the verify checks against a running service."),
    "lab": ("flagops.lab.cli:lab", "The local two-node lab: up, down, status."),
    "releases": ("flagops.catalog_cli:releases", "List the release catalog; `releases show NAME` shows one."),
    "check": ("flagops.check_cli:check", "Read-only cluster checks from inside the containers (exit 1 on a failure)."),
}


class LazyGroup(click.Group):
    """A group whose extra commands are imported on first use."""

    def __init__(self, *args: Any, lazy: dict[str, tuple[str, str]] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands or cmd_name not in self.lazy:
            return super().get_command(ctx, cmd_name)
        target, _ = self.lazy[cmd_name]
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                raise click.UsageError(
                    f"command {cmd_name!r} is not available in this checkout ({module_name} missing)"
                ) from None
            raise
        command = getattr(module, attr)
        if not isinstance(command, click.Command):
            raise click.UsageError(f"{target} is not a click command")
        self.commands[cmd_name] = command
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Own help strings for lazy commands so --help imports nothing.
        rows = []
        for name in self.list_commands(ctx):
            if name in self.commands:
                rows.append((name, self.commands[name].get_short_help_str(limit=70)))
            else:
                rows.append((name, self.lazy[name][1]))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=None, default=str, sort_keys=True))


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn FlagopsError into a message + exit status (no traceback); with --json the
    same information is also printed as one JSON object on stdout."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except FlagopsError as exc:
            if kwargs.get("json_out"):
                payload: dict[str, Any] = {"ok": False, "error": type(exc).__name__}
                if isinstance(exc, ConfigError):
                    payload["problems"] = [p.to_dict() for p in exc.problems]
                else:
                    payload["message"] = str(exc)
                _emit_json(payload)
            click.echo(str(exc), err=True)
            sys.exit(exc.exit_code)

    return wrapper


release_option = click.option(
    "--release", "release", metavar="NAME", help="Catalog release (default: the inventory's flagops_release)."
)
json_option = click.option("--json", "json_out", is_flag=True, help="Machine-readable output on stdout.")


@click.group(cls=LazyGroup, lazy=LAZY_COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flagops", message="%(prog)s %(version)s")
def main() -> None:
    """flagops: an Ansible inventory + a release -> a FlagScale 0.8.0 / vLLM service.

    Start with `flagops validate INVENTORY`, then `flagops provision INVENTORY`.
    """


def _resolve_inventory(inventory: str | None) -> str:
    if inventory:
        return inventory
    from flagops import state

    last = state.last_inventory()
    if not last:
        raise click.UsageError("no inventory given and none remembered; pass -i INVENTORY")
    return last


@main.command()
@click.argument("inventory", type=click.Path(dir_okay=False))
@release_option
@json_option
@handle_errors
def validate(inventory: str, release: str | None, json_out: bool) -> None:
    """Check INVENTORY and its release (schema + cross-field rules); contacts no host."""
    from flagops import config

    cfg = config.load(inventory, release)
    for warning in cfg.warnings:  # unverified release values: reported, never fatal
        click.echo(str(warning), err=True)
    if json_out:
        _emit_json({"ok": True, **cfg.to_dict()})
        return
    hosts = ", ".join(f"{h.name} {h.address} ({h.role}, {h.slots} slots)" for h in cfg.hosts)
    args = cfg.engine_args()
    click.echo(
        f"{inventory}: ok - release {cfg.release_name}, {len(cfg.hosts)} host{'s' if len(cfg.hosts) != 1 else ''}: "
        f"{hosts}; "
        f"TP {args.get('tensor_parallel_size', 1)} x PP {args.get('pipeline_parallel_size', 1)} "
        f"= {cfg.total_slots} slots"
    )


@main.command()
@click.argument("release")
@click.option("-i", "--inventory", type=click.Path(dir_okay=False), help="Inventory (default: the last one used).")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--ansible-vars", "ansible_vars", type=click.Path(dir_okay=False),
              help="Also write the extra vars the playbooks get (for molecule or ansible-playbook -e @FILE).")
@json_option
@handle_errors
def render(release: str, inventory: str | None, out_dir: str, ansible_vars: str | None, json_out: bool) -> None:
    """Write hostfile.txt, serve.yaml and serve/<variant>.yaml for RELEASE into DIR."""
    from pathlib import Path

    from flagops import config
    from flagops import render as render_mod

    cfg = config.load(_resolve_inventory(inventory), release)
    written = render_mod.write(cfg, out_dir)
    if ansible_vars:
        from flagops import api

        Path(ansible_vars).write_text(json.dumps(api.extravars_for(cfg), indent=1, sort_keys=True))
        written.append(Path(ansible_vars))
    if json_out:
        _emit_json({"ok": True, "release": cfg.release_name, "files": [str(p) for p in written]})
    else:
        for path in written:
            click.echo(str(path))


@main.command()
@click.argument("inventory", type=click.Path(dir_okay=False))
@release_option
@click.option("--check", is_flag=True, help="Ansible check mode: report what would change.")
@click.option("--diff", is_flag=True, help="Show file and template diffs.")
@click.option("--tags", metavar="TAGS", help="Only run roles/tasks with these tags (comma-separated).")
@click.option("--skip-tags", metavar="TAGS", help="Skip roles/tasks with these tags.")
@click.option("--limit", metavar="PATTERN", help="Limit to these hosts.")
@json_option
@handle_errors
def provision(inventory: str, release: str | None, check: bool, diff: bool, tags: str | None,
              skip_tags: str | None, limit: str | None, json_out: bool) -> None:
    """Prepare every node: weights, FlagScale, image, container, ssh trust, installs."""
    from flagops import api

    api.provision(inventory, release, check=check, diff=diff, tags=tags, skip_tags=skip_tags, limit=limit,
                  json_out=json_out, on_takeover=takeover_notice)


@main.command()
@json_option
@handle_errors
def setup(json_out: bool) -> None:
    """Install the Ansible collections the roles use into $FLAGOPS_HOME/collections
    (from the PyPI `ansible` bundle; idempotent; provision does it too when needed)."""
    from flagops import resources

    found = resources.ensure_collections(say=None if json_out else lambda m: click.echo(m, err=True))
    if json_out:
        _emit_json({"ok": True, "collections_dir": str(resources.collections_dir()), "collections": found})
    else:
        have = ", ".join(f"{n} {v}" for n, v in found.items())
        click.echo(f"collections: {have} in {resources.collections_dir()}")


def takeover_notice(stale: Any) -> None:
    click.echo(f"note: taking over the lock left by a dead run ({stale.describe()})", err=True)


if __name__ == "__main__":
    main()
