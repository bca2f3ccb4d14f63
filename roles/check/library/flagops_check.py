#!/usr/bin/python
"""Collect one node's cluster facts, on the host and inside the running container, in
one round trip. It judges nothing: the controller (flagops/check.py) judges every
node's facts together, so a difference between nodes is named once, per node.

Read-only. The one thing it does to a node is open, for a few seconds, a listener on
each pinned port that nothing holds yet (so peers can prove they reach it), and, when
asked, join a short gloo/NCCL all-reduce with the other nodes. Both go away before the
module returns. It never signals a process.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
import urllib.request

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: flagops_check
short_description: Read-only cluster facts of one node, from its host and its container
description:
  - Host side (docker inspect, addresses, processes of the container, listeners, IB devices,
    the Ray head's node list on the master) and container side (package versions, hostname
    resolution, /dev/shm, ulimits, environment, the weights as this node sees them, reach of
    every peer's pinned ports, a short all-reduce), returned as facts for the controller.
options:
  container: {type: str, required: true, description: the FlagOS container}
  before_start: {type: str, default: "", description: activates the serving env inside the container}
  address: {type: str, required: true, description: the inventory address of this node}
  own_ports: {type: list, elements: int, default: [], description: pinned ports on this node}
  peers: {type: list, elements: dict, default: [], description: "[{name, address, ports}]: ports to reach on each other node"}
  probe_window_s: {type: float, default: 3.0, description: how long listeners stay open and probes retry}
  model_path: {type: str, description: the weights directory inside the container}
  manifest_path: {type: path, description: the verified weights record on this host (master)}
  state_file: {type: path, description: flagops' service record on this host (master)}
  serve_script: {type: path, description: FlagScale's generated run script on this host (master)}
  dashboard_port: {type: int, description: the Ray head's dashboard on this host (master)}
  install_marker: {type: str, description: the FlagScale install key inside the container}
  collective: {type: dict, description: "{backend, master_addr, port, rank, world, timeout_s}; omitted: no all-reduce"}
  allow_tcp: {type: bool, default: false, description: "the inventory accepts NCCL over TCP on an IB host (echoed)"}
  ssh_probe: {type: bool, default: false, description: "(master) log in to every peer over ssh from the container, as FlagScale's runner does"}
"""

RETURN = r"""
host: {type: dict, returned: always}
container: {type: dict, returned: always}
master: {type: dict, returned: on the master}
"""

