"""flagops as a library: the verbs the CLI offers, with typed results.

Every playbook verb goes through :func:`run`, the one run sequence: validate and render
(:func:`flagops.config.load`), take the controller lock, run the playbook, remember the
inventory, report. The CLI (:mod:`flagops.cli`, :mod:`flagops.service_cli`) only parses
arguments and prints these results.

    from flagops import api
    api.provision("inventories/lab.yaml")
    api.deploy("ernie45").state            # ServiceState.SERVING
    api.status().state
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from flagops import state
from flagops.errors import FlagopsError, RunError
from flagops.service import ServiceState


@dataclass
class RunReport:
    """One playbook run: the runner's result plus the facts its tasks set."""

    result: Any  # flagops.runner.Result
    facts: list[dict[str, Any]] = field(default_factory=list)

    def fact(self, name: str, default: Any = None) -> Any:
        return next((f[name] for f in reversed(self.facts) if name in f), default)


@dataclass
class DeployResult:
    ok: bool
    release: str
    action: str  # what the serve role did: start / restart / keep
    state: ServiceState
    reason: str
    endpoint: str
    model: str
    seconds: dict[str, float]
    stages: list[dict[str, Any]]
    logs: dict[str, str]
    # flagops check before the launch: its seconds, and what --force launched over
    check: dict[str, Any] = field(default_factory=dict)
    # an upgrade that did not reach SERVING: the version flagops went back to, and how that went
    rollback: dict[str, Any] = field(default_factory=dict)
    action_reason: str = ""  # why the serve role chose ``action``

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class CheckFailed(RunError):
    """flagops check found failures before a launch; deploy refused (``--force`` overrides)."""

    def __init__(self, report: Any) -> None:
        self.report = report
        lines = "\n".join("  - " + f.line() for f in report.failures)
        super().__init__(f"deploy refused: flagops check found {len(report.failures)} failure(s) before the "
                         f"launch (--force launches anyway):\n{lines}")


@dataclass
class StatusResult:
    state: ServiceState
    doc: dict[str, Any]  # release, model, endpoint, per-node details, problems, seconds

    def to_dict(self) -> dict[str, Any]:
        return {**self.doc, "state": self.state}


@dataclass
class StopResult:
    ok: bool
    state: ServiceState
    problems: list[str]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def inventory_or_last(inventory: str | Path | None) -> str:
    if inventory:
        return str(inventory)
    last = state.last_inventory()
    if not last:
        raise FlagopsError("no inventory given and none remembered; pass -i INVENTORY")
    return last


def load(inventory: str | Path | None, release: str | None = None) -> Any:
    from flagops import config

    return config.load(inventory_or_last(inventory), release)


def extravars_for(cfg: Any, **extra: Any) -> dict[str, Any]:
    """The single extra var every playbook gets (DESIGN.md, "Playbooks get one extra var")."""
    from flagops import render

    return {
        "flagops": {
            "release": cfg.release,
            "contract": render.contract(cfg),
            "rendered": render.render_files(cfg),
            "inventory_file": str(cfg.inventory_file),
            **extra,
        }
    }


def run(cfg: Any, playbook: str, *, json_out: bool = False, view: Any = None,
        on_takeover: Callable[[state.Holder], None] | None = None,
        flagops_extra: dict[str, Any] | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None, raise_on_failure: bool = True,
        **options: Any) -> RunReport:
    """lock -> run_playbook -> remember -> report; raises RunError on a failed run
    (unless ``raise_on_failure`` is False: the caller judges the result itself)."""
    from flagops import runner

    facts: list[dict[str, Any]] = []
    also = on_event

    def on_event(ev: dict[str, Any]) -> None:  # noqa: F811 - wraps the caller's
        if also is not None:
            also(ev)
        if ev.get("event") == "runner_on_ok":
            res = (ev.get("event_data") or {}).get("res") or {}
            if isinstance(res, dict) and res.get("ansible_facts"):
                facts.append(res["ansible_facts"])

    extravars = extravars_for(cfg, **(flagops_extra or {}))
    with state.lock(f"flagops {playbook} {cfg.inventory_file}", on_takeover=on_takeover):
        result = runner.run_playbook(playbook, cfg.inventory_file, extravars, json_out=json_out, view=view,
                                     on_event=on_event, **options)
        if not options.get("check"):  # a failed run too: status/logs then know the cluster
            state.remember(str(cfg.inventory_file), cfg.release_name)
    if not result.ok and raise_on_failure:
        where = "; ".join(f"{f['host']}: {f['task']}: {str(f['msg']).splitlines()[0] if f['msg'] else ''}"
                          for f in result.failures if f.get("host"))
        raise RunError(f"{playbook} failed (ansible rc={result.rc})" + (f" at {where}" if where else ""))
    return RunReport(result, facts)


