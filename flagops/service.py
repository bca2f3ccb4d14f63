"""The service's true state: staged readiness for deploy, status, logs.

FlagScale's runner starts Ray and vLLM in the background and reports nothing;
a worker that never joined or a model that never loaded looks the same as
"starting". flagops asks each layer itself, in order, and names the stage
where it stopped:

    RAY_FORMING -> RAY_READY -> LOADING -> MODEL_LISTED -> SERVING

Every wait is a condition polled with a short interval and a timeout per
stage; there are no bare sleeps.  Status gathers the same facts from every
node in parallel.
"""

from __future__ import annotations

import enum
import io
import json
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flagops import http, resources
from flagops.config import Config, effective_engine_args
from flagops.nodes import Nodes
from flagops.render import contract


class ServiceState(enum.StrEnum):
    """The one set of service states: deploy's readiness stages, then what status adds."""

    RAY_FORMING = "RAY_FORMING"
    RAY_READY = "RAY_READY"
    LOADING = "LOADING"
    MODEL_LISTED = "MODEL_LISTED"
    SERVING = "SERVING"
    DEGRADED = "DEGRADED"  # something flagops started is gone or missing
    FAILED = "FAILED"  # the recorded engine died (and supervision is not bringing it back), or a crash loop
    RECOVERING = "RECOVERING"  # the supervisor is restarting the group after a failure it names
    UNREACHABLE = "UNREACHABLE"  # a node could not be asked: never reported as STOPPED
    STOPPED = "STOPPED"

    @property
    def settled(self) -> bool:
        """A state `flagops status` exits 0 for: serving, listed (not probed) or stopped."""
        return self in (ServiceState.SERVING, ServiceState.MODEL_LISTED, ServiceState.STOPPED)


S = ServiceState
STAGES = (S.RAY_FORMING, S.RAY_READY, S.LOADING, S.MODEL_LISTED, S.SERVING)
DEFAULT_TIMEOUTS = {"RAY_READY": 300.0, "LOADING": 3600.0, "MODEL_LISTED": 120.0, "SERVING": 300.0,
                    "SUPERVISED": 1200.0}
# After SERVING, deploy waits until the supervisor has seen this very process serve (it polls
# every 2 s). A supervisor that does not within ARM_S (not running, STARTING) fails the stage;
# one that is RECOVERING (it saw a failure after the deploy's readiness) is waited for, up to
# SUPERVISED: its own start timeout (900 s) and backoffs bound each of its restarts.
ARM_S = 60.0
POLL_S = 0.25
PROC_TREE = resources.data("roles", "serve", "files", "proc_tree.sh")

# Ray's state API on the head (FlagScale starts the dashboard on 127.0.0.1:<ray_dashboard_port>
# of the master host, which the container shares through --net=host).
_RAY_NODES_PY = r"""
import json, sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1] + "/api/v0/nodes?limit=100&detail=1", timeout=2) as r:
        doc = json.load(r)
except Exception as exc:
    print(json.dumps({"error": str(exc)})); sys.exit(0)
rows = doc.get("data", {}).get("result", {}).get("result", [])
ip = {n.get("node_id"): n.get("node_ip") for n in rows}
dead = []
try:  # engine workers (actors) that died: the raylet reports a killed worker at once
    with urllib.request.urlopen(sys.argv[1] + "/api/v0/actors?limit=1000&detail=1", timeout=2) as r:
        actors = json.load(r).get("data", {}).get("result", {}).get("result", [])
    for a in actors:
        cause = json.dumps(a.get("death_cause") or {})
        if a.get("state") == "DEAD" and "INTENDED" not in cause:
            dead.append({"ip": ip.get(a.get("node_id")), "pid": a.get("pid"),
                         "name": a.get("name") or a.get("class_name"), "end_time": a.get("end_time"),
                         "cause": cause[:300]})
except Exception:
    pass
print(json.dumps({"nodes": [{"ip": n.get("node_ip"), "state": n.get("state"), "head": n.get("is_head_node"),
                             "resources": n.get("resources_total", {})} for n in rows], "dead_actors": dead}))
"""


# --------------------------------------------------------------------------- facts


def served_model(cfg: Config) -> str:
    return str(contract(cfg)["served_model"])


def endpoint(cfg: Config) -> str:
    return f"http://{cfg.master.address}:{contract(cfg)['api_port']}"