# Runs inside the container with the serving env's python; argv[1] is a JSON object.
IN_CONTAINER = r'''
import json, os, platform, resource, socket, subprocess, sys, threading, time
P = json.loads(sys.argv[1])
out = {}
coll = None
if P.get("collective"):
    c = P["collective"]
    code = """
import os, sys, time, datetime, torch, torch.distributed as dist
t0 = time.monotonic()
b = sys.argv[1]
dist.init_process_group(b, init_method="tcp://%s:%s" % (sys.argv[2], sys.argv[3]), rank=int(sys.argv[4]),
                        world_size=int(sys.argv[5]), timeout=datetime.timedelta(seconds=float(sys.argv[6])))
dev = "cuda:0" if b == "nccl" else "cpu"
x = torch.ones(1024, device=dev) * (int(sys.argv[4]) + 1)
dist.all_reduce(x)
if b == "nccl":
    torch.cuda.synchronize()
n = int(sys.argv[5])
print("ALLREDUCE_OK %s %.3f" % (float(x[0]) == n * (n + 1) / 2, time.monotonic() - t0))
dist.destroy_process_group()
"""
    env = dict(os.environ)
    if c.get("backend") == "nccl":
        env["NCCL_DEBUG"] = "INFO"
        env.setdefault("NCCL_NVLS_ENABLE", "0")
    coll = subprocess.Popen([sys.executable, "-c", code, c["backend"], c["master_addr"], str(c["port"]), str(c["rank"]),
                             str(c["world"]), str(c["timeout_s"])], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    coll_t0 = time.monotonic()

# Pinned ports of this node: hold a listener on each free one while peers probe them.
listeners, held = [], {}
for port in P.get("own_ports", []):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # never blocks a LISTEN socket
    try:
        s.bind(("0.0.0.0", port))
        s.listen(16)
        s.settimeout(0.2)
        listeners.append(s)
        held[str(port)] = "flagops-check-listener"
    except OSError as exc:
        s.close()
        held[str(port)] = "in use (%s)" % exc.strerror
stop = threading.Event()
def serve(sock):
    while not stop.is_set():
        try:
            conn, _ = sock.accept()
        except OSError:
            continue
        try:  # let the prober close first: TIME_WAIT stays on its side, not on the pinned port
            conn.settimeout(1.0)
            conn.recv(1)
        except OSError:
            pass
        conn.close()
threads = [threading.Thread(target=serve, args=(s,), daemon=True) for s in listeners]
for t in threads:
    t.start()
out["own_ports"] = held

from importlib import metadata
dists = {}
for d in metadata.distributions():
    name = (d.metadata.get("Name") or "").lower().replace("_", "-")
    if name:
        dists[name] = d.version
out["python"] = platform.python_version()
out["executable"] = sys.executable
out["dists"] = dists
try:
    out["install_key"] = open(P["install_marker"]).read().strip() if P.get("install_marker") else None
except OSError:
    out["install_key"] = None

hn = socket.gethostname()
out["hostname"] = hn
try:
    out["hostname_resolves"] = sorted({a[4][0] for a in socket.getaddrinfo(hn, None, socket.AF_INET)})
except OSError as exc:
    out["hostname_resolves"] = []
    out["hostname_error"] = str(exc)
st = os.statvfs("/dev/shm")
out["shm_bytes"] = st.f_blocks * st.f_frsize
out["shm_free_bytes"] = st.f_bavail * st.f_frsize
lim = {}
for name in ("NOFILE", "MEMLOCK", "STACK"):
    soft, hard = resource.getrlimit(getattr(resource, "RLIMIT_" + name))
    lim[name.lower()] = {"soft": -1 if soft == resource.RLIM_INFINITY else soft,
                         "hard": -1 if hard == resource.RLIM_INFINITY else hard}
out["ulimits"] = lim
out["env"] = {k: os.environ.get(k) for k in ("VLLM_HOST_IP", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME",
                                             "RAY_CGRAPH_get_timeout", "NCCL_IB_HCA", "RAY_ADDRESS")}
out["infiniband_devices"] = sorted(os.listdir("/dev/infiniband")) if os.path.isdir("/dev/infiniband") else []

mp = P.get("model_path")
if mp:
    files = {}
    if os.path.isdir(mp):
        for root, _d, names in os.walk(mp):
            for n in names:
                full = os.path.join(root, n)
                rel = os.path.relpath(full, mp)
                if rel.startswith(".flagops") or rel.endswith((".part", ".part.state")):
                    continue
                try:
                    files[rel] = os.stat(full).st_size
                except OSError:
                    pass
    out["weights"] = {"path": mp, "exists": os.path.isdir(mp), "files": files}

# Every peer's pinned ports, retried for the window (the peer's listener may start later).
probes = {}
deadline = time.monotonic() + float(P.get("probe_window_s", 3.0))
for peer in P.get("peers", []):
    res = {}
    for port in peer.get("ports", []):
        state = "timeout"
        while True:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(1.0)
            try:
                s.connect((peer["address"], port))
                state = "open"
            except ConnectionRefusedError:
                state = "refused"
            except socket.timeout:
                state = "timeout"
            except OSError as exc:
                state = "error: %s" % exc.strerror
            finally:
                s.close()
            if state == "open" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        res[str(port)] = state
    probes[peer["name"]] = res
out["probes"] = probes

# The master only: FlagScale's runner starts every worker with `ssh -p PORT ADDRESS ...`
# from this container; a key the worker no longer accepts (a rebuilt host) or a host key
# that changed means that worker's `ray start` never runs and the launch hangs.
def ssh_probe(peer, res):
    argv = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-p", str(peer.get("ssh_port", 22)),
            peer["address"], "true"]
    got = {"address": peer["address"], "port": peer.get("ssh_port", 22)}
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
        got.update(ok=r.returncode == 0, rc=r.returncode, error=r.stderr.strip()[-300:])
    except (OSError, subprocess.TimeoutExpired) as exc:
        got.update(ok=False, rc=None, error=str(exc)[-300:])
    res[peer["name"]] = got
if P.get("ssh_probe"):
    ssh_res = {}
    workers = [threading.Thread(target=ssh_probe, args=(peer, ssh_res)) for peer in P.get("peers", [])]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    out["ssh"] = ssh_res
left = deadline - time.monotonic()
if left > 0 and listeners:
    time.sleep(left)  # peers that started later still find the listeners
stop.set()
for s in listeners:
    s.close()

if coll is not None:
    try:
        text, _ = coll.communicate(timeout=max(1.0, float(P["collective"]["timeout_s"]) + 5 - (time.monotonic() - coll_t0)))
    except subprocess.TimeoutExpired:
        coll.kill()
        text, _ = coll.communicate()
        text = (text or "") + "\n[flagops: killed after the time limit]"
    ok = "ALLREDUCE_OK True" in text
    net = sorted({w for w in ("NET/IB", "NET/Socket") if w in text})
    out["collective"] = {"ok": ok, "rc": coll.returncode, "seconds": round(time.monotonic() - coll_t0, 2),
                         "backend": P["collective"]["backend"], "net": net,
                         "tail": "\n".join(text.strip().splitlines()[-25:])}
print("FLAGOPS_CHECK " + json.dumps(out))
'''


