"""``flagops check``: every known multi-node failure, judged across all nodes at once.

One read-only playbook (playbooks/check.yml) runs the host preflight (roles/preflight) and
collects each node's cluster facts from its host and from inside its running container
(roles/check, module ``flagops_check``). :func:`judge` compares them all together, here,
once: a difference between nodes is named per node, and every failure carries the node,
what was found, what is required and the fix. Nothing on a node is changed or killed.

The checks and the failure modes they prevent (README, "flagops check"):

- ``node_ip`` / ``ray_nodes``: the inventory address bound on the node, VLLM_HOST_IP and
  Ray's node IP equal to it (C1)
- ``socket_ifname`` / ``hostname``: GLOO/NCCL_SOCKET_IFNAME = the interface carrying the
  address; the container's hostname not resolving to 127.x (C2)
- ``port_*``: pinned ports reached from every other node's container, not squatted (C3, C9)
- ``collective`` / ``ray_cgraph_timeout``: a short all-reduce across the containers;
  RAY_CGRAPH_get_timeout in every raylet's environment (C4)
- ``infiniband``: devices, IPC_LOCK and memlock=-1 in the container; NET/IB in NCCL (C5)
- ``parity``: python, torch, vllm, ray, flag_gems, NCCL, FlagScale install key, image and
  driver the same on every node (C6)
- ``dev_shm`` / ``ulimit_*``: measured inside the running container (C7)
- ``weights``: every node's view of the weights = the verified manifest (C8)
- ``leftover``: a raylet, Ray head or engine flagops did not start (pid + command line) (C9)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flagops import render
from flagops.config import Config

# Compared on every node and named in the report; any other package difference is listed too.
PARITY_PACKAGES = {
    "torch": ("torch",),
    "vllm": ("vllm",),
    "ray": ("ray",),
    "flag_gems": ("flag-gems", "flag_gems"),
    "nccl": ("nvidia-nccl-cu13", "nvidia-nccl-cu12", "nvidia-nccl-cu11"),
    "flagscale": ("flag-scale", "flagscale"),
}
OTHER_PACKAGE_LIMIT = 10


@dataclass
class Failure:
    node: str
    check: str
    found: Any
    required: Any
    fix: str

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "check": self.check, "found": self.found, "required": self.required,
                "fix": self.fix}

    def line(self) -> str:
        return f"{self.node}: {self.check}: found {self.found}; required {self.required}; fix: {self.fix}"


@dataclass
class CheckReport:
    ok: bool
    failures: list[Failure]
    passed: list[str]
    skipped: dict[str, str]
    seconds: float
    nodes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "failures": [f.to_dict() for f in self.failures], "passed": self.passed,
                "skipped": self.skipped, "seconds": self.seconds, "nodes": self.nodes}


def size_bytes(text: Any) -> int:
    """``32G`` / ``1g`` / ``512m`` / ``1048576`` -> bytes (docker's --shm-size units)."""
    s = str(text or "0").strip().lower().rstrip("b")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}.get(s[-1:], 1)
    digits = s[:-1] if s[-1:] in "kmgt" else s
    return int(float(digits) * mult) if digits.replace(".", "", 1).isdigit() else 0


@dataclass
class Expect:
    """What a healthy cluster looks like, from the inventory, the release and the contract."""

    hosts: list[dict[str, Any]]  # name, address, nic, slots, allow_tcp
    master: str
    container: str
    slot_type: str
    ray_resource: str
    pinned_ports: list[dict[str, Any]]
    shm_bytes: int
    ulimits: dict[str, int]
    ray_envs: dict[str, str]
    model_path: str
    gcs_fallback_port: int | None = None

    @classmethod
    def from_config(cls, cfg: Config) -> Expect:
        c = render.contract(cfg)
        rel = cfg.release
        envs = {k: str(v) for k, v in (rel.get("runner", {}).get("envs") or {}).items()
                if k == "RAY_CGRAPH_get_timeout" and v is not None}
        return cls(
            hosts=[{"name": h.name, "address": h.address, "nic": h.nic, "slots": h.slots} for h in cfg.hosts],
            master=cfg.master.name,
            container=cfg.container_name,
            slot_type=cfg.slot_type,
            ray_resource=c["ray_resource"],
            pinned_ports=c["pinned_ports"],
            shm_bytes=size_bytes((rel.get("container") or {}).get("shm_size")),
            ulimits={k: int(v) for k, v in ((rel.get("container") or {}).get("ulimits") or {}).items()},
            ray_envs=envs,
            model_path=c["container_model_dir"],
        )

    def ports_on(self, host: str) -> list[dict[str, Any]]:
        return [p for p in self.pinned_ports if p["on"] == "all" or (p["on"] == "master" and host == self.master)]