def state_file(cfg: Config) -> str:
    return str(contract(cfg)["state_file"])


def serve_log(cfg: Config) -> str:
    return str(contract(cfg)["serve_log"])


def _http(url: str, body: dict[str, Any] | None = None, timeout: float = 3.0) -> tuple[int, str]:
    """(status, body) through flagops' one HTTP client; 0 and the reason when nothing answered."""
    r = http.request("POST" if body is not None else "GET", url, body, timeout=timeout)
    return r.status, r.text if r.ok else r.text[:500]


def api_base(cfg: Config, nodes: Nodes) -> str:
    """Where this process reaches the API: the endpoint itself, or, when the master is
    reached through a jump host, a local port forwarded over the master's ssh connection."""
    return nodes.http_base(nodes.master.name, cfg.master.address, int(contract(cfg)["api_port"]))


def expected_resource(cfg: Config) -> str:
    return str(contract(cfg)["ray_resource"])


def ray_nodes(nodes: Nodes) -> dict[str, Any]:
    """Alive Ray nodes and their resources, asked of the head on the master host."""
    url = f"http://127.0.0.1:{contract(nodes.cfg)['ray_dashboard_port']}"
    r = nodes.run(["python3", "-c", _RAY_NODES_PY, url], [nodes.master.name], timeout=10)[nodes.master.name]
    if not r.ok:
        return {"error": r.stderr.strip() or f"rc={r.rc}"}
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"unexpected answer: {r.stdout[-200:]}"}


def ray_membership(cfg: Config, info: dict[str, Any]) -> dict[str, Any]:
    """Compare Ray's alive nodes with the inventory: who is missing, with what."""
    key = expected_resource(cfg)
    alive = {n["ip"]: n for n in info.get("nodes", []) if n.get("state") == "ALIVE"}
    per_host = {}
    for h in cfg.hosts:
        n = alive.get(h.address)
        per_host[h.name] = {
            "member": n is not None,
            key: (n or {}).get("resources", {}).get(key, 0.0),
            "expected": {key: h.slots},
        }
    by_name = {h.name: h for h in cfg.hosts}
    missing = [
        f"{name} ({by_name[name].address}, {by_name[name].slots} {key})"
        for name, v in per_host.items()
        if not v["member"]
    ]
    total = sum(v[key] for v in per_host.values())
    want = sum(h.slots for h in cfg.hosts)
    return {
        "hosts": per_host,
        "missing": missing,
        "total": total,
        "expected_total": want,
        "resource": key,
        "ready": not missing and total >= want and "error" not in info,
        "error": info.get("error"),
    }


def serve_process(cfg: Config, nodes: Nodes) -> dict[str, Any]:
    """The recorded serve process on the master: recorded? alive (same start time)?"""
    m = nodes.master.name
    rec = nodes.run(["cat", state_file(cfg)], [m])[m]
    if rec.rc == 255:
        return {"recorded": None, "alive": False, "reason": f"unknown: {rec.stderr.strip()}"}
    if not rec.ok:
        return {"recorded": False, "alive": False, "reason": "no service recorded by flagops"}
    try:
        st = json.loads(rec.stdout)
    except ValueError:
        return {"recorded": False, "alive": False, "reason": "unreadable service record"}
    r = nodes.shell_in_container(
        PROC_TREE.read_text(), "alive", str(st["pid"]), str(st.get("pid_start", "")), hosts=[m]
    )[m]
    return {
        "recorded": True,
        "record": st,
        "alive": r.rc == 0,
        "pid": st["pid"],
        "started_at": st.get("started_at"),
        "fingerprint": st.get("fingerprint"),
        "reason": r.stdout.strip() or r.stderr.strip(),
    }


_SUPERVISION_SH = (
    'date +%s.%N; echo "--flagops--"; cat "$1" 2>/dev/null; echo "--flagops--"; '
    'docker inspect --format "{{.State.Running}} {{.RestartCount}}" "$2" 2>/dev/null || echo absent'
)


