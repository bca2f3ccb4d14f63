"""Host-side services the nodes use, each a real server started and recorded by the lab.

- registry: Debian ``docker-registry`` on 127.0.0.1:5000 (data in ``<lab>/registry``),
  reached by the nodes at 172.30.0.1:5000 through a socat forwarder (the host engine
  pushes to 127.0.0.1:5000, which Docker trusts without TLS). It requires a login
  (htpasswd, bcrypt): user ``flagops-lab``, password generated once into
  ``<lab>/registry-auth/password`` (mode 0600); the lab inventory reads it from
  ``FLAGOPS_REGISTRY_PASSWORD``, so the nodes pull the way a800 pulls from its registry.
- model server: nginx (own config and pid, never the system service) on
  172.30.0.1:8090 and 127.0.0.1:8090, serving ``<lab>/published/`` with Range support.
- git server: ``git daemon`` on 172.30.0.1:9418 and 127.0.0.1:9418 exporting ``<lab>/git/``.
- model hub: the ModelScope API stand-in (``hub.py``) on https://172.30.0.1:8443, lab CA.
"""

from __future__ import annotations

import base64
import os
import secrets
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from flagops.lab import LabError, Progress, procs
from flagops.lab.paths import LabPaths

GATEWAY = "172.30.0.1"
LOOPBACK = "127.0.0.1"
REGISTRY_PORT = 5000
MODEL_PORT = 8090
GIT_PORT = 9418
HUB_PORT = 8443  # flagops/lab/hub_lab.py: the ModelScope hub stand-in (HTTPS, lab CA)
REGISTRY_USER = "flagops-lab"
REGISTRY_PASSWORD_ENV = "FLAGOPS_REGISTRY_PASSWORD"  # what the lab inventory looks up


@dataclass(frozen=True)
class Service:
    """One recorded host process and the address where it must answer."""

    name: str
    describe: str
    host: str
    port: int
    http_path: str | None = None  # probe with an HTTP GET (2xx) instead of a TCP connect
    # basic-auth credentials: the probe must be refused (401) without them and let in with them
    auth: tuple[str, str] | None = field(default=None, repr=False)

    def probe(self) -> bool:
        if self.http_path is None:
            return _tcp_open(self.host, self.port)
        url = f"http://{self.host}:{self.port}{self.http_path}"
        if self.auth is None:
            return _http_ok(url)
        return _http_status(url) == 401 and _http_ok(url, basic_auth(*self.auth))


def _tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def basic_auth(user: str, password: str) -> dict[str, str]:
    """The ``Authorization`` header for HTTP basic auth."""
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def _http_status(url: str, headers: dict[str, str] | None = None) -> int:
    """The HTTP status of a GET (0: no answer)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return 0


def _http_ok(url: str, headers: dict[str, str] | None = None) -> bool:
    return 200 <= _http_status(url, headers) < 300


def registry_auth_dir(paths: LabPaths) -> Path:
    return paths.root / "registry-auth"


def registry_password(paths: LabPaths) -> str:
    """The lab registry's password (``<lab>/registry-auth/password``)."""
    return (registry_auth_dir(paths) / "password").read_text().strip()


def registry_env(paths: LabPaths | None = None) -> dict[str, str]:
    """``os.environ`` with the lab registry's password where the lab inventory looks for it
    (for scripts that run ``flagops provision`` on the lab; a set value is kept)."""
    env = dict(os.environ)
    if not env.get(REGISTRY_PASSWORD_ENV):
        env[REGISTRY_PASSWORD_ENV] = registry_password(paths or LabPaths.default())
    return env


def credential_fixes(registry: str, paths: LabPaths | None = None) -> dict[str, str]:
    """How to set the lab registry's password (env variable -> fix) when ``registry`` is the
    lab's; {} for any other registry."""
    if registry != f"{GATEWAY}:{REGISTRY_PORT}":
        return {}
    pw_file = registry_auth_dir(paths or LabPaths.default()) / "password"
    try:
        shown = "~/" + pw_file.relative_to(Path.home()).as_posix()
    except ValueError:
        shown = str(pw_file)
    return {REGISTRY_PASSWORD_ENV: f'export {REGISTRY_PASSWORD_ENV}="$(cat {shown})" '
                                   "(the lab registry's password, written by `flagops lab up`)"}


def _registry_auth(paths: LabPaths) -> tuple[str, str] | None:
    try:
        return REGISTRY_USER, registry_password(paths)
    except OSError:
        return None


def ensure_registry_auth(paths: LabPaths) -> bool:
    """The registry's password (generated once, mode 0600) and its htpasswd (bcrypt, 0600),
    rewritten only when it does not hold this user and password; True when it was written."""
    import bcrypt  # paramiko's dependency (fabric -> paramiko -> bcrypt)

    out = registry_auth_dir(paths)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    pw_file, htpasswd = out / "password", out / "htpasswd"
    if not pw_file.is_file() or not pw_file.read_text().strip():
        pw_file.touch(mode=0o600)
        pw_file.write_text("lab-" + secrets.token_hex(16) + "\n")
    password = registry_password(paths).encode()
    try:
        user, _, hashed = htpasswd.read_text().strip().partition(":")
        if user == REGISTRY_USER and bcrypt.checkpw(password, hashed.encode()):
            return False
    except (OSError, ValueError):
        pass
    htpasswd.touch(mode=0o600)
    htpasswd.write_text(f"{REGISTRY_USER}:{bcrypt.hashpw(password, bcrypt.gensalt()).decode()}\n")
    return True