def _pulls(tags: str | None, skip_tags: str | None) -> bool:
    """Whether a provision with these --tags/--skip-tags runs the image role (the pull)."""
    def split(value: str | None) -> set[str]:
        return {t.strip() for t in (value or "").split(",") if t.strip()}

    if "image" in split(skip_tags):
        return False
    return not tags or bool(split(tags) & {"image", "all"})


def require_credentials(cfg: Any) -> None:
    """Refuse (exit 2, before any host is touched) a run that would pull without the
    registry login its inventory names: the env lookup's variable is unset."""
    from flagops import config
    from flagops.errors import ConfigError
    from flagops.lab import services

    ref = (cfg.release.get("image") or {}).get("ref") or ""
    problems = config.unset_credentials(cfg, os.environ, services.credential_fixes(config.image_registry(ref)))
    if problems:
        raise ConfigError(problems)


def provision(inventory: str | Path, release: str | None = None, **options: Any) -> RunReport:
    """Every runbook step before "Serve" (playbooks/provision.yml)."""
    cfg = load(inventory, release)
    if _pulls(options.get("tags"), options.get("skip_tags")):
        require_credentials(cfg)
    return run(cfg, "provision", **options)


def check(inventory: str | Path | None = None, release: str | None = None, *, collective: bool = True,
          **options: Any) -> Any:
    """flagops check: every node's host preflight and cluster checks, judged together
    (a :class:`flagops.check.CheckReport`; ``.ok`` is False on any failure). Read-only."""
    return run_check(load(inventory, release), collective=collective, **options)


def run_check(cfg: Any, *, collective: bool = True, on_takeover: Callable[[state.Holder], None] | None = None,
              prelaunch: bool = False) -> Any:
    """playbooks/check.yml, quietly (it fails nothing), then every node judged together."""
    import time

    from flagops import check as check_mod

    t0 = time.monotonic()
    got = check_mod.Collector()
    rep = run(cfg, "check", view=check_mod.QuietView(), on_event=got, on_takeover=on_takeover,
              flagops_extra={} if collective else {"collective": ""}, raise_on_failure=False)
    if not rep.result.ok:
        got.run_error = "; ".join(str(f.get("msg") or "").strip().splitlines()[0][:300]
                                  for f in rep.result.failures if f.get("msg")) or f"rc={rep.result.rc}"
    report = got.report(check_mod.Expect.from_config(cfg), time.monotonic() - t0, prelaunch=prelaunch)
    dump = os.environ.get("FLAGOPS_CHECK_FACTS")  # the raw facts, for debugging and test fixtures
    if dump:
        Path(dump).write_text(json.dumps({"nodes": got.nodes, "preflight": got.preflight,
                                          "unreachable": got.unreachable}, indent=1, sort_keys=True, default=str))
    return report