def supervision(cfg: Config, nodes: Nodes) -> dict[str, Any]:
    """The supervisor on the master: its container, and the status file it writes every poll."""
    c = contract(cfg)
    m = nodes.master.name
    r = nodes.run(["bash", "-c", _SUPERVISION_SH, "flagops", c["supervisor_status"], c["supervisor_container"]], [m])[m]
    parts = (r.stdout or "").split("--flagops--")
    if r.rc == 255 or len(parts) < 3:
        return {"known": False, "reason": (r.stderr or r.stdout).strip()[:300]}
    try:
        clock = float(parts[0].strip())
    except ValueError:
        clock = None
    try:
        doc = json.loads(parts[1]) if parts[1].strip() else {}
    except ValueError:
        doc = {}
    ctr = parts[2].split()
    running = bool(ctr) and ctr[0] == "true"
    age = round(clock - doc["updated_epoch"], 1) if clock is not None and doc.get("updated_epoch") else None
    restarts = doc.get("restarts") or []
    return {
        "known": True,
        "container": c["supervisor_container"],
        "running": running,
        "present": bool(ctr) and ctr[0] != "absent",
        "state": doc.get("state"),
        "generation": doc.get("generation"),
        "armed": bool(doc.get("armed")),
        "serving_since": doc.get("serving_since"),
        "serving_pid": doc.get("serving_pid"),
        "restart_count": int(doc.get("restart_count") or 0),
        "last_cause": doc.get("last_cause"),
        "last_restart": ({k: v for k, v in restarts[-1].items() if k != "epoch"} if restarts else None),
        "reason": doc.get("reason"),
        "warning": doc.get("warning"),  # seen, not acted on (a worker its ssh cannot reach while Ray sees it)
        "age_s": age,  # seconds since the supervisor last wrote (master's clock)
        "fresh": running and age is not None and age <= SUPERVISION_STALE_S,
    }


SUPERVISION_STALE_S = 20.0


def containers(cfg: Config, nodes: Nodes) -> dict[str, Any]:
    script = (
        'docker inspect --format "{{json .State}}|{{json .Config.Labels}}|{{.Image}}" "$1" && '
        'docker image inspect --format "{{json .RepoDigests}}" "$(docker inspect --format "{{.Image}}" "$1")"'
    )
    res = nodes.run(["bash", "-c", script, "flagops", cfg.container_name])
    out: dict[str, Any] = {}
    for host, r in res.items():
        if r.rc == 255:
            out[host] = {"reachable": False, "running": False, "reason": r.stderr.strip()}
            continue
        if not r.ok:
            out[host] = {"reachable": True, "running": False, "reason": f"no container {cfg.container_name}"}
            continue
        first, digests = r.stdout.strip().splitlines()[:2]
        state, labels, image_id = first.split("|", 2)
        st = json.loads(state)
        out[host] = {
            "reachable": True,
            "running": bool(st.get("Running")),
            "status": st.get("Status"),
            "started_at": st.get("StartedAt"),
            "managed": (json.loads(labels) or {}).get(contract(cfg)["owner_label"]) == "true",
            "image_id": image_id,
            "digests": json.loads(digests) or [],
        }
    return out


# --------------------------------------------------------------------------- readiness


@dataclass
class Stage:
    name: str
    ok: bool
    seconds: float
    detail: str = ""
    at: float = 0.0  # wall-clock time the stage was reached (or given up)


@dataclass
class Readiness:
    state: ServiceState = ServiceState.RAY_FORMING
    ok: bool = False
    reason: str = ""
    stages: list[Stage] = field(default_factory=list)
    ready_at: float | None = None
    logs: dict[str, str] = field(default_factory=dict)


def _wait(
    check: Callable[[], tuple[bool, str]], timeout: float, alive: Callable[[], tuple[bool, str]]
) -> tuple[bool, str, float]:
    t0 = time.monotonic()
    next_alive = t0
    detail = ""
    while True:
        ok, detail = check()
        if ok:
            return True, detail, time.monotonic() - t0
        now = time.monotonic()
        if now >= next_alive:  # the process dying is a failure now, not after the timeout
            up, why = alive()
            if not up:
                return False, f"serve process is gone ({why}); last check: {detail}", now - t0
            next_alive = now + 2.0
        if now - t0 > timeout:
            return False, f"timed out after {timeout:.0f}s: {detail}", now - t0
        time.sleep(POLL_S)


