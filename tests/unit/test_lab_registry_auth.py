"""The lab registry's login: generated once, kept private, checked by the service probe,
and given to the inventory only as an env lookup (no credential at rest in the repo)."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import bcrypt
import pytest
import yaml

from flagops.lab import services
from flagops.lab.paths import LabPaths

REPO = Path(__file__).resolve().parents[2]


def test_password_generated_once_private_and_htpasswd_is_bcrypt(tmp_path: Path) -> None:
    paths = LabPaths(tmp_path / "lab")
    assert services.ensure_registry_auth(paths) is True
    out = services.registry_auth_dir(paths)
    password = services.registry_password(paths)
    assert password.startswith("lab-") and len(password) == 36
    for name in ("password", "htpasswd"):
        assert (out / name).stat().st_mode & 0o777 == 0o600, name
    assert out.stat().st_mode & 0o077 == 0
    user, _, hashed = (out / "htpasswd").read_text().strip().partition(":")
    assert user == services.REGISTRY_USER and hashed.startswith("$2")
    assert bcrypt.checkpw(password.encode(), hashed.encode())
    before = (out / "htpasswd").read_text()
    assert services.ensure_registry_auth(paths) is False  # warm: nothing rewritten
    assert services.registry_password(paths) == password and (out / "htpasswd").read_text() == before
    (out / "htpasswd").write_text("someone:$2b$12$invalid\n")  # a stale file is repaired
    assert services.ensure_registry_auth(paths) is True
    assert services.ensure_registry_auth(paths) is False


def test_registry_config_requires_htpasswd(tmp_path: Path) -> None:
    paths = LabPaths(tmp_path / "lab")
    conf = yaml.safe_load(services._registry_config(paths))
    assert conf["auth"]["htpasswd"]["path"] == str(services.registry_auth_dir(paths) / "htpasswd")
    assert conf["http"]["addr"] == "127.0.0.1:5000"


class _Registry(http.server.BaseHTTPRequestHandler):
    """/v2/ as docker-registry answers it: 401 without the right basic auth (``auth`` on the
    server: None = a registry with no login at all)."""

    def do_GET(self) -> None:  # noqa: N802
        want = self.server.want  # type: ignore[attr-defined]
        ok = want is None or self.headers.get("Authorization") == want
        self.send_response(200 if ok else 401)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def registry() -> http.server.HTTPServer:
    srv = http.server.HTTPServer(("127.0.0.1", 0), _Registry)
    srv.want = None  # type: ignore[attr-defined]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()


def test_probe_needs_a_registry_that_demands_the_login(registry: http.server.HTTPServer) -> None:
    port = registry.server_address[1]
    auth = ("flagops-lab", "pw-1")
    svc = services.Service("registry", "test", "127.0.0.1", port, "/v2/", auth)
    assert "pw-1" not in repr(svc)
    assert svc.probe() is False  # an old registry without a login: `lab up` restarts it
    registry.want = services.basic_auth(*auth)["Authorization"]  # type: ignore[attr-defined]
    assert svc.probe() is True
    wrong = services.Service("registry", "test", "127.0.0.1", port, "/v2/", ("flagops-lab", "other"))
    assert wrong.probe() is False  # a registry with another password: restarted too


def test_services_probe_with_the_lab_password(tmp_path: Path) -> None:
    paths = LabPaths(tmp_path / "lab")
    assert all(s.auth is None for s in services.services(paths))  # no password yet
    services.ensure_registry_auth(paths)
    by = {s.name: s for s in services.services(paths)}
    assert by["registry"].auth == by["registry-forward"].auth == (services.REGISTRY_USER,
                                                                   services.registry_password(paths))
    assert by["model-server"].auth is None


@pytest.mark.parametrize("name", ["lab.yaml", "lab-bastion.yaml"])
def test_lab_inventory_takes_the_password_from_the_environment(name: str) -> None:
    from flagops import config

    v = yaml.safe_load((REPO / "inventories" / name).read_text())["all"]["vars"]
    assert v["flagops_registry_username"] == services.REGISTRY_USER
    assert config.CREDENTIAL_TEMPLATE_RE.fullmatch(v["flagops_registry_password"])
    assert services.REGISTRY_PASSWORD_ENV in v["flagops_registry_password"]


def test_image_role_keeps_no_login() -> None:
    """The login goes into a throwaway DOCKER_CONFIG that an always: block removes, the task
    holding the password is no_log, and nothing logs in to the default ~/.docker/config.json."""
    tasks = yaml.safe_load((REPO / "roles" / "image" / "tasks" / "main.yml").read_text())
    block = next(t for t in tasks if "block" in t)
    inner = {t["name"]: t for t in block["block"]}
    login = next(t for t in inner.values() if "community.docker.docker_login" in t)
    assert login["no_log"] is True and login["changed_when"] is False
    assert login["community.docker.docker_login"]["config_path"] == "{{ _image_auth.path }}/config.json"
    tmp = next(t for t in inner.values() if "ansible.builtin.tempfile" in t)
    assert tmp["ansible.builtin.tempfile"]["state"] == "directory"
    pull = next(t for t in inner.values() if "community.docker.docker_image_pull" in t)
    assert "DOCKER_CONFIG" in pull["environment"]
    (cleanup,) = block["always"]
    assert cleanup["ansible.builtin.file"] == {"path": "{{ _image_auth.path }}", "state": "absent"}
    for t in tasks:  # outside the block only a logout (state: absent) touches a docker config
        if "community.docker.docker_login" in t:
            assert t["community.docker.docker_login"]["state"] == "absent"
    defaults = yaml.safe_load((REPO / "roles" / "image" / "defaults" / "main.yml").read_text())
    assert defaults["image_auth_parent"] == "/dev/shm"  # a tmpfs: the login never reaches a disk