def _wait(svc: Service, log: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not svc.probe():
        if time.monotonic() > deadline:
            raise LabError(f"{svc.describe} did not come up within {timeout:.0f}s; see {log}")
        time.sleep(0.2)


def _registry_config(paths: LabPaths) -> str:
    return (
        "version: 0.1\n"
        "log: {level: warn}\n"
        f"storage: {{filesystem: {{rootdirectory: {paths.registry}}}, delete: {{enabled: true}}}}\n"
        f"http: {{addr: '{LOOPBACK}:{REGISTRY_PORT}'}}\n"
        f"auth: {{htpasswd: {{realm: flagops-lab, path: {registry_auth_dir(paths) / 'htpasswd'}}}}}\n"
    )


def _nginx_config(paths: LabPaths) -> str:
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must read files under ~ (mode 700)
    temp = paths.run / "nginx"
    return f"""{user}worker_processes 1;
pid {temp}/nginx.pid;
error_log {paths.logs}/nginx-error.log warn;
events {{ worker_connections 256; }}
http {{
    types {{ application/json json; text/plain txt; application/octet-stream safetensors bin; }}
    default_type application/octet-stream;
    access_log {paths.logs}/nginx-access.log;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    sendfile on;
    server {{
        listen {GATEWAY}:{MODEL_PORT};
        listen {LOOPBACK}:{MODEL_PORT};
        root {paths.published};
        autoindex on;
    }}
}}
"""


def _argv(paths: LabPaths, name: str) -> list[str]:
    if name == "registry":
        conf = paths.run / "registry.yml"
        conf.write_text(_registry_config(paths))
        return ["docker-registry", "serve", str(conf)]
    if name == "registry-forward":
        return [
            "socat",
            f"TCP-LISTEN:{REGISTRY_PORT},bind={GATEWAY},reuseaddr,fork",
            f"TCP:{LOOPBACK}:{REGISTRY_PORT}",
        ]
    if name == "model-server":
        conf = paths.run / "nginx" / "nginx.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(_nginx_config(paths))
        return [
            "/usr/sbin/nginx",
            "-p",
            str(conf.parent),
            "-c",
            str(conf),
            "-e",
            str(paths.logs / "nginx-error.log"),
            "-g",
            "daemon off;",
        ]
    if name == "git-server":
        return [
            "git",
            "daemon",
            "--reuseaddr",
            "--export-all",
            "--informative-errors",
            f"--base-path={paths.git}",
            f"--listen={GATEWAY}",
            f"--listen={LOOPBACK}",
            f"--port={GIT_PORT}",
            str(paths.git),
        ]
    if name == "model-hub":
        from flagops.lab import hub_lab

        return hub_lab.argv(paths, GATEWAY, LOOPBACK)
    raise ValueError(name)


def services(paths: LabPaths | None = None) -> list[Service]:
    """The lab's host services, in start order (the forwarder needs the registry). With
    ``paths``, the registry probes check its login (a registry without one is restarted)."""
    auth = _registry_auth(paths) if paths is not None else None
    fwd = f"socat {GATEWAY}:{REGISTRY_PORT} -> {LOOPBACK}:{REGISTRY_PORT}"
    return [
        Service(
            "registry",
            f"docker-registry {LOOPBACK}:{REGISTRY_PORT}",
            LOOPBACK,
            REGISTRY_PORT,
            "/v2/",
            auth,
        ),
        Service("registry-forward", fwd, GATEWAY, REGISTRY_PORT, "/v2/", auth),
        Service("model-server", f"nginx http://{GATEWAY}:{MODEL_PORT}/", GATEWAY, MODEL_PORT),
        Service("git-server", f"git daemon git://{GATEWAY}:{GIT_PORT}/", GATEWAY, GIT_PORT),
        Service("model-hub", f"ModelScope hub stand-in https://{GATEWAY}:{HUB_PORT}/", GATEWAY, HUB_PORT),
    ]


def ensure_services(paths: LabPaths, progress: Progress) -> None:
    """Start each service that is not running (needs the lab bridge for 172.30.0.1)."""
    for d in (paths.registry, paths.published, paths.git, paths.run, paths.logs):
        d.mkdir(parents=True, exist_ok=True)
    from flagops.lab import hub_lab

    hub_lab.ensure_assets(paths, GATEWAY, LOOPBACK, progress)
    if ensure_registry_auth(paths):
        progress(f"registry: login {REGISTRY_USER}, password in {registry_auth_dir(paths) / 'password'}")
    for svc in services(paths):
        record = procs.read(paths.pids, svc.name)
        if procs.alive(record) and svc.probe():
            continue
        procs.stop(paths.pids, svc.name)  # a dead or wedged record
        if _tcp_open(svc.host, svc.port):
            raise LabError(f"{svc.name}: {svc.host}:{svc.port} is taken by a process the lab did not start")
        record = procs.start(paths.pids, paths.logs, svc.name, _argv(paths, svc.name))
        _wait(svc, record.log)
        progress(f"{svc.name}: started ({svc.describe}, pid {record.pid})")


def stop_services(paths: LabPaths, progress: Progress) -> None:
    """Stop the recorded services, last started first."""
    for svc in reversed(services(paths)):
        if procs.stop(paths.pids, svc.name):
            progress(f"{svc.name}: stopped")


def services_status(paths: LabPaths) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for svc in services(paths):
        record = procs.read(paths.pids, svc.name)
        running = procs.alive(record)
        out[svc.name] = {
            "up": running and svc.probe(),
            "pid": record.pid if running and record else None,
            "detail": svc.describe,
        }
    return out