def _ifname_covers(value: str | None, ifname: str) -> bool:
    """Does an NCCL/GLOO *_SOCKET_IFNAME value select ``ifname``? (``a,b`` lists, prefixes,
    ``=exact``, ``^excluded``)."""
    if not value:
        return False
    if value.startswith("^"):
        return not any(ifname.startswith(x) for x in value[1:].split(",") if x)
    for item in value.split(","):
        if item.startswith("="):
            if item[1:] == ifname:
                return True
        elif item and ifname.startswith(item):
            return True
    return False


def _pkg(dists: dict[str, str], names: tuple[str, ...]) -> str | None:
    for n in names:
        if n in dists:
            return dists[n]
    return None


def _differ(values: dict[str, Any]) -> bool:
    return len({repr(v) for v in values.values()}) > 1


def _who(values: dict[str, Any]) -> str:
    return ", ".join(f"{n} {v if v is not None else 'none'}" for n, v in values.items())


def _gcs_address(proc: dict[str, Any]) -> str | None:
    for tok in proc.get("cmdline", "").split():
        for key in ("--gcs-address=", "--gcs_address="):
            if tok.startswith(key):
                return tok[len(key):]
    return None


def _arg(proc: dict[str, Any], *keys: str) -> str | None:
    for tok in proc.get("cmdline", "").split():
        for key in keys:
            if tok.startswith(key + "="):
                return tok[len(key) + 1:]
    return None