def wait_ready(
    cfg: Config, nodes: Nodes, timeouts: dict[str, float] | None = None, on_stage: Callable[[Stage], None] | None = None
) -> Readiness:
    t = {**DEFAULT_TIMEOUTS, **(timeouts or {})}
    res = Readiness()
    base = api_base(cfg, nodes)
    model = served_model(cfg)

    def alive() -> tuple[bool, str]:
        p = serve_process(cfg, nodes)
        return p["alive"], p["reason"]

    def ray_ok() -> tuple[bool, str]:
        m = ray_membership(cfg, ray_nodes(nodes))
        if m["error"]:
            return False, f"Ray head not answering: {m['error']}"
        missing = "; missing " + ", ".join(m["missing"]) if m["missing"] else ""
        return m["ready"], f"{m['total']:g}/{m['expected_total']} {m['resource']} registered{missing}"

    def health() -> tuple[bool, str]:
        code, body = _http(base + "/health")
        return code == 200, f"GET /health -> {code or body}"

    def listed() -> tuple[bool, str]:
        code, body = _http(base + "/v1/models")
        if code != 200:
            return False, f"GET /v1/models -> {code or body}"
        ids = [m.get("id") for m in json.loads(body).get("data", [])]
        return model in ids, f"models: {ids}"

    def serving() -> tuple[bool, str]:
        code, body = _http(
            base + "/v1/completions", {"model": model, "prompt": "ping", "max_tokens": 1, "temperature": 0}, timeout=60
        )
        return code == 200, f"one-token completion -> {code or body}"

    plan = [(S.RAY_READY, ray_ok), (S.LOADING, health), (S.MODEL_LISTED, listed), (S.SERVING, serving)]
    for name, check in plan:
        ok, detail, secs = _wait(check, t[name], alive)
        stage = Stage(name, ok, round(secs, 3), detail, at=time.time())
        res.stages.append(stage)
        if on_stage:
            on_stage(stage)
        if not ok:
            res.state = STAGES[STAGES.index(name) - 1]
            res.reason = f"stopped before {name}: {detail}"
            res.logs = failure_logs(cfg, nodes)
            return res
        res.state = name
    ok, state, detail, secs = _wait_supervised(cfg, nodes, t["SUPERVISED"])
    if detail:  # "" : no supervisor on this deploy (serve_supervise off), no stage
        stage = Stage("SUPERVISED", ok, round(secs, 3), detail, at=time.time())
        res.stages.append(stage)
        if on_stage:
            on_stage(stage)
    if not ok:
        res.state, res.reason = state, f"stopped before SUPERVISED: {detail}"
        res.logs = failure_logs(cfg, nodes)
        return res
    res.ok = True
    res.ready_at = time.time()
    return res


def judge_supervision(sup: dict[str, Any], proc: dict[str, Any]) -> tuple[str, str]:
    """What the supervisor says of the recorded service, after deploy's readiness passed:
    ``("armed" | "wait" | "failed" | "absent", detail)``. ``sup`` is :func:`supervision`,
    ``proc`` :func:`serve_process` (the record as it is now: a supervisor restart rewrites it)."""
    rec = proc.get("record") or {}
    if sup.get("known") and not sup.get("present"):
        return "absent", ""
    if not sup.get("known"):
        return "wait", f"supervisor not readable: {sup.get('reason')}"
    if not sup.get("running"):
        return "wait", f"supervisor container {sup.get('container')} not running"
    if sup.get("generation") != rec.get("generation"):
        return "wait", f"supervisor not yet on this deploy (state {sup.get('state')})"
    state, cause = sup.get("state"), sup.get("last_cause")
    if state == "FAILED":
        return "failed", f"supervision gave up: {sup.get('reason')}; last cause: {cause}"
    if state == "RECOVERING":
        return "wait", f"supervisor recovering (restart {sup.get('restart_count')}): {cause}"
    if state == "WATCHING" and sup.get("serving_pid") == rec.get("pid") and proc.get("alive"):
        after = f" after {sup.get('restart_count')} restart(s), last: {cause}" if sup.get("restart_count") else ""
        return "armed", f"supervisor WATCHING pid {rec.get('pid')}{after}"
    return "wait", f"supervisor {state}, not yet seen pid {rec.get('pid')} serve"


