#!/usr/bin/python
"""Collect one node's preflight facts in a single round trip and judge them.

Every check appends a failure with ``found``/``required``/``fix`` instead of
stopping, so the play can report every problem on every node at once.  The
module only reads, except for the shared-storage nonce, which it writes and
the master removes again in the same run (net change: none).
"""
from __future__ import annotations

import contextlib
import os
import platform
import re
import resource
import socket
import subprocess
import time

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: flagops_preflight
short_description: Read-only node checks for a FlagOS deployment
description:
  - Collects OS, NVIDIA driver, GPU count, Docker version, /dev/shm, ulimits,
    free space on shared storage, listening ports, clock and NIC facts, and
    returns them with a list of failures (check, found, required, fix).
options:
  slot_type: {type: str, default: gpu, choices: [gpu, cpu], description: gpu checks run only for gpu}
  slots: {type: int, required: true, description: GPU slots this node contributes}
  min_driver: {type: str, description: minimum NVIDIA driver}
  min_docker: {type: str, description: minimum Docker server version}
  gpu_run_image: {type: str, description: image for the docker run --gpus probe, used only if present locally}
  share_root: {type: path, required: true}
  model_dir: {type: path, description: where the weights go; bytes already there count as downloaded}
  required_bytes: {type: int, default: 0, description: weights size times the margin}
  min_shm_bytes: {type: int, default: 0}
  min_nofile: {type: int, default: 0}
  ports: {type: list, elements: int, default: []}
  container_name: {type: str, description: a port held by this container's processes is not a conflict}
  nic: {type: str}
  nonce_write: {type: dict, description: "{path, content}: write a nonce (master)"}
  nonce_read: {type: dict, description: "{path, content}: expect a nonce (workers)"}
  nonce_remove: {type: path, description: remove the nonce written earlier (master)}
  only_nonce: {type: bool, default: false, description: do only the nonce write/remove}
"""

RETURN = r"""
facts: {type: dict, returned: always}
failures: {type: list, returned: always}
"""


def _run(argv, timeout=20):
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout.strip(), p.stderr.strip()
    except FileNotFoundError:
        return 127, "", f"{argv[0]}: not found"
    except subprocess.TimeoutExpired:
        return 124, "", f"{argv[0]}: timed out after {timeout}s"


def _vtuple(v):
    return tuple(int(x) for x in re.findall(r"\d+", v or "")[:4])


def _size_to_bytes(text):
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)[bB]?\s*", str(text))
    if not m:
        return 0
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(m.group(1)) * mult


def _dir_bytes(path):
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _listeners():
    """Map listening TCP port -> set of pids, from ss (iproute2)."""
    rc, out, _ = _run(["ss", "-Hltnp"])
    ports = {}
    if rc != 0:
        return None
    for line in out.splitlines():
        cols = line.split()
        if len(cols) < 4:
            continue
        port = cols[3].rsplit(":", 1)[-1]
        if not port.isdigit():
            continue
        pids = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        ports.setdefault(int(port), set()).update(pids)
    return ports


GPU_QUERY = ("index,name,driver_version,ecc.mode.current,persistence_mode,mig.mode.current,"
             "memory.used,memory.total,ecc.errors.uncorrected.volatile.total")


def parse_gpu_query(text):
    """``nvidia-smi --query-gpu=GPU_QUERY --format=csv,noheader,nounits`` -> one dict per GPU."""
    keys = GPU_QUERY.split(",")
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        vals = [v.strip() for v in line.split(",")]
        if len(vals) != len(keys):
            continue
        row = dict(zip(keys, vals))
        for k in ("index", "memory.used", "memory.total", "ecc.errors.uncorrected.volatile.total"):
            row[k] = int(row[k]) if row[k].isdigit() else None
        rows.append(row)
    return rows


def parse_compute_apps(text):
    """``nvidia-smi --query-compute-apps=gpu_uuid,pid,process_name,used_memory --format=csv,noheader,nounits``."""
    apps = []
    for line in text.splitlines():
        vals = [v.strip() for v in line.split(",")]
        if len(vals) == 4 and vals[1].isdigit():
            apps.append({"gpu_uuid": vals[0], "pid": int(vals[1]), "name": vals[2],
                         "used_mib": int(vals[3]) if vals[3].isdigit() else None})
    return apps


def parse_topo(text):
    """``nvidia-smi topo -m`` -> {"gpus": [GPU0, ...], "links": {"GPU0-GPU1": "NV18", ...}, "nvlink": bool}.

    The matrix's rows start with the device name; its columns are the header's names up to
    the first non-device column (CPU Affinity etc.). ANSI colour codes are dropped."""
    clean = re.sub(r"\x1b\[[0-9;]*m", "", text)
    lines = [l for l in clean.splitlines() if l.strip()]

    def cells(line):
        return [c.strip() for c in (line.split("\t") if "\t" in line else line.split())]

    header = None
    links, gpus = {}, []
    for line in lines:
        cols = cells(line)
        if header is None:
            if any(re.fullmatch(r"GPU\d+", c) for c in cols):
                header = [c for c in cols if c]
                header = header[:next((i for i, c in enumerate(header) if not re.fullmatch(r"(GPU|NIC)\d+", c)),
                                      len(header))]
            continue
        if not cols or not re.fullmatch(r"GPU\d+", cols[0]):
            if cols and cols[0] == "Legend:":
                break
            continue
        name, vals = cols[0], cols[1:1 + len(header)]
        gpus.append(name)
        for other, v in zip(header, vals):
            if other != name and other.startswith("GPU"):
                links["-".join(sorted((name, other)))] = v
    return {"gpus": gpus, "links": links, "nvlink": any(v.startswith("NV") for v in links.values())}


def _container_pids(name):
    rc, out, _ = _run(["docker", "top", name, "-eo", "pid"])
    if rc != 0:
        return set()
    return {int(x) for x in out.split() if x.isdigit()}


def judge_gpus(gpus, fail, busy_mib=1024):
    """Per GPU: ECC on and no uncorrected errors, persistence mode on, MIG off, memory free."""
    for g in gpus:
        i = g["index"]
        if g["ecc.mode.current"] not in ("Enabled", "[N/A]", "N/A"):
            fail("gpu_ecc", "GPU %s ECC %s" % (i, g["ecc.mode.current"]), "Enabled",
                 "nvidia-smi -i %s -e 1, then reboot the node" % i)
        if (g["ecc.errors.uncorrected.volatile.total"] or 0) > 0:
            fail("gpu_ecc_errors", "GPU %s: %s uncorrected ECC errors" % (i, g["ecc.errors.uncorrected.volatile.total"]),
                 "0", "drain the node and have GPU %s checked (nvidia-smi -q -d ECC)" % i)
        if g["persistence_mode"] not in ("Enabled", "[N/A]", "N/A"):
            fail("gpu_persistence", "GPU %s persistence mode %s" % (i, g["persistence_mode"]), "Enabled",
                 "nvidia-smi -pm 1 (or enable nvidia-persistenced) on the node")
        if g["mig.mode.current"] not in ("Disabled", "[N/A]", "N/A"):
            fail("gpu_mig", "GPU %s MIG %s" % (i, g["mig.mode.current"]), "Disabled",
                 "nvidia-smi -i %s -mig 0, then reset the GPU" % i)
        if (g["memory.used"] or 0) > busy_mib:
            fail("gpu_memory", "GPU %s: %s of %s MiB in use" % (i, g["memory.used"], g["memory.total"]),
                 "<= %d MiB in use before the launch" % busy_mib,
                 "find the holder with nvidia-smi and stop it yourself (flagops never kills what it did not start)")


def _nonce_ops(p, failures, facts):
    def fail(check, found, required, fix):
        failures.append({"check": check, "found": found, "required": required, "fix": fix})

    share = p["share_root"]
    if p["nonce_write"]:
        path, content = p["nonce_write"]["path"], p["nonce_write"]["content"]
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as fh:
                fh.write(content)
        except OSError as exc:
            fail("share_writable", str(exc), f"{share} writable", f"make {share} writable for the SSH user")
    if p["nonce_read"]:
        path, content = p["nonce_read"]["path"], p["nonce_read"]["content"]
        try:
            with open(path) as fh:
                got = fh.read()
        except OSError as exc:
            got = f"missing ({exc.strerror})"
        facts["share_nonce_seen"] = got == content
        if got != content:
            fail("share_is_shared", "nonce written on the master is %s here" % ("different" if not got.startswith("missing") else got),
                 f"the same file system at {share} on every node",
                 f"mount the same shared volume at {share} on this node")
    if p["nonce_remove"]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p["nonce_remove"])
        # Leave no trace: drop the directories the nonce needed if nothing else is in them.
        d = os.path.dirname(p["nonce_remove"])
        for _ in range(2):
            try:
                os.rmdir(d)
            except OSError:
                break
            d = os.path.dirname(d)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            slot_type=dict(type="str", default="gpu", choices=["gpu", "cpu"]),
            slots=dict(type="int", required=True),
            min_driver=dict(type="str"),
            min_docker=dict(type="str"),
            gpu_run_image=dict(type="str"),
            share_root=dict(type="path", required=True),
            model_dir=dict(type="path"),
            required_bytes=dict(type="int", default=0),
            min_shm_bytes=dict(type="int", default=0),
            min_nofile=dict(type="int", default=0),
            ports=dict(type="list", elements="int", default=[]),
            container_name=dict(type="str"),
            nic=dict(type="str"),
            nonce_write=dict(type="dict"),
            nonce_read=dict(type="dict"),
            nonce_remove=dict(type="path"),
            only_nonce=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )
    p = module.params
    facts = {"time": time.time(), "hostname": socket.gethostname()}
    failures = []
    if p["only_nonce"]:
        _nonce_ops(p, failures, facts)
        module.exit_json(changed=False, facts=facts, failures=failures)

    def fail(check, found, required, fix):
        failures.append({"check": check, "found": found, "required": required, "fix": fix})

    # OS
    facts["os"] = {"system": platform.system(), "release": platform.release()}
    try:
        with open("/etc/os-release") as fh:
            osr = dict(l.rstrip("\n").split("=", 1) for l in fh if "=" in l)
        facts["os"]["pretty_name"] = osr.get("PRETTY_NAME", "").strip('"')
    except OSError:
        facts["os"]["pretty_name"] = "unknown"
    if facts["os"]["system"] != "Linux":
        fail("os", facts["os"]["system"], "Linux", "run the node on a Linux host")

    # NVIDIA driver and GPUs: only a node that declares GPU slots is asked.
    if p["slot_type"] == "gpu":
        rc, out, err = _run(["nvidia-smi", "--query-gpu=" + GPU_QUERY, "--format=csv,noheader,nounits"])
        if rc != 0:
            facts["driver"] = None
            facts["gpu_count"] = 0
            fail("nvidia_driver", err or "nvidia-smi failed (rc=%d)" % rc,
                 ">= {}".format(p["min_driver"]), "install the NVIDIA driver and make nvidia-smi work")
        else:
            gpus = parse_gpu_query(out)
            facts["gpus"] = gpus
            facts["driver"] = gpus[0]["driver_version"] if gpus else None
            facts["gpu_count"] = len(gpus)
            if p["min_driver"] and _vtuple(facts["driver"]) < _vtuple(p["min_driver"]):
                fail("nvidia_driver", facts["driver"], ">= {}".format(p["min_driver"]),
                     "upgrade the NVIDIA driver to {} or newer".format(p["min_driver"]))
            if facts["gpu_count"] != p["slots"]:
                fail("gpu_count", facts["gpu_count"], p["slots"],
                     "set flagops_slots for this host to %d, or fix the missing GPUs" % facts["gpu_count"])
            judge_gpus(gpus, fail)
            rc2, apps_out, _ = _run(["nvidia-smi", "--query-compute-apps=gpu_uuid,pid,process_name,used_memory",
                                     "--format=csv,noheader,nounits"])
            facts["compute_apps"] = parse_compute_apps(apps_out) if rc2 == 0 else None
            ours = _container_pids(p["container_name"]) if p["container_name"] else set()
            for app in facts["compute_apps"] or []:
                if app["pid"] not in ours:
                    fail("gpu_busy", "pid %d (%s) holds %s MiB on GPU %s" % (app["pid"], app["name"], app["used_mib"], app["gpu_uuid"]),
                         "idle GPUs (the release uses nearly all GPU memory)",
                         "stop pid %d yourself if it is not needed (flagops never kills what it did not start)" % app["pid"])
            rc3, topo_out, _ = _run(["nvidia-smi", "topo", "-m"])
            facts["topology"] = parse_topo(topo_out) if rc3 == 0 else None
    else:
        facts["driver"] = None
        facts["gpu_count"] = None
        facts["gpu_checks"] = "skipped: flagops_slot_type is cpu (the inventory declares no GPUs)"

    # Docker
    rc, out, err = _run(["docker", "version", "--format", "{{.Server.Version}}"])
    facts["docker"] = out if rc == 0 else None
    if rc != 0:
        fail("docker", err or "docker version failed (rc=%d)" % rc, ">= {}".format(p["min_docker"]),
             "install Docker and start dockerd; the SSH user must be able to run docker")
    elif p["min_docker"] and _vtuple(out) < _vtuple(p["min_docker"]):
        fail("docker", out, ">= {}".format(p["min_docker"]), "upgrade Docker to {} or newer".format(p["min_docker"]))
    if p["slot_type"] == "gpu" and rc == 0:
        rc2, rt, _ = _run(["docker", "info", "--format", "{{json .Runtimes}}"])
        facts["docker_nvidia_runtime"] = "nvidia" in rt
        img = p["gpu_run_image"]
        if img and _run(["docker", "image", "inspect", img])[0] == 0:
            rc3, out3, err3 = _run(["docker", "run", "--rm", "--gpus", "all", "--entrypoint", "nvidia-smi", img, "-L"], timeout=120)
            facts["docker_run_gpus"] = rc3 == 0
            if rc3 != 0:
                fail("docker_run_gpus", err3 or out3, "docker run --gpus all works",
                     "install nvidia-container-toolkit and run nvidia-ctk runtime configure --runtime=docker")
        elif not facts["docker_nvidia_runtime"] and _run(["nvidia-container-cli", "--version"])[0] != 0:
            fail("docker_run_gpus", "no nvidia runtime and no nvidia-container-cli",
                 "docker run --gpus all works", "install nvidia-container-toolkit")

    # /dev/shm (the container uses the host's with --ipc=host) and ulimits
    try:
        st = os.statvfs("/dev/shm")
        facts["shm_bytes"] = st.f_blocks * st.f_frsize
    except OSError:
        facts["shm_bytes"] = 0
    if facts["shm_bytes"] < p["min_shm_bytes"]:
        fail("dev_shm", facts["shm_bytes"], ">= %d bytes" % p["min_shm_bytes"],
             "enlarge /dev/shm (mount -o remount,size=... /dev/shm) or lower the release's container.shm_size")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    facts["nofile"] = {"soft": soft, "hard": hard}
    if hard != resource.RLIM_INFINITY and hard < p["min_nofile"]:
        fail("ulimit_nofile", hard, ">= %d" % p["min_nofile"],
             "raise the nofile hard limit (LimitNOFILE for docker.service) or lower container.ulimits.nofile")

    # Shared storage: free space for what is still missing of the weights
    share = p["share_root"]
    if not os.path.isdir(share):
        fail("share_root", f"{share} does not exist", "a directory", f"mount the shared storage at {share} on every node")
        facts["share_free_bytes"] = None
    else:
        st = os.statvfs(share)
        facts["share_free_bytes"] = st.f_bavail * st.f_frsize
        have = _dir_bytes(p["model_dir"]) if p["model_dir"] and os.path.isdir(p["model_dir"]) else 0
        need = max(0, p["required_bytes"] - have)
        facts["share_needed_bytes"] = need
        if facts["share_free_bytes"] < need:
            fail("share_free_space", "%d bytes free on %s" % (facts["share_free_bytes"], share),
                 ">= %d bytes (weights x 1.1, minus %d already there)" % (need, have),
                 f"free space on {share} or point flagops_share_root at a larger volume")

    # Shared storage is one file system: the master writes a nonce, workers read it.
    _nonce_ops(p, failures, facts)

    # Ports: free, or held by our own container (a re-run with the service up).
    listeners = _listeners()
    facts["ports"] = {}
    if listeners is None and p["ports"]:
        fail("ports", "ss not available", "iproute2 installed", "install iproute2")
    elif p["ports"]:
        ours = _container_pids(p["container_name"]) if p["container_name"] else set()
        for port in p["ports"]:
            pids = listeners.get(port, set())
            state = "free" if not pids else ("ours" if pids <= ours and pids else "busy")
            facts["ports"][str(port)] = state
            if state == "busy":
                fail("port_%d" % port, "in use by pid {}".format(",".join(map(str, sorted(pids)))),
                     "port %d free" % port, "stop the process holding port %d or change the release's port" % port)

    # NIC
    if p["nic"]:
        if not os.path.isdir("/sys/class/net/{}".format(p["nic"])):
            fail("nic", "{} not present (have: {})".format(p["nic"], ", ".join(sorted(os.listdir("/sys/class/net")))),
                 "interface {}".format(p["nic"]), "fix flagops_nic for this host")
        else:
            rc, out, _ = _run(["ip", "-4", "-o", "addr", "show", "dev", p["nic"]])
            m = re.search(r"inet (\d+\.\d+\.\d+\.\d+)", out)
            facts["nic_ipv4"] = m.group(1) if m else None
            if not m:
                fail("nic", "{} has no IPv4 address".format(p["nic"]), "an IPv4 address", "configure {}".format(p["nic"]))

    facts["time_end"] = time.time()
    module.exit_json(changed=False, facts=facts, failures=failures)


if __name__ == "__main__":
    main()