def deploy(release: str, inventory: str | Path | None = None, *, timeouts: dict[str, float] | None = None,
           restart: bool = False, on_stage: Callable[[Any], None] | None = None,
           on_played: Callable[[str, float, str], None] | None = None, force: bool = False,
           on_check: Callable[[Any], None] | None = None, auto_rollback: bool = True,
           on_rollback: Callable[[DeployResult, dict[str, Any]], None] | None = None,
           **options: Any) -> DeployResult:
    """flagops check, then configs into the installed FlagScale, `flagscale serve`, then
    staged readiness. A failing check refuses the launch (:class:`CheckFailed`) unless
    ``force``; the result then names what was skipped. A changed release that does not
    reach SERVING (health, the model listed, one completion) is rolled back to the recorded
    previous version (``result.rollback``; ``result.ok`` stays False)."""
    import time

    from flagops import service

    t0 = time.monotonic()
    cfg = load(inventory, release)
    pre = run_check(cfg, on_takeover=options.get("on_takeover"), prelaunch=True)
    if on_check:
        on_check(pre)
    if not pre.ok and not force:
        raise CheckFailed(pre)
    checked = {"seconds": pre.seconds, "ok": pre.ok,
               "forced_over": [f.to_dict() for f in pre.failures] if force else []}
    before = service_record(cfg)
    try:
        result = _launch(cfg, {"force_restart": restart}, timeouts, on_stage, on_played, t0, options)
    except RunError as exc:  # the playbook failed: roll back only if it stopped the old version
        after = service_record(cfg) or {}
        if not auto_rollback or not ((before or {}).get("version") or {}).get("release") \
                or after.get("pid") == (before or {}).get("pid"):
            raise
        result = DeployResult(ok=False, release=cfg.release_name, action="failed", state=ServiceState.STOPPED,
                              reason=str(exc), endpoint="", model="", stages=[], logs={},
                              seconds={"total": round(time.monotonic() - t0, 2)})
    result.check = checked
    if result.ok or not auto_rollback:
        return result
    after = service_record(cfg) or {}
    old, new = (before or {}).get("version") or {}, after.get("version") or {}
    if not old.get("release") or (new and old.get("fingerprint") == new.get("fingerprint")):
        return result  # nothing to go back to, or the same version failed: nothing to roll back
    if on_rollback:
        on_rollback(result, old)
    # the failed version never becomes "previous": the one before the old version stays it
    back = _launch(replace(cfg, release=old["release"]), {"previous": (before or {}).get("previous") or {}},
                   timeouts, on_stage, None, time.monotonic(), options)
    result.rollback = {"ok": back.ok, "to": service._version_summary(old), "state": back.state,
                       "reason": back.reason, "seconds": back.seconds, "stages": back.stages,
                       "failed_version": service._version_summary(new)}
    return result


def _launch(cfg: Any, extra: dict[str, Any], timeouts: dict[str, float] | None,
            on_stage: Callable[[Any], None] | None, on_played: Callable[[str, float, str], None] | None,
            t0: float, options: dict[str, Any]) -> DeployResult:
    """playbooks/deploy.yml with ``cfg``'s release, then staged readiness."""
    import time

    from flagops import service
    from flagops.nodes import Nodes

    report = run(cfg, "deploy", flagops_extra=extra, **options)
    action = str(report.fact("serve_action", "unknown"))
    why = str(report.fact("serve_action_reason", ""))
    t_play = time.monotonic() - t0
    if on_played:
        on_played(action, t_play, why)
    with Nodes(cfg) as nodes:
        ready = service.wait_ready(cfg, nodes, timeouts, on_stage)
    total = time.monotonic() - t0
    return DeployResult(
        ok=ready.ok, release=cfg.release_name, action=action, state=ready.state, reason=ready.reason,
        endpoint=service.endpoint(cfg), model=service.served_model(cfg),
        seconds={"playbook": round(t_play, 2), "readiness": round(total - t_play, 2), "total": round(total, 2)},
        stages=[vars(s) for s in ready.stages], logs=ready.logs, action_reason=why,
    )


def service_record(cfg: Any) -> dict[str, Any] | None:
    """The service record on the master (what runs, its version and the one before), or None."""
    from flagops import service
    from flagops.nodes import Nodes

    with Nodes(cfg) as nodes:
        proc = service.serve_process(cfg, nodes)
    return proc.get("record") if proc.get("recorded") else None


def rollback(inventory: str | Path | None = None, release: str | None = None, *,
             timeouts: dict[str, float] | None = None, on_stage: Callable[[Any], None] | None = None,
             on_played: Callable[[str, float, str], None] | None = None, **options: Any) -> DeployResult:
    """Deploy the version before the running one again (its recorded release); the running
    one becomes "previous" (a second rollback goes forward again)."""
    import time

    from flagops import service

    t0 = time.monotonic()
    cfg = load(inventory, release)
    rec = service_record(cfg)
    prev = (rec or {}).get("previous") or {}
    if not prev.get("release"):
        raise FlagopsError(f"nothing to roll back to: the service record of {cfg.release_name} names no previous "
                           "version (a version is kept once a deploy changes the release)")
    result = _launch(replace(cfg, release=prev["release"]), {"previous": (rec or {}).get("version") or {}},
                     timeouts, on_stage, on_played, t0, options)
    result.rollback = {"ok": result.ok, "to": service._version_summary(prev), "state": result.state,
                       "reason": result.reason, "seconds": result.seconds,
                       "from": service._version_summary((rec or {}).get("version"))}
    return result