def _wait_supervised(cfg: Config, nodes: Nodes, timeout: float) -> tuple[bool, ServiceState, str, float]:
    """Until the supervisor is armed on the recorded process (deploy returns 0 only then, so
    status agrees with it and a failure right after deploy is recovered)."""
    t0 = time.monotonic()
    recovered = False
    while True:
        verdict, detail = judge_supervision(supervision(cfg, nodes), serve_process(cfg, nodes))
        took = time.monotonic() - t0
        if verdict == "absent":
            return True, S.SERVING, "", took
        if verdict == "armed":
            return True, S.SERVING, detail, took
        if verdict == "failed":
            return False, S.FAILED, detail, took
        recovered = recovered or detail.startswith("supervisor recovering")
        if took > timeout or (took > ARM_S and not recovered):
            return False, S.RECOVERING if recovered else S.SERVING, f"timed out after {took:.0f}s: {detail}", took
        time.sleep(0.5)


def failure_logs(cfg: Config, nodes: Nodes, lines: int = 30) -> dict[str, str]:
    """The last lines that explain a failure: FlagScale output, Ray logs, container logs."""
    out: dict[str, str] = {}
    m = nodes.master.name
    r = nodes.run(["tail", "-n", str(lines), serve_log(cfg)], [m])[m]
    out[f"{m}: flagscale output"] = r.stdout if r.ok else r.stderr
    ray = nodes.shell_in_container(
        "for f in raylet.out raylet.err; do p=/tmp/ray/session_latest/logs/$f; "
        '[ -f "$p" ] && { echo "== $f"; tail -n "$1" "$p"; }; done; true',
        str(lines // 2),
    )
    for host, rr in ray.items():
        if host != m:
            out[f"{host}: ray logs"] = rr.stdout or rr.stderr
    logs = nodes.run(["docker", "logs", "--tail", str(lines), cfg.container_name])
    for host, rr in logs.items():
        out[f"{host}: container logs"] = (rr.stdout + rr.stderr).strip()
    return out


# --------------------------------------------------------------------------- status


def _instant(text: Any) -> float | None:
    """Seconds since the epoch of an ISO time as docker (nanoseconds, Z) or the record writes it."""
    from datetime import UTC, datetime

    if not isinstance(text, str) or not text or text.startswith("0001-"):
        return None
    t = text.strip().rstrip("Z")
    if "." in t:
        head, frac = t.split(".", 1)
        digits = "".join(c for c in frac if c.isdigit())[:6]
        t = f"{head}.{digits}" if digits else head
    try:
        return datetime.fromisoformat(t).replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def engine_deaths(record: dict[str, Any] | None, ctr: dict[str, Any], cfg_container: str,
                  dead_workers: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """What of the recorded service died, and where, judged from facts read at once (no Ray timeout).

    ``record``: the service record written at deploy (``started_at``, ``containers_started_at``);
    ``ctr``: :func:`containers` per host; ``dead_workers``: engine workers Ray reports DEAD
    (``{"node", "pid", "name", "cause"}``). A node's container that started after the service
    did (its StartedAt differs from the one recorded at deploy, or, for an older record, is
    later than the service's start) lost its Ray node and pipeline stage: the node rebooted
    or the container was restarted.
    """
    out: list[dict[str, Any]] = []
    if not record:
        return out
    recorded = record.get("containers_started_at") or {}
    svc_start = _instant(record.get("started_at"))
    for host, c in ctr.items():
        now = c.get("started_at")
        if not c.get("running") or not now:
            continue
        before = recorded.get(host)
        if before:
            restarted = before != now and (_instant(now) or 0) > (_instant(before) or 0)
        else:
            t = _instant(now)
            restarted = t is not None and svc_start is not None and t > svc_start
        if restarted:
            out.append({"node": host, "what": f"container {cfg_container}", "started_at": now,
                        "reason": f"{host}: container {cfg_container} started at {now}, after the service "
                                  f"started at {record.get('started_at')} (the node rebooted or the container "
                                  f"was restarted): its Ray node and pipeline stage are gone"})
    for w in dead_workers or []:
        out.append({"node": w.get("node"), "what": f"engine worker {w.get('name') or 'actor'} pid {w.get('pid')}",
                    "pid": w.get("pid"),
                    "reason": f"{w.get('node')}: engine worker {w.get('name') or 'actor'} (pid {w.get('pid')}) "
                              f"is dead ({w.get('cause') or 'no cause given'})"})
    return out


def _version_summary(v: Any) -> dict[str, Any] | None:
    """A recorded version without its release snapshot: what status and rollback print."""
    if not isinstance(v, dict) or not v.get("fingerprint"):
        return None
    rel = v.get("release") or {}
    return {"fingerprint": str(v["fingerprint"])[:16], "deployed_at": v.get("deployed_at"), "image": v.get("image"),
            "image_ref": (rel.get("image") or {}).get("ref"),
            "flagscale_commit": (rel.get("flagscale") or {}).get("commit"),
            "engine_args": effective_engine_args(rel) if rel.get("serve") else None}


def derive_state(*, unreachable: bool, problems: bool, recorded: bool, alive: bool, health: int,
                 ray_members: bool, ray_ready: bool, listed: bool, probed: bool, served: bool,
                 engine_dead: bool = False, recovering: bool = False) -> ServiceState:
    """The service state from what status observed, most severe first.

    ``health`` is the HTTP status of ``/health`` (0: no answer); ``problems``: a container,
    the recorded serve process or a Ray member that should be there is not; ``served``: the
    one-token completion answered (only asked when ``probed``); ``engine_dead``: a part of the
    recorded engine is known dead (:func:`engine_deaths`): FAILED, never LOADING;
    ``recovering``: the supervisor is restarting the group (a node may be unreachable while
    it reboots): RECOVERING.
    """
    if recovering and recorded:
        return S.RECOVERING
    if unreachable:
        return S.UNREACHABLE  # never report STOPPED for a node flagops could not ask
    if engine_dead and recorded:
        return S.FAILED
    if not recorded and health == 0 and not ray_members:
        return S.STOPPED
    if problems:
        return S.DEGRADED
    if listed and (served or not probed):
        return S.SERVING if served else S.MODEL_LISTED
    if health == 200:
        return S.MODEL_LISTED if listed else S.LOADING
    if ray_ready:
        return S.LOADING
    if alive:
        return S.RAY_FORMING
    return S.STOPPED


def status(cfg: Config, nodes: Nodes, probe_completion: bool = False) -> dict[str, Any]:
    """Everything flagops knows about the service, gathered from all nodes in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    base = api_base(cfg, nodes)
    with ThreadPoolExecutor(max_workers=6) as pool:
        f_sup = pool.submit(supervision, cfg, nodes)
        f_ctr = pool.submit(containers, cfg, nodes)
        f_ray = pool.submit(ray_nodes, nodes)
        f_proc = pool.submit(serve_process, cfg, nodes)
        f_health = pool.submit(_http, base + "/health")
        f_models = pool.submit(_http, base + "/v1/models")
        ctr, ray, proc, health, models = (f.result() for f in (f_ctr, f_ray, f_proc, f_health, f_models))
    member = ray_membership(cfg, ray)
    model = served_model(cfg)
    listed = models[0] == 200 and model in [m.get("id") for m in json.loads(models[1]).get("data", [])]
    problems: list[str] = []
    unreachable = [h for h, c in ctr.items() if not c.get("reachable", True)]
    for host, c in ctr.items():
        if not c.get("running"):
            problems.append(
                f"{host}: container {cfg.container_name} not running ({c.get('reason') or c.get('status')})"
            )
    if proc["recorded"] and not proc["alive"]:
        problems.append(f"serve process {proc.get('pid')} is gone ({proc['reason']})")
    if member["missing"] and not member["error"]:
        problems.append("Ray is missing " + ", ".join(member["missing"]))
    record = proc.get("record") if proc["recorded"] else None
    by_ip = {h.address: h.name for h in cfg.hosts}
    svc_start = _instant((record or {}).get("started_at"))
    dead_workers = [
        {**a, "node": by_ip.get(a.get("ip"), a.get("ip"))}
        for a in ray.get("dead_actors", [])
        if svc_start is None or not a.get("end_time") or a["end_time"] / 1000 >= svc_start
    ]
    deaths = engine_deaths(record, ctr, cfg.container_name, dead_workers)
    sup = f_sup.result()
    current = bool(record) and sup.get("known") and sup.get("fresh") \
        and sup.get("generation") == (record or {}).get("generation")
    recovering = bool(current and sup.get("state") == "RECOVERING")
    if recovering:
        problems.append(f"{cfg.master.name}: supervisor restarting the group (restart {sup['restart_count']}): "
                        f"{sup.get('last_cause')}")
    elif current and sup.get("state") == "FAILED":
        deaths.append({"node": cfg.master.name, "what": "supervision",
                       "reason": f"{cfg.master.name}: supervision gave up: {sup.get('reason')}; "
                                 f"last cause: {sup.get('last_cause')}"})
    elif (current and sup.get("armed") and sup.get("serving_pid") == (record or {}).get("pid")
          and health[0] != 200 and not deaths):
        deaths.append({"node": cfg.master.name, "what": "engine",
                       "reason": f"{cfg.master.name}: the engine stopped answering (GET /health -> "
                                 f"{health[0] or 'no answer'}) after serving since {sup.get('serving_since')}"})
    problems.extend(d["reason"] for d in deaths)
    if record and sup.get("known") and not sup.get("running"):
        problems.append(f"{cfg.master.name}: supervision is not running (container {sup.get('container')} "
                        f"{'stopped' if sup.get('present') else 'absent'}): nothing brings the service back")

    # The completion probe only decides SERVING vs MODEL_LISTED. With a node, container or
    # Ray member already known to be gone the state is DEGRADED (or UNREACHABLE) anyway, and
    # the request would hang on the broken pipeline for its whole timeout (60 s).
    serving = False
    if listed and probe_completion and not problems and not unreachable and not deaths:
        serving = _http(base + "/v1/completions", {"model": model, "prompt": "ping", "max_tokens": 1}, 60)[0] == 200

    state = derive_state(
        unreachable=bool(unreachable), problems=bool(problems), recorded=proc["recorded"], alive=proc["alive"],
        health=health[0], ray_members=any(v["member"] for v in member["hosts"].values()),
        ray_ready=member["ready"], listed=listed, probed=probe_completion, served=serving,
        engine_dead=bool(deaths), recovering=recovering,
    )

    per_node = {}
    for h in cfg.hosts:
        per_node[h.name] = {
            "address": h.address,
            "role": h.role,
            "container": ctr.get(h.name, {}),
            "ray": member["hosts"].get(h.name, {}),
        }
    per_node[cfg.master.name]["serve"] = {k: v for k, v in proc.items() if k != "record"}
    return {
        "release": cfg.release["name"],
        "state": state,
        "model": model,
        "endpoint": endpoint(cfg),
        "via": nodes.via(nodes.master.name) if base != endpoint(cfg) else None,
        "health": health[0],
        "problems": problems,
        "failed": deaths,  # what of the recorded engine died, and where (node, what, reason)
        "supervision": sup,
        "version": _version_summary((record or {}).get("version")),
        "previous": _version_summary((record or {}).get("previous")),
        "ray": {k: member[k] for k in ("total", "expected_total", "resource", "missing", "error")},
        "nodes": per_node,
    }


# --------------------------------------------------------------------------- logs


def collect_logs(cfg: Config, nodes: Nodes, rendered: dict[str, str], out: Path) -> dict[str, Any]:
    """One tarball: each node's FlagScale output, Ray logs, container logs, and the rendered configs."""
    import secrets

    tag = secrets.token_hex(6)
    summary: dict[str, Any] = {}
    with tarfile.open(out, "w:gz") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))

        for rel, text in rendered.items():
            add(f"rendered/{rel}", text.encode())
        m = nodes.master.name
        r = nodes.run(["cat", serve_log(cfg)], [m])[m]
        add(f"{m}/flagscale/host_0_localhost.output", (r.stdout if r.ok else r.stderr).encode())
        clog = nodes.run(["docker", "logs", "--tail", "5000", cfg.container_name])
        for host, rr in clog.items():
            add(f"{host}/container.log", (rr.stdout + rr.stderr).encode())
        # Ray logs: tar inside the container to a file flagops names, fetch it, remove it.
        remote = f"/tmp/flagops-raylogs-{tag}.tgz"
        script = (
            'docker exec "$1" tar -czf - -C /tmp/ray/session_latest logs > "$2" 2>/dev/null; '
            'test -s "$2" || { rm -f "$2"; exit 3; }'
        )
        made = nodes.run(["bash", "-c", script, "flagops", cfg.container_name, remote])
        for host, rr in made.items():
            if rr.ok:
                local = out.parent / f".{host}-{tag}.tgz"
                if nodes.fetch(host, remote, local):
                    tar.add(local, arcname=f"{host}/ray-logs.tgz")
                    local.unlink()
                nodes.run(["rm", "-f", remote], [host])
            summary[host] = {"ray_logs": rr.ok}
    return {"file": str(out), "nodes": summary}
