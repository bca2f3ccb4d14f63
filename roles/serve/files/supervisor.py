"""flagops supervisor: brings a deployed FlagScale/vLLM service back with nobody acting.

Runs as PID 1 of the ``flagops-supervisor`` container on the master host (restart policy
``unless-stopped``: dockerd brings it back after a reboot of the master or a crash of this
script). Standard library only: it runs on the release image's ``python3``.

    python3 supervisor.py SPEC.json

SPEC (written by the serve role at deploy) names the service; the service record (the serve
role's ``state_file``) says what runs. This script writes two files:
- the record, after each restart it makes (pid, pid start time, start times), atomically;
- ``spec["status_file"]``: its state (WATCHING / STARTING / RECOVERING / FAILED / IDLE), the
  restarts it made (time, cause, logs, seconds to SERVING) and the last cause.

A failure is judged only once the service has been SERVING under this deploy (``armed``):
a start that never serves is deploy's to judge (it rolls back), not ours to retry. On a
failure it collects every node's logs, waits its backoff, and restarts the whole group with
the launch deploy uses (``flagscale serve``: its script stops Ray on every node and starts
it again, then the engine). More than ``max_restarts`` restarts within ``window_s`` end in
FAILED with the cause; a new deploy (a new ``generation``) starts over. SIGTERM (``flagops
stop``/``deploy`` remove this container with ``docker stop``) finishes the step under way,
so a launched service is always recorded, then exits.
"""

# ruff: noqa: UP017  (timezone.utc: the release image's python3 may be older than 3.11)
from __future__ import annotations

import http.client
import json
import os
import shlex
import shutil
import signal
import socket
import struct
import sys
import time
import urllib.parse
from datetime import datetime, timezone

STOP = False


def _on_term(_sig: int, _frm: object) -> None:
    global STOP
    STOP = True


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def instant(text: object) -> float | None:
    if not isinstance(text, str) or not text or text.startswith("0001-"):
        return None
    t = text.strip().rstrip("Z")
    if "." in t:
        head, frac = t.split(".", 1)
        digits = "".join(c for c in frac if c.isdigit())[:6]
        t = f"{head}.{digits}" if digits else head
    try:
        return datetime.fromisoformat(t).replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return None


def log(msg: str) -> None:
    print(f"{now_iso()} {msg}", flush=True)


def read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        return doc if isinstance(doc, dict) else None
    except (OSError, ValueError):
        return None


def write_json(path: str, doc: dict, mode: int = 0o644) -> None:
    """Atomically; keys in their order (the record's release snapshot renders the same files)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    os.chmod(tmp, mode)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- docker API


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


class Docker:
    """The Docker Engine API over the mounted socket: inspect, exec, logs, start."""

    def __init__(self, sock: str = "/var/run/docker.sock") -> None:
        self.sock = sock

    def _req(self, method: str, path: str, body: dict | None = None, timeout: float = 10) -> tuple[int, bytes]:
        conn = _UnixConnection(self.sock, timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def inspect(self, name: str) -> dict | None:
        code, body = self._req("GET", f"/containers/{urllib.parse.quote(name)}/json")
        return json.loads(body) if code == 200 else None

    def start(self, name: str) -> bool:
        return self._req("POST", f"/containers/{urllib.parse.quote(name)}/start")[0] in (204, 304)

    def logs(self, name: str, tail: int = 500) -> str:
        code, body = self._req("GET", f"/containers/{urllib.parse.quote(name)}/logs?stdout=1&stderr=1&tail={tail}")
        return _demux(body) if code == 200 else f"(docker logs: HTTP {code})"

    def exec(self, name: str, argv: list[str], timeout: float = 60) -> tuple[int, str]:
        """Run argv in the container; (exit code, stdout+stderr). -1: the call itself failed."""
        try:
            code, body = self._req("POST", f"/containers/{urllib.parse.quote(name)}/exec",
                                   {"AttachStdout": True, "AttachStderr": True, "Cmd": argv})
            if code != 201:
                return -1, f"exec create: HTTP {code} {body[:200]!r}"
            xid = json.loads(body)["Id"]
            code, out = self._req("POST", f"/exec/{xid}/start", {"Detach": False, "Tty": False}, timeout=timeout)
            _, info = self._req("GET", f"/exec/{xid}/json")
            rc = json.loads(info).get("ExitCode")
            return (rc if isinstance(rc, int) else -1), _demux(out)
        except (OSError, ValueError, KeyError, http.client.HTTPException) as exc:
            return -1, f"exec failed: {exc}"


def _demux(raw: bytes) -> str:
    """Docker's multiplexed stream (8-byte frame headers) as text; a raw stream as is."""
    out, i = [], 0
    while i + 8 <= len(raw) and raw[i] in (0, 1, 2) and raw[i + 1:i + 4] == b"\0\0\0":
        (n,) = struct.unpack(">I", raw[i + 4:i + 8])
        out.append(raw[i + 8:i + 8 + n])
        i += 8 + n
    if i < len(raw):
        out.append(raw[i:])
    return b"".join(out).decode("utf-8", "replace")