def status(inventory: str | Path | None = None, release: str | None = None, *, probe: bool = True) -> StatusResult:
    """Per node: container, Ray membership, serve process; the service state."""
    import time

    from flagops import service
    from flagops.nodes import Nodes

    t0 = time.monotonic()
    cfg = load(inventory, release)
    with Nodes(cfg) as nodes:
        doc = service.status(cfg, nodes, probe_completion=probe)
    doc["seconds"] = round(time.monotonic() - t0, 3)
    return StatusResult(ServiceState(doc.pop("state")), doc)


def stop(inventory: str | Path | None = None, release: str | None = None, *, containers: bool = False,
         **options: Any) -> StopResult:
    """Stop what flagops started (recorded pids, `ray stop`); containers only when asked."""
    from flagops import service
    from flagops.nodes import Nodes

    cfg = load(inventory, release)
    report = run(cfg, "stop", flagops_extra={"stop_containers": containers}, **options)
    with Nodes(cfg) as nodes:
        st = service.status(cfg, nodes)
    now = ServiceState(st["state"])
    return StopResult(ok=now is ServiceState.STOPPED, state=now, problems=st["problems"],
                      seconds=round(report.result.elapsed, 2))


@contextlib.contextmanager
def reach(cfg: Any, ctx: Any) -> Iterator[str | None]:
    """The nodes' ssh connections open (``ctx.nodes``) and ``ctx.base_url`` where this
    process reaches the API: unchanged, or (master behind a jump host, no ``--endpoint``)
    a local port forwarded over the master's ssh. Yields the route (``ssh via ...``) or None."""
    import logging

    from flagops import service
    from flagops.nodes import Nodes

    # paramiko logs a traceback for every failed handshake; the check's reason says it once
    logging.getLogger("paramiko").addHandler(logging.NullHandler())
    logging.getLogger("paramiko").propagate = False
    shown = ctx.base_url
    with Nodes(cfg) as nodes:
        ctx.nodes = nodes
        via = None
        if not ctx.endpoint_overridden:
            ctx.base_url = service.api_base(cfg, nodes)
            via = nodes.via(nodes.master.name) if ctx.base_url != shown else None
        try:
            yield via
        finally:
            ctx.base_url = shown


def run_checks(cfg: Any, ctx: Any, names: list[str],
               then: Callable[[dict[str, Any], list[Any]], None] | None = None) -> tuple[dict[str, Any], list[Any]]:
    """Run verify's checks against one service; the report document and the results.
    ``then(doc, results)`` runs while the connections (and a port forward) are still open."""
    from flagops.verify import checks

    shown = ctx.base_url
    with reach(cfg, ctx) as via:
        results = checks.run_checks(ctx, names)
        doc: dict[str, Any] = {
            "release": cfg.release_name,
            "inventory": str(cfg.inventory_file),
            "endpoint": shown,
            "via": via,
            "model": ctx.model,
            "checks": [r.to_dict() for r in results],
        }
        if then is not None:
            then(doc, results)
    return doc, results


def verify(inventory: str | Path | None = None, release: str | None = None, *, only: str | None = None,
           skip: str | None = None, **options: Any) -> dict[str, Any]:
    """The verify checks (no benchmark) against the service of ``inventory``; ``doc["ok"]``
    is False when a check fails. ``options`` are :class:`flagops.verify.checks.Options` fields."""
    from flagops import service
    from flagops.verify import checks

    cfg = load(inventory, release)
    ctx = checks.Context(cfg, service.endpoint(cfg), service.served_model(cfg), None, checks.Options(**options))
    doc, results = run_checks(cfg, ctx, checks.select(only, skip))
    doc["summary"] = checks.summarize(results)
    doc["ok"] = doc["summary"]["fail"] == 0
    return doc