def judge(exp: Expect, preflight: dict[str, Any] | None, nodes: dict[str, dict[str, Any]],
          unreachable: dict[str, str] | None = None,
          run_error: str | None = None, prelaunch: bool = False) -> tuple[list[Failure], list[str], dict[str, str]]:
    """Every failure on every node, the checks that passed, and the ones skipped (why).

    ``prelaunch``: deploy's check before it (re)launches; the checks of the running
    service (Ray's node list) are then skipped, since the launch replaces what they see
    (a record left by a service that died with its containers must not refuse the
    deploy that restarts it).

    ``nodes``: inventory name -> the ``flagops_check`` module's result (host, container,
    master); ``preflight``: the preflight role's ``preflight_report``.
    """
    fails: list[Failure] = []
    passed: list[str] = []
    skipped: dict[str, str] = {}
    unreachable = dict(unreachable or {})
    failed_checks: set[str] = set()

    def fail(node: str, check: str, found: Any, required: Any, fix: str) -> None:
        fails.append(Failure(node, check, found, required, fix))
        failed_checks.add(check.split(":")[0])

    names = [h["name"] for h in exp.hosts]
    by_name = {h["name"]: h for h in exp.hosts}

    # The host preflight (every failure it found, per node).
    for f in (preflight or {}).get("failures", []):
        if f.get("check") == "ssh":
            unreachable.setdefault(f["host"], "unreachable")
            continue
        fail(f.get("host", "?"), f"preflight.{f.get('check')}", f.get("found"), f.get("required"), f.get("fix", ""))
    for n, why in unreachable.items():
        fail(n, "ssh", why, f"ssh to {by_name.get(n, {}).get('address', n)}",
             "start the node and sshd; check ansible_host/ansible_port/ansible_user and the key")

    live: dict[str, dict[str, Any]] = {}
    for n in names:
        r = nodes.get(n)
        if n in unreachable:
            continue
        if r is None:
            fail(n, "check_facts", "the check playbook returned no facts for this node"
                 + (f": {run_error}" if run_error else ""), "the flagops_check module's result",
                 "see the run's artifacts under $FLAGOPS_HOME/runs/artifacts/*-check-*")
            continue
        hc = (r.get("host") or {}).get("container") or {}
        if not hc.get("exists"):
            fail(n, "container", f"no container {exp.container}", f"{exp.container} running",
                 "flagops provision INVENTORY (creates the container)")
            continue
        if not hc.get("running"):
            fail(n, "container", f"{exp.container} is not running", f"{exp.container} running",
                 f"docker start {exp.container} on {n}, or flagops provision INVENTORY")
            continue
        c = r.get("container") or {}
        if c.get("error"):
            fail(n, "container_exec", str(c["error"])[-300:], f"docker exec {exp.container} python3 works",
                 "check the release's runner.before_start and the serving env in the image")
            continue
        live[n] = r
    master = nodes.get(exp.master, {}).get("master") or {}

    # ---------------------------------------------------------------- C1 node IP
    for n, r in live.items():
        h, c, want = r["host"], r["container"], by_name[n]["address"]
        bound = {a["address"]: a["ifname"] for a in h.get("addresses", [])}
        if want not in bound:
            fail(n, "node_ip", f"{want} not bound (have {', '.join(sorted(bound)) or 'none'})",
                 f"the inventory address {want} on an interface of {n}",
                 f"set ansible_host of {n} to the address of its cluster interface")
            continue
        got = (c.get("env") or {}).get("VLLM_HOST_IP")
        if got != want:
            fail(n, "node_ip.VLLM_HOST_IP", got or "unset", want,
                 "flagops provision INVENTORY --tags container (sets VLLM_HOST_IP per node)")
    # ---------------------------------------------------------------- C2 interfaces and names
    for n, r in live.items():
        h, c, want = r["host"], r["container"], by_name[n]["address"]
        bound = {a["address"]: a["ifname"] for a in h.get("addresses", [])}
        ifname = bound.get(want)
        if ifname:
            for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
                val = (c.get("env") or {}).get(var)
                if not _ifname_covers(val, ifname):
                    fail(n, f"socket_ifname.{var}", val or "unset", f"{ifname} (carries {want} on {n})",
                         f"set flagops_nic: {ifname} for {n} in the inventory, then flagops provision "
                         "INVENTORY --tags container")
        res = c.get("hostname_resolves") or []
        loop = [a for a in res if a.startswith("127.")]
        if loop or not res:
            fail(n, "hostname", f"{c.get('hostname')} resolves to {', '.join(res) or 'nothing'} in the container",
                 f"{c.get('hostname')} -> {want} (gloo and Ray pick their address from it)",
                 f"in /etc/hosts of {n} map {c.get('hostname')} to {want}, not 127.x; then docker restart "
                 f"{exp.container} (it copies the host's /etc/hosts)")
    # ---------------------------------------------------------------- C3 ports between nodes
    gcs_port = master.get("gcs_port")
    service = master.get("service")
    serving = bool(service)
    ours_by_node: dict[str, set[int]] = {}
    leftovers: dict[str, list[dict[str, Any]]] = {}
    rec_pid, rec_start = (service or {}).get("pid"), str((service or {}).get("pid_start") or "")
    cluster = f"{by_name[exp.master]['address']}:{gcs_port}" if serving and gcs_port else None
    for n, r in live.items():
        h = r["host"]
        procs = h.get("processes") or []
        parents = {int(k): v for k, v in (h.get("parents") or {}).items()}
        serve_root = None
        if n == exp.master and rec_pid is not None:
            for p in procs + [{"pid": int(k), "cpid": None} for k in parents]:
                if p.get("cpid") == rec_pid and (not rec_start or str(p.get("start")) == rec_start):
                    serve_root = p["pid"]
        ours: set[int] = set()
        strays = []
        for p in procs:
            kind = p["kind"]
            if kind == "raylet":
                is_ours = cluster is not None and _gcs_address(p) == cluster
            elif kind == "gcs_server":
                is_ours = (cluster is not None and n == exp.master
                           and _arg(p, "--gcs_server_port") == str(gcs_port))
            else:  # engine: in the recorded serve process tree
                is_ours = False
                q, seen = p["pid"], 0
                while q and seen < 64 and serve_root is not None:
                    if q == serve_root:
                        is_ours = True
                        break
                    q, seen = parents.get(q), seen + 1
            (ours.add(p["pid"]) if is_ours else strays.append(p))
        ours_by_node[n] = ours
        leftovers[n] = strays
    for n, r in live.items():
        h, c = r["host"], r["container"]
        mine = exp.ports_on(n)
        for spec in mine:
            port = spec["port"]
            holders = (h.get("listeners") or {}).get(str(port)) or []
            own_listener = (c.get("own_ports") or {}).get(str(port)) == "flagops-check-listener"
            bad = []
            for x in holders:
                if own_listener:
                    break
                pid = x.get("pid")
                if pid is None:
                    bad.append("a process not visible to flagops (ss -ltnp on the host)")
                elif not x.get("ours_container"):
                    bad.append(f"host pid {pid} outside {exp.container}: {x.get('cmdline', '?')[:160]}")
                elif serving and (pid in _tree(ours_by_node.get(n, set()), h)
                                  or (cluster is not None and cluster in str(x.get("cmdline", "")))):
                    continue  # the service's own process, or a Ray process of flagops' cluster
                else:
                    bad.append(f"pid {x.get('cpid', pid)} in {exp.container} (host pid {pid}), not started by "
                               f"flagops: {x.get('cmdline', '?')[:160]}")
            if bad:
                fail(n, f"port_{port}", f"{spec['what']} port {port} held by " + "; ".join(bad),
                     f"port {port} free, or held by flagops' own service",
                     f"stop that process yourself (flagops never kills what it did not start), e.g. kill "
                     f"{holders[0].get('pid') or '<pid>'} on {n}; or change the release's port")
    for n, r in live.items():
        for peer, res in ((r.get("container") or {}).get("probes") or {}).items():
            for port, st in res.items():
                if st in ("open", "refused"):
                    continue
                what = next((p["what"] for p in exp.pinned_ports if str(p["port"]) == port), "pinned")
                fail(n, f"port_{port}.reach", f"{n}'s container -> {peer} {by_name.get(peer, {}).get('address')}:"
                     f"{port} ({what}): {st}", "a TCP connection (open) within the probe window",
                     f"allow TCP {port} from {by_name[n]['address']} to {peer} (host firewall / security group); "
                     "Ray needs all TCP ports open between nodes")
    # ---------------------------------------------------------------- FlagScale's ssh to the workers
    ssh = (live.get(exp.master, {}).get("container") or {}).get("ssh")
    if len(names) < 2:
        skipped["ssh_trust"] = "one node: FlagScale's runner starts no worker over ssh"
    elif ssh is None:
        if exp.master in live:
            skipped["ssh_trust"] = "the master's container reported no ssh probe"
    else:
        for peer, res in sorted(ssh.items()):
            if not res.get("ok"):
                why = res.get("error") or f"rc={res.get('rc')}"
                fail(peer, "ssh_trust",
                     f"{exp.master}'s container -> ssh -p {res.get('port')} {res.get('address')}: {why}",
                     "FlagScale's runner logs in to every worker from the master's container (no password, "
                     "pinned host key)",
                     "flagops provision INVENTORY --tags ssh_trust (the worker lost the master container's key or "
                     "changed its host key, e.g. a rebuilt node)")
    # ---------------------------------------------------------------- C4 collective, cgraph timeout
    coll = {n: (r.get("container") or {}).get("collective") for n, r in live.items()}
    if any(coll.values()):
        for n, cr in coll.items():
            if cr and not cr.get("ok"):
                fail(n, "collective", f"{cr.get('backend')} all-reduce across {len(names)} nodes failed "
                     f"after {cr.get('seconds')}s (rc={cr.get('rc')}): {cr.get('tail', '')[-400:]}",
                     f"a {cr.get('backend')} all-reduce across every node's container",
                     "fix the failures above first (addresses, interfaces, ports); the tail is the rank's "
                     "output" + (" with NCCL_DEBUG=INFO" if cr.get("backend") == "nccl" else ""))
    else:
        skipped["collective"] = "not asked (--no-collective)"
    if exp.ray_envs.get("RAY_CGRAPH_get_timeout") is None:
        fail("all", "ray_cgraph_timeout", "RAY_CGRAPH_get_timeout not in the release's runner.envs",
             "RAY_CGRAPH_get_timeout exported before ray start (vLLM's own default does not take effect)",
             "add runner.envs.RAY_CGRAPH_get_timeout: 60 to the release")
    # ---------------------------------------------------------------- C1/C4 after start: Ray
    if prelaunch:
        skipped["ray_nodes"] = ("before a launch: deploy (re)starts Ray; its node list is checked by flagops check "
                                "afterwards")
    elif serving and cluster:
        for n, r in live.items():
            raylets = [p for p in r["host"].get("processes") or [] if p["pid"] in ours_by_node.get(n, set())
                       and p["kind"] == "raylet"]
            want = by_name[n]["address"]
            if not raylets:
                fail(n, "ray_nodes", f"no raylet of the cluster {cluster} on {n}",
                     f"one raylet joined to {cluster}", "flagops deploy RELEASE --restart (the worker's ray "
                     "start failed; FlagScale's run script does not stop on it)")
                continue
            for p in raylets:
                ip = _arg(p, "--node_ip_address", "--node-ip-address")
                if ip != want:
                    fail(n, "ray_nodes.node_ip", f"raylet pid {p['cpid']} runs as {ip}", want,
                         "set VLLM_HOST_IP/flagops_nic for this node and flagops deploy RELEASE --restart")
                env = p.get("env") or {}
                for k, v in exp.ray_envs.items():
                    if env.get(k) != v:
                        fail(n, f"ray_cgraph_timeout.{k}", f"raylet pid {p['cpid']} has {k}={env.get(k)}",
                             f"{k}={v} in the environment before ray start",
                             "flagops deploy RELEASE --restart (FlagScale exports runner.envs before ray start)")
                if env.get("VLLM_HOST_IP") not in (None, want):
                    fail(n, "ray_nodes.VLLM_HOST_IP", f"raylet has VLLM_HOST_IP={env.get('VLLM_HOST_IP')}", want,
                         "flagops provision INVENTORY --tags container, then flagops deploy RELEASE --restart")
        rn = master.get("ray_nodes")
        if rn is None:
            fail(exp.master, "ray_nodes", f"the Ray head did not answer: {master.get('ray_nodes_error')}",
                 "the head's node list", "flagops status; flagops logs")
        else:
            alive = {x["ip"]: x for x in rn if x.get("state") == "ALIVE"}
            want_ips = {h["address"] for h in exp.hosts}
            extra = sorted(set(alive) - want_ips)
            missing = sorted(want_ips - set(alive))
            if extra or missing:
                fail("all", "ray_nodes", f"alive Ray nodes {sorted(alive)}",
                     f"exactly the inventory addresses {sorted(want_ips)}",
                     (f"a node joined as {', '.join(extra)}: set VLLM_HOST_IP/flagops_nic; " if extra else "")
                     + (f"missing {', '.join(missing)}: flagops logs; flagops deploy RELEASE --restart"
                        if missing else ""))
            total = sum(float(x.get("resources", {}).get(exp.ray_resource, 0)) for x in alive.values())
            want_total = sum(h["slots"] for h in exp.hosts)
            if total < want_total:
                fail("all", "ray_nodes.resources", f"{total:g} {exp.ray_resource}",
                     f"{want_total} {exp.ray_resource} (the hostfile's slots)",
                     "flagops deploy RELEASE --restart; check each node's slots")
    else:
        skipped["ray_nodes"] = "no service recorded: Ray's node list is checked once flagops deploy started it"
    # ---------------------------------------------------------------- C5 InfiniBand / RoCE
    for n, r in live.items():
        h, c = r["host"], r["container"]
        if not h.get("infiniband"):
            continue
        hc = h["container"]
        if not hc.get("privileged") and not any(str(d).startswith("/dev/infiniband") for d in hc.get("devices", [])):
            fail(n, "infiniband.devices", "host has /dev/infiniband; the container has no access to it",
                 "--device /dev/infiniband (or --privileged)", "set container.privileged: true in the release "
                 "and flagops provision INVENTORY --tags container")
        if not c.get("infiniband_devices"):
            fail(n, "infiniband.in_container", "no /dev/infiniband inside the container",
                 f"the host's {', '.join(h['infiniband'])}", "recreate the container with the devices "
                 "(flagops provision INVENTORY --tags container)")
        caps = [x.upper().removeprefix("CAP_") for x in hc.get("cap_add", [])]
        if not hc.get("privileged") and "IPC_LOCK" not in caps:
            fail(n, "infiniband.ipc_lock", f"cap_add {hc.get('cap_add') or []}", "IPC_LOCK (or --privileged)",
                 "set container.privileged: true in the release")
        memlock = ((c.get("ulimits") or {}).get("memlock") or {}).get("hard")
        if memlock != -1:
            fail(n, "infiniband.memlock", f"memlock {memlock} inside the container", "unlimited (-1)",
                 "set container.ulimits.memlock: -1 in the release (NCCL silently falls back to NET/Socket)")
        cr = c.get("collective") or {}
        if cr.get("backend") == "nccl" and cr.get("ok") and "NET/IB" not in cr.get("net", []) \
                and not r.get("allow_tcp"):
            fail(n, "infiniband.nccl_net", f"NCCL used {', '.join(cr.get('net') or ['no network transport'])}",
                 "NET/IB", "fix the devices/IPC_LOCK/memlock above, or set flagops_allow_tcp: true for this host")
    # ---------------------------------------------------------------- C6 version parity
    if len(live) > 1:
        rows: dict[str, dict[str, Any]] = {"python": {n: r["container"].get("python") for n, r in live.items()}}
        for label, pk in PARITY_PACKAGES.items():
            rows[label] = {n: _pkg(r["container"].get("dists") or {}, pk) for n, r in live.items()}
        rows["flagscale_install_key"] = {n: (r["container"].get("install_key") or None) for n, r in live.items()}
        rows["image"] = {n: r["host"]["container"].get("image_id") for n, r in live.items()}
        drivers = {n: ((preflight or {}).get("per_host", {}).get(n) or {}).get("driver") for n in live}
        if any(drivers.values()):
            rows["driver"] = drivers
        ref = live.get(exp.master) and exp.master or next(iter(live))
        for label, vals in rows.items():
            if _differ(vals):
                for n, v in vals.items():
                    if v != vals[ref] and n != ref:
                        fail(n, f"parity.{label}", f"{label} {v if v is not None else 'none'}",
                             f"{vals[ref] if vals[ref] is not None else 'none'} as on {ref} ({_who(vals)})",
                             _parity_fix(label))
        named = {x for pk in PARITY_PACKAGES.values() for x in pk}
        d_ref = live[ref]["container"].get("dists") or {}
        for n, r in live.items():
            if n == ref:
                continue
            d = r["container"].get("dists") or {}
            diff = sorted(k for k in set(d) | set(d_ref) if k not in named and d.get(k) != d_ref.get(k))
            if diff:
                shown = ", ".join(f"{k} {d.get(k) or 'absent'} (on {ref}: {d_ref.get(k) or 'absent'})"
                                  for k in diff[:OTHER_PACKAGE_LIMIT])
                more = f" and {len(diff) - OTHER_PACKAGE_LIMIT} more" if len(diff) > OTHER_PACKAGE_LIMIT else ""
                fail(n, "parity.packages", shown + more, f"the same packages as on {ref}",
                     "one image for every node; flagops provision INVENTORY recreates a container that drifted")
    # ---------------------------------------------------------------- C7 /dev/shm, ulimits (inside)
    for n, r in live.items():
        c = r["container"]
        if exp.shm_bytes and int(c.get("shm_bytes") or 0) < exp.shm_bytes:
            fail(n, "dev_shm", f"{c.get('shm_bytes')} bytes in the running container",
                 f">= {exp.shm_bytes} bytes (the release's container.shm_size)",
                 "recreate the container (flagops provision INVENTORY --tags container); with --ipc=host "
                 "enlarge the host's /dev/shm")
        lims = c.get("ulimits") or {}
        for name, want in exp.ulimits.items():
            got = (lims.get(name) or {}).get("soft")
            ok = got == -1 if want == -1 else (got == -1 or (got is not None and got >= want))
            if not ok:
                fail(n, f"ulimit_{name}", f"{got} (soft, inside the running container)",
                     "unlimited" if want == -1 else f">= {want}",
                     "recreate the container (flagops provision INVENTORY --tags container); the host's limit "
                     "caps it (LimitNOFILE/LimitMEMLOCK of docker.service)")
    # ---------------------------------------------------------------- C8 weights as every node sees them
    manifest = master.get("manifest")
    if exp.master in live and not manifest:
        fail(exp.master, "weights.manifest", "no verified weights record (.flagops-weights.json)",
             "the record the weights role writes after verifying every file",
             "flagops provision INVENTORY --tags weights")
    elif manifest:
        want_files = {k: v.get("size") for k, v in (manifest.get("files") or {}).items()}
        for n, r in live.items():
            w = r["container"].get("weights") or {}
            if not w.get("exists"):
                fail(n, "weights", f"{w.get('path')} missing in the container", f"{len(want_files)} files",
                     f"mount the shared storage at the same path on {n} (flagops provision INVENTORY)")
                continue
            got = w.get("files") or {}
            missing = sorted(set(want_files) - set(got))
            wrong = sorted(k for k in set(want_files) & set(got) if got[k] != want_files[k])
            if missing or wrong:
                parts = []
                if missing:
                    parts.append(f"{len(missing)} of {len(want_files)} files missing ({', '.join(missing[:3])}"
                                 f"{', ...' if len(missing) > 3 else ''})")
                if wrong:
                    sizes = ", ".join(f"{k} {got[k]} (manifest {want_files[k]})" for k in wrong[:3])
                    parts.append(f"size differs: {sizes}")
                fail(n, "weights", f"{w.get('path')} on {n}: " + "; ".join(parts),
                     f"the verified manifest's {len(want_files)} files and sizes",
                     f"{n} sees different storage at {w.get('path')}: mount the same shared volume "
                     "(the master's) there, then flagops provision INVENTORY --tags weights")
    # ---------------------------------------------------------------- C9 leftovers
    for n, strays in leftovers.items():
        for p in strays:
            what = {"gcs_server": "a Ray head (GCS)", "raylet": "a raylet",
                    "engine": "a vLLM/engine process"}[p["kind"]]
            where = _gcs_address(p) or (_arg(p, "--gcs_server_port") and f"port {_arg(p, '--gcs_server_port')}")
            joined = f" of the cluster at {where}" if where else ""
            fail(n, f"leftover.{p['kind']}", f"{what}{joined} that flagops did not start: pid {p['cpid']} in "
                 f"{exp.container} (host pid {p['pid']}): {p['cmdline'][:200]}",
                 "no Ray or engine process flagops did not start" + (f" (flagops' cluster: {cluster})" if cluster else
                                                                     " (no flagops service is recorded)"),
                 f"flagops never kills what it did not start: stop it yourself, e.g. docker exec {exp.container} "
                 f"kill {p['cpid']} on {n} (or ray stop in the session that started it)")

    all_checks = ["node_ip", "socket_ifname", "hostname", "port", "ssh_trust", "collective", "ray_cgraph_timeout",
                  "ray_nodes", "infiniband", "parity", "dev_shm", "ulimit", "weights", "leftover"]
    for chk in all_checks:
        if chk in skipped:
            continue
        if not any(f.startswith(chk) for f in failed_checks):
            passed.append(chk)
    if len(live) < len(names):  # a node without facts: what it did not report did not pass
        passed = [p for p in passed if p in ("ray_cgraph_timeout",)]
        skipped["cluster"] = "not every node reported its facts: " + ", ".join(n for n in names if n not in live)
    if not any(r["host"].get("infiniband") for r in live.values()):
        skipped["infiniband"] = "no /dev/infiniband on any host"
        passed = [p for p in passed if p != "infiniband"]
    return fails, passed, skipped