def _run(argv, timeout=30, stdin=None):
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=stdin)
        return p.returncode, p.stdout, p.stderr.strip()
    except FileNotFoundError:
        return 127, "", f"{argv[0]}: not found"
    except subprocess.TimeoutExpired:
        return 124, "", f"{argv[0]}: timed out after {timeout}s"


def _read(path, limit=4096):
    try:
        with open(path, "rb") as fh:
            return fh.read(limit)
    except OSError:
        return None


def proc_info(pid, want_env=()):
    """cmdline, ppid, start time and container pid of one host pid (None if gone)."""
    raw = _read(f"/proc/{pid}/cmdline", 8192)
    stat = _read(f"/proc/{pid}/stat")
    if raw is None or stat is None:
        return None
    fields = stat.decode(errors="replace").rsplit(")", 1)[-1].split()
    status = (_read(f"/proc/{pid}/status", 16384) or b"").decode(errors="replace")
    m = re.search(r"^NSpid:\s*(.+)$", status, re.M)
    nspid = [int(x) for x in m.group(1).split()] if m else [pid]
    info = {
        "pid": pid,
        "cpid": nspid[-1],
        "ppid": int(fields[1]),
        "start": fields[19],
        "cmdline": " ".join(x.decode(errors="replace") for x in raw.split(b"\0") if x)[:2000],
    }
    if want_env:
        env = {}
        for item in (_read(f"/proc/{pid}/environ", 1 << 20) or b"").split(b"\0"):
            k, _, v = item.decode(errors="replace").partition("=")
            if k in want_env:
                env[k] = v
        info["env"] = env
    return info