# --------------------------------------------------------------------------- HTTP


def http_get(url: str, timeout: float = 3) -> tuple[int, bytes]:
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request("GET", u.path + (f"?{u.query}" if u.query else ""))
        r = conn.getresponse()
        return r.status, r.read()
    except (OSError, http.client.HTTPException):
        return 0, b""
    finally:
        conn.close()


def http_post(url: str, body: dict, timeout: float) -> int:
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request("POST", u.path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        return r.status
    except (OSError, http.client.HTTPException):
        return 0
    finally:
        conn.close()


# --------------------------------------------------------------------------- the supervisor


class Supervisor:
    def __init__(self, spec: dict, docker: Docker | None = None) -> None:
        self.spec = spec
        self.d = docker or Docker()
        self.ctr = spec["container"]
        self.status: dict = read_json(spec["status_file"]) or {}
        self.bad_health = 0
        self.unreachable: dict[str, int] = {}
        self.warning: str | None = None  # what it sees but does not act on (status shows it)

    # ---------------------------------------------------------------- reads

    def on_worker(self, host: dict, cmd: str, timeout: float = 8) -> tuple[int, str]:
        """A command on a worker host over the master container's ssh (FlagScale's own path)."""
        argv = ["ssh", "-n", "-p", str(host["port"]), "-o", "BatchMode=yes", "-o", "ConnectTimeout=3",
                "-o", "ServerAliveInterval=2", "-o", "ServerAliveCountMax=2", host["address"], cmd]
        return self.d.exec(self.ctr, argv, timeout=timeout)

    def started_at(self) -> dict[str, str | None]:
        """Each node's FlagOS container start time (None: not running or not reachable)."""
        out: dict[str, str | None] = {}
        info = self.d.inspect(self.ctr) or {}
        st = info.get("State") or {}
        out[self.spec["master"]] = st.get("StartedAt") if st.get("Running") else None
        fmt = shlex.quote("{{.State.Running}} {{.State.StartedAt}}")
        for w in self.spec.get("workers", []):
            rc, text = self.on_worker(w, f"docker inspect -f {fmt} {shlex.quote(self.ctr)}")
            parts = text.split()
            out[w["name"]] = parts[1] if rc == 0 and len(parts) >= 2 and parts[0] == "true" else None
        return out

    def pid_alive(self, rec: dict) -> bool:
        pid, start = rec.get("pid"), str(rec.get("pid_start") or "")
        if not isinstance(pid, int):
            return False
        rc, text = self.d.exec(self.ctr, ["awk", "{print $22}", f"/proc/{pid}/stat"], timeout=10)
        return rc == 0 and (not start or text.strip() == start)

    def ray_problems(self, rec: dict) -> list[str]:
        port, want = self.spec["dashboard_port"], int(self.spec["expected_nodes"])
        code, body = http_get(f"http://127.0.0.1:{port}/api/v0/nodes?limit=1000", timeout=3)
        if code != 200:
            return []  # the head not answering is judged by the engine's health
        try:
            rows = json.loads(body)["data"]["result"]["result"]
        except (ValueError, KeyError, TypeError):
            return []
        alive = [n for n in rows if n.get("state") == "ALIVE"]
        names = {w["address"]: w["name"] for w in self.spec.get("workers", [])}
        names[self.spec["master_address"]] = self.spec["master"]
        out = []
        if len(alive) < want:
            dead = sorted({names.get(n.get("node_ip"), n.get("node_ip")) for n in rows if n.get("state") != "ALIVE"})
            out.append(f"Ray sees {len(alive)}/{want} nodes alive" + (f" (dead: {', '.join(dead)})" if dead else ""))
        t0 = instant(rec.get("started_at")) or 0
        code, body = http_get(f"http://127.0.0.1:{port}/api/v0/actors?limit=1000&detail=1", timeout=3)
        if code == 200:
            try:
                actors = json.loads(body)["data"]["result"]["result"]
            except (ValueError, KeyError, TypeError):
                actors = []
            ip = {n.get("node_id"): n.get("node_ip") for n in rows}
            for a in actors:
                cause = json.dumps(a.get("death_cause") or {})
                end = (a.get("end_time") or 0) / 1000
                if a.get("state") == "DEAD" and "INTENDED" not in cause and end >= t0:
                    where = names.get(ip.get(a.get("node_id")), ip.get(a.get("node_id")))
                    out.append(f"{where}: engine worker {a.get('class_name') or a.get('name')} pid {a.get('pid')} died")
        return out

    def healthy_api(self) -> tuple[bool, str]:
        base = f"http://127.0.0.1:{self.spec['api_port']}"
        code, _ = http_get(base + "/health")
        if code != 200:
            return False, f"GET /health -> {code or 'no answer'}"
        return True, ""

    def serving(self) -> bool:
        """health, the model listed, one completion: what deploy's readiness asks."""
        base = f"http://127.0.0.1:{self.spec['api_port']}"
        if http_get(base + "/health")[0] != 200:
            return False
        code, body = http_get(base + "/v1/models")
        try:
            ids = [m.get("id") for m in json.loads(body).get("data", [])] if code == 200 else []
        except ValueError:
            ids = []
        if self.spec["model"] not in ids:
            return False
        return http_post(base + "/v1/completions", {"model": self.spec["model"], "prompt": "ping",
                                                    "max_tokens": 1, "temperature": 0}, timeout=60) == 200

    def failure(self, rec: dict) -> str | None:
        """The cause when the armed service is broken, else None."""
        want = rec.get("containers_started_at") or {}
        now = self.started_at()
        lost = []
        for host, t in now.items():
            if t is None:
                self.unreachable[host] = self.unreachable.get(host, 0) + 1
                if self.unreachable[host] >= 2:
                    lost.append(host)
                continue
            self.unreachable[host] = 0
            if want.get(host) and t != want[host]:
                return (f"{host}: container {self.ctr} started at {t}, after the service started "
                        f"(the node rebooted or the container was restarted)")
        if not self.pid_alive(rec):
            return f"{self.spec['master']}: serve process {rec.get('pid')} exited"
        ray = self.ray_problems(rec)
        ok, why = self.healthy_api()
        if lost:
            what = f"{', '.join(lost)}: container {self.ctr} not running or node unreachable"
            if ray or not ok:  # the group really lost it
                return "; ".join([what, *ray] + ([] if ok else [f"engine {why}"]))
            # only this script's ssh to it fails (its key removed, sshd down) while Ray sees
            # every node and the engine answers: a restart would kill a serving group and its
            # launch would need that very ssh. Say so; judge again next poll.
            self.warning = (f"{what} from {self.spec['master']}'s container, but Ray sees every node "
                            f"alive and the engine answers: not restarting")
            return None
        self.warning = None
        if ray:
            return "; ".join(ray)
        self.bad_health = 0 if ok else self.bad_health + 1
        if self.bad_health >= int(self.spec.get("health_failures", 2)):
            return f"{self.spec['master']}: engine {why} ({self.bad_health} checks in a row)"
        return None

    # ---------------------------------------------------------------- acts

    def collect_logs(self, cause: str, attempt: int) -> str:
        """Every node's recent logs into logs_dir/<time>-<n>/ (newest keep_logs kept)."""
        root = self.spec["logs_dir"]
        d = os.path.join(root, datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + f"-{attempt}")
        os.makedirs(d, exist_ok=True)
        lines = int(self.spec.get("log_lines", 300))
        ray_tail = ("for f in /tmp/ray/session_latest/logs/raylet.out /tmp/ray/session_latest/logs/raylet.err "
                    "/tmp/ray/session_latest/logs/gcs_server.out; do [ -f $f ] && { echo == $f; tail -n " + str(lines)
                    + " $f; }; done; true")

        def put(name: str, text: str) -> None:
            with open(os.path.join(d, name), "w", encoding="utf-8") as f:
                f.write(text)

        put("cause.txt", cause + "\n")
        m = self.spec["master"]
        put(f"{m}-flagscale.log", self.d.exec(self.ctr, ["tail", "-n", str(lines * 2), self.spec["log_file"]])[1])
        put(f"{m}-ray.log", self.d.exec(self.ctr, ["sh", "-c", ray_tail])[1])
        put(f"{m}-container.log", self.d.logs(self.ctr, lines))
        for w in self.spec.get("workers", []):
            c = shlex.quote(self.ctr)
            put(f"{w['name']}-ray.log", self.on_worker(w, f"docker exec {c} sh -c {shlex.quote(ray_tail)}", 20)[1])
            put(f"{w['name']}-container.log", self.on_worker(w, f"docker logs --tail {lines} {c} 2>&1", 20)[1])
        runs = sorted(e for e in os.listdir(root) if os.path.isdir(os.path.join(root, e)))
        for old in runs[:-int(self.spec.get("keep_logs", 10))]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
        return d

    def wait_nodes(self, limit: float) -> dict[str, str | None]:
        """Until every node's container runs again (a rebooting node comes back by itself)."""
        t0 = time.monotonic()
        while True:
            now = self.started_at()
            if all(now.values()) or time.monotonic() - t0 > limit or STOP:
                return now
            info = self.d.inspect(self.ctr) or {}
            if not (info.get("State") or {}).get("Running") and \
                    ((info.get("Config") or {}).get("Labels") or {}).get(self.spec["owner_label"]) == "true":
                self.d.start(self.ctr)  # flagops' own container on this host
            label = self.spec["owner_label"]
            fmt = shlex.quote("{{.State.Running}} {{index .Config.Labels " + f'"{label}"' + "}}")
            c = shlex.quote(self.ctr)
            for w in self.spec.get("workers", []):
                if now.get(w["name"]) is None:  # a reachable worker whose own container stays stopped
                    rc, text = self.on_worker(w, f"docker inspect -f {fmt} {c}")
                    if rc == 0 and text.split() == ["false", "true"]:
                        self.on_worker(w, f"docker start {c}", timeout=60)
            time.sleep(2)

    def ray_stop_all(self) -> None:
        """`ray stop` with deploy's grace period on every node at once, as deploy's stop does:
        FlagScale's own script stops Ray too, but with Ray's default 16 s grace, one node after
        another, on workers whose raylet still clings to the dead head."""
        import threading

        grace = str(int(self.spec.get("ray_grace_s", 5)))
        cmd = self.spec["before_start"] + " && ray stop --grace-period " + grace
        jobs = [threading.Thread(target=self.d.exec, args=(self.ctr, ["bash", "-c", cmd]), kwargs={"timeout": 60})]
        c = shlex.quote(self.ctr)
        for w in self.spec.get("workers", []):
            remote = f"docker exec {c} bash -c {shlex.quote(cmd)}"
            jobs.append(threading.Thread(target=self.on_worker, args=(w, remote), kwargs={"timeout": 60}))
        for j in jobs:
            j.start()
        for j in jobs:
            j.join(90)

    def restart(self, rec: dict) -> tuple[bool, str]:
        """Stop the recorded tree, launch `flagscale serve` as deploy does, record it."""
        if isinstance(rec.get("pid"), int):
            self.d.exec(self.ctr, ["bash", "-c", self.spec["proc_tree"], "proc-tree", "stop", str(rec["pid"]),
                                   str(rec.get("pid_start") or "")], timeout=60)
        self.ray_stop_all()
        launch = ' && cd "$1" && flagscale serve "$2" && test -s "$3" && cat "$3"'
        argv = ["bash", "-c", self.spec["before_start"] + launch,
                "flagops-serve", self.spec["workdir"], self.spec["serve_name"], self.spec["pid_file"]]
        rc, out = self.d.exec(self.ctr, argv, timeout=float(self.spec.get("launch_timeout_s", 300)))
        last = out.strip().splitlines()[-1].strip() if out.strip() else ""
        if rc != 0 or not last.isdigit():
            return False, f"flagscale serve failed (rc {rc}): {out.strip()[-500:]}"
        pid = int(last)
        _, start = self.d.exec(self.ctr, ["awk", "{print $22}", f"/proc/{pid}/stat"])
        rec = dict(rec, generation=self.spec["generation"], pid=pid, pid_start=start.strip(), started_at=now_iso(),
                   containers_started_at=self.started_at(), restarted_by="supervisor")
        write_json(self.spec["state_file"], rec)
        return True, f"launched pid {pid}"

    # ---------------------------------------------------------------- loop

    def save(self, **kv: object) -> None:
        self.status.update(kv, updated_at=now_iso(), updated_epoch=time.time())
        write_json(self.spec["status_file"], self.status)

    def interrupted(self, entry: dict) -> None:
        """A restart that launched nothing (this script stopped first: `docker stop`, the master
        shutting down) is no restart: not counted, not in the crash-loop window."""
        if not entry.get("interrupted"):
            entry["interrupted"] = True
            self.status["restart_count"] = max(0, int(self.status.get("restart_count", 0)) - 1)
            self.save()

    def run(self) -> int:
        sp = self.spec
        poll = float(sp.get("poll_s", 2))
        if self.status.get("generation") != sp["generation"]:
            self.status = {"generation": sp["generation"], "restarts": [], "armed": False}
        # phases: "first" (deploy's start, not judged), "watch" (armed), "restarting" (our start)
        phase = "watch" if self.status.get("armed") else "first"
        attempt_started = 0.0
        last = (self.status.get("restarts") or [{}])[-1]
        if self.status.get("restarts") and not last.get("launch") and not last.get("ok"):
            self.interrupted(last)  # killed before its launch (no SIGTERM handled): no restart made
        if self.status.get("state") == "FAILED":
            phase = "failed"
        elif last.get("launched_epoch") and not last.get("ok") and not last.get("interrupted"):
            # this script stopped after its own launch (SIGTERM mid-launch, a crash; dockerd
            # started it again): that start is still ours to judge, not a failure of a WATCHING one
            phase, attempt_started = "restarting", float(last["launched_epoch"])
        self.save(state={"first": "STARTING", "watch": "WATCHING", "failed": "FAILED",
                         "restarting": "RECOVERING"}[phase], supervisor_started_at=now_iso())
        log(f"supervising {sp['serve_name']} (generation {sp['generation']}, {phase})")
        while not STOP:
            rec = read_json(sp["state_file"])
            # a record written before supervision existed has no generation: its start time is it
            if not rec or (rec.get("generation") or rec.get("started_at")) != sp["generation"]:
                self.save(state="IDLE", reason="no service record of this deploy")
                time.sleep(poll)
                continue
            st = self.status
            cause = None
            if phase == "failed":
                self.save()
                time.sleep(poll)
                continue
            if phase in ("first", "restarting"):
                if self.pid_alive(rec) and self.serving():
                    if phase == "restarting" and st.get("restarts"):
                        st["restarts"][-1]["seconds_to_serving"] = round(time.time() - attempt_started, 1)
                        st["restarts"][-1]["ok"] = True
                    phase, self.bad_health = "watch", 0
                    self.save(state="WATCHING", armed=True, serving_since=now_iso(), serving_pid=rec.get("pid"))
                    log(f"SERVING (pid {rec.get('pid')})")
                    continue
                if phase == "restarting":
                    if not self.pid_alive(rec):
                        cause = f"{sp['master']}: serve process {rec.get('pid')} exited while starting"
                    elif time.time() - attempt_started > float(sp.get("start_timeout_s", 900)):
                        cause = f"not SERVING {sp.get('start_timeout_s', 900)} s after the restart"
            else:
                cause = self.failure(rec)
            if cause is None:
                self.save(warning=self.warning)
                time.sleep(poll)
                continue
            # ---- a failure: count, collect, back off, restart the group
            window, limit = float(sp.get("window_s", 600)), int(sp.get("max_restarts", 3))
            recent = [r for r in st["restarts"]
                      if not r.get("interrupted") and time.time() - r.get("epoch", 0) < window]
            log(f"failure: {cause}")
            if len(recent) >= limit:
                phase = "failed"
                self.save(state="FAILED", last_cause=cause,
                          reason=f"{len(recent)} restarts within {window:.0f} s did not keep it SERVING; "
                                 f"supervision stopped acting (flagops deploy starts over)")
                log("crash loop: FAILED")
                continue
            n = len(recent)
            delays = sp.get("backoff_s") or [2, 10, 30]
            delay = float(delays[min(n, len(delays) - 1)])
            entry = {"at": now_iso(), "epoch": time.time(), "cause": cause, "attempt": n + 1, "ok": False}
            st["restarts"] = (st["restarts"] + [entry])[-50:]
            self.save(state="RECOVERING", last_cause=cause, restart_count=int(st.get("restart_count", 0)) + 1,
                      backoff_s=delay, detected_at=entry["at"])
            try:
                entry["logs"] = self.collect_logs(cause, n + 1)
            except OSError as exc:
                entry["logs"] = f"(not collected: {exc})"
            t_wait = time.monotonic()
            while time.monotonic() - t_wait < delay and not STOP:
                time.sleep(0.2)
            if not STOP:
                self.wait_nodes(float(sp.get("start_timeout_s", 900)))
            if STOP:  # stopped in the backoff or while a node was still down: launch nothing
                self.interrupted(entry)
                break
            attempt_started = time.time()
            ok, detail = self.restart(read_json(sp["state_file"]) or rec)
            entry["launch"], entry["launched_epoch"] = detail, attempt_started
            phase, self.bad_health = "restarting", 0
            self.unreachable.clear()
            self.save(state="RECOVERING")
            log(f"restart {n + 1}: {detail}")
        if phase == "failed":  # the crash loop's verdict stays what status reads
            self.save(stopped_at=now_iso())
        else:
            self.save(state="STOPPED", reason="supervision stopped (docker stop)", stopped_at=now_iso())
        log("stopped")
        return 0


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)
    spec = read_json(argv[1]) if len(argv) > 1 else None
    if not spec:
        print(f"usage: supervisor.py SPEC.json (not readable: {argv[1:]})", file=sys.stderr)
        return 2
    return Supervisor(spec).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