def _tree(roots: set[int], host: dict[str, Any]) -> set[int]:
    """``roots`` and every descendant among the container's processes."""
    parents = {int(k): v for k, v in (host.get("parents") or {}).items()}
    out = set(roots)
    changed = True
    while changed:
        changed = False
        for pid, ppid in parents.items():
            if ppid in out and pid not in out:
                out.add(pid)
                changed = True
    return out


def _parity_fix(label: str) -> str:
    if label == "image":
        return "pin the release's image by digest; flagops provision INVENTORY pulls one digest on every node"
    if label == "driver":
        return "install one NVIDIA driver version on every node (mixed drivers hang NCCL)"
    if label == "flagscale_install_key":
        return "flagops provision INVENTORY --tags flagscale_install (installs the same build on every node)"
    return (f"{label} must be the same on every node: recreate the drifted container from the release's image "
            "(flagops provision INVENTORY --tags container), or install the same version there")


# ------------------------------------------------------------------------ running it


class Collector:
    """Picks the check's facts out of the playbook's events: each node's ``flagops_check``
    result, the preflight's report and per-host facts, and unreachable hosts."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict[str, Any]] = {}
        self.unreachable: dict[str, str] = {}
        self.preflight: dict[str, Any] = {"failures": [], "per_host": {}}
        self.run_error: str | None = None  # the playbook's own failure (syntax, missing role)

    def __call__(self, ev: dict[str, Any]) -> None:
        data = ev.get("event_data") or {}
        res = data.get("res") or {}
        host = data.get("host")
        if ev.get("event") == "runner_on_unreachable" and host:
            self.unreachable[host] = str(res.get("msg", "unreachable"))[:300]
        if ev.get("event") != "runner_on_ok" or not isinstance(res, dict):
            return
        action = str(data.get("task_action", ""))
        if (action.endswith("flagops_check") or action.endswith("async_status")) and "host" in res:
            self.nodes[host] = res
        elif action.endswith("flagops_preflight") and "driver" in (res.get("facts") or {}):
            self.preflight["per_host"][host] = res["facts"]
        elif (res.get("ansible_facts") or {}).get("preflight_report"):
            self.preflight["failures"] = res["ansible_facts"]["preflight_report"].get("failures", [])

    def report(self, exp: Expect, seconds: float, *, prelaunch: bool = False) -> CheckReport:
        fails, passed, skipped = judge(exp, self.preflight, self.nodes, self.unreachable, self.run_error,
                                       prelaunch=prelaunch)
        return CheckReport(
            ok=not fails, failures=fails, passed=passed, skipped=skipped, seconds=round(seconds, 2),
            nodes={n: {"module_s": r.get("seconds"),
                       "collective_s": ((r.get("container") or {}).get("collective") or {}).get("seconds")}
                   for n, r in self.nodes.items()})


class QuietView:
    """No output while the check's playbook runs (the report is printed afterwards)."""

    def start(self) -> None:  # noqa: D102
        pass

    def event(self, ev: dict[str, Any]) -> None:  # noqa: D102
        pass

    def finish(self, result: Any) -> None:  # noqa: D102
        pass