RAY_ENV = ("VLLM_HOST_IP", "RAY_CGRAPH_get_timeout", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def kind_of(cmdline):
    """What a process is, for the leftover check: gcs_server / raylet / engine / None."""
    argv0 = cmdline.split(" ", 1)[0]
    if argv0.endswith("/gcs_server") or argv0 == "gcs_server":
        return "gcs_server"
    if argv0.endswith("/raylet") or argv0 == "raylet":
        return "raylet"
    if ("vllm serve" in cmdline or "vllm.entrypoints" in cmdline or "run_inference_engine" in cmdline
            or "run_fs_serve_vllm" in cmdline or cmdline.startswith("VLLM::")):
        return "engine"
    return None


def parse_ss(text):
    """``ss -Hltnp`` -> {port: [pids]} (a listener without a visible pid gets [])."""
    ports = {}
    for line in text.splitlines():
        cols = line.split()
        if len(cols) < 4:
            continue
        port = cols[3].rsplit(":", 1)[-1]
        if port.isdigit():
            ports.setdefault(int(port), set()).update(int(p) for p in re.findall(r"pid=(\d+)", line))
    return {k: sorted(v) for k, v in ports.items()}


def parse_ip_addr(text):
    """``ip -o -4 addr show`` -> [{ifname, address}]."""
    rows = []
    for line in text.splitlines():
        m = re.match(r"\d+:\s+(\S+?)(?:@\S+)?\s+inet\s+(\d+\.\d+\.\d+\.\d+)/(\d+)", line)
        if m:
            rows.append({"ifname": m.group(1), "address": m.group(2), "prefix": int(m.group(3))})
    return rows


def host_facts(p):
    h = {"infiniband": sorted(os.listdir("/dev/infiniband")) if os.path.isdir("/dev/infiniband") else []}
    rc, out, err = _run(["ip", "-o", "-4", "addr", "show"])
    h["addresses"] = parse_ip_addr(out) if rc == 0 else []
    if rc != 0:
        h["addresses_error"] = err
    rc, out, err = _run(["docker", "inspect", p["container"]])
    if rc != 0:
        h["container"] = {"exists": False, "error": err}
        return h
    c = json.loads(out)[0]
    hc = c.get("HostConfig") or {}
    env = dict(e.split("=", 1) for e in (c.get("Config") or {}).get("Env") or [] if "=" in e)
    h["container"] = {
        "exists": True,
        "running": bool((c.get("State") or {}).get("Running")),
        "image_id": c.get("Image"),
        "image_ref": (c.get("Config") or {}).get("Image"),
        "env": {k: env.get(k) for k in RAY_ENV + ("NCCL_IB_HCA",)},
        "privileged": bool(hc.get("Privileged")),
        "cap_add": hc.get("CapAdd") or [],
        "devices": [d.get("PathOnHost") for d in hc.get("Devices") or []],
        "ulimits": {u["Name"]: {"soft": u["Soft"], "hard": u["Hard"]} for u in hc.get("Ulimits") or []},
        "shm_size": hc.get("ShmSize"),
        "ipc_mode": hc.get("IpcMode"),
        "network_mode": hc.get("NetworkMode"),
    }
    rc, out, _ = _run(["docker", "image", "inspect", "--format", "{{json .RepoDigests}}", c.get("Image", "")])
    h["container"]["digests"] = json.loads(out) if rc == 0 and out.strip() else []
    # Processes of the container (host pids), and who listens on the pinned ports.
    rc, out, _ = _run(["docker", "top", p["container"], "-eo", "pid"])
    pids = sorted({int(x) for x in out.split() if x.isdigit()}) if rc == 0 else []
    procs = []
    for pid in pids:
        info = proc_info(pid)
        if info is None:
            continue
        info["kind"] = kind_of(info["cmdline"])
        if info["kind"] == "raylet":
            info["env"] = proc_info(pid, RAY_ENV).get("env", {}) if os.path.exists(f"/proc/{pid}") else {}
        procs.append(info)
    # Keep what the leftover check needs: Ray/engine processes and the ppid links to them.
    h["processes"] = [x for x in procs if x["kind"]]
    h["parents"] = {str(x["pid"]): x["ppid"] for x in procs}
    h["container_pids"] = pids
    rc, out, _ = _run(["ss", "-Hltnp"])
    listen = parse_ss(out) if rc == 0 else None
    h["listeners"] = {}
    if listen is not None:
        wanted = set(p["own_ports"])
        for peer in p["peers"]:
            wanted.update(peer.get("ports", []))
        for port in sorted(wanted):
            if port in listen:
                h["listeners"][str(port)] = [
                    dict(proc_info(pid) or {"pid": pid, "cmdline": "?"}, ours_container=pid in pids)
                    for pid in listen[port]
                ] or [{"pid": None, "cmdline": "(no pid visible)", "ours_container": False}]
    else:
        h["listeners_error"] = "ss not available"
    return h


def master_facts(p):
    m = {}
    if p.get("manifest_path"):
        raw = _read(p["manifest_path"], 64 << 20)
        try:
            m["manifest"] = json.loads(raw) if raw else None
        except ValueError:
            m["manifest"] = None
            m["manifest_error"] = "unreadable"
    if p.get("state_file"):
        raw = _read(p["state_file"], 1 << 20)
        try:
            m["service"] = json.loads(raw) if raw else None
        except ValueError:
            m["service"] = None
    if p.get("serve_script"):
        raw = _read(p["serve_script"], 1 << 20)
        mm = re.search(rb"start --head --port=(\d+)", raw or b"")
        m["gcs_port"] = int(mm.group(1)) if mm else None
    if p.get("dashboard_port") and m.get("service"):
        try:
            url = "http://127.0.0.1:%d/api/v0/nodes?limit=100&detail=1" % p["dashboard_port"]
            with urllib.request.urlopen(url, timeout=3) as r:
                doc = json.load(r)
            rows = doc.get("data", {}).get("result", {}).get("result", [])
            m["ray_nodes"] = [{"ip": n.get("node_ip"), "state": n.get("state"), "head": n.get("is_head_node"),
                               "resources": n.get("resources_total", {})} for n in rows]
        except Exception as exc:  # noqa: BLE001 - any failure is the fact
            m["ray_nodes_error"] = str(exc)
    return m


def container_facts(p):
    args = {k: p[k] for k in ("own_ports", "peers", "probe_window_s", "model_path", "install_marker", "collective",
                              "ssh_probe")}
    script = (p["before_start"] + " && " if p["before_start"] else "") + 'exec python3 - "$1"'
    limit = 20 + float((p.get("collective") or {}).get("timeout_s", 0)) + float(p["probe_window_s"])
    rc, out, err = _run(["docker", "exec", "-i", p["container"], "bash", "-c", script, "flagops-check",
                         json.dumps(args)], timeout=limit, stdin=IN_CONTAINER)
    for line in out.splitlines():
        if line.startswith("FLAGOPS_CHECK "):
            return json.loads(line[len("FLAGOPS_CHECK "):])
    return {"error": (err or out)[-800:] or "rc=%d" % rc, "rc": rc}


def main():
    module = AnsibleModule(
        argument_spec=dict(
            container=dict(type="str", required=True),
            before_start=dict(type="str", default=""),
            address=dict(type="str", required=True),
            own_ports=dict(type="list", elements="int", default=[]),
            peers=dict(type="list", elements="dict", default=[]),
            probe_window_s=dict(type="float", default=3.0),
            model_path=dict(type="str"),
            manifest_path=dict(type="path"),
            state_file=dict(type="path"),
            serve_script=dict(type="path"),
            dashboard_port=dict(type="int"),
            install_marker=dict(type="str"),
            collective=dict(type="dict"),
            allow_tcp=dict(type="bool", default=False),
            ssh_probe=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )
    p = module.params
    t0 = time.monotonic()
    host = host_facts(p)
    result = {"changed": False, "host": host, "time": time.time(), "allow_tcp": p["allow_tcp"]}
    if host["container"].get("running"):
        result["container"] = container_facts(p)
    else:
        result["container"] = {"error": "container %s is not running" % p["container"]}
    result["master"] = master_facts(p) if (p.get("state_file") or p.get("manifest_path")) else None
    result["seconds"] = round(time.monotonic() - t0, 2)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
