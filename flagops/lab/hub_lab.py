"""The lab's ModelScope hub as a lab service: its CA, token, SDK wheels and node trust.

- ``<lab>/hub/``: the lab CA (``ca.crt``, ``ca.key``), the hub's certificate for 172.30.0.1
  and 127.0.0.1, and ``token`` (the one access token the hub accepts; export it as
  ``MODELSCOPE_API_TOKEN`` to exercise the SDK's login).
- ``<lab>/published/wheels/``: the pinned ``modelscope`` SDK, its dependencies and pip, as
  wheels for the nodes' Python (served by the lab nginx at http://172.30.0.1:8090/wheels/),
  so the weights role installs the SDK with no package index.
- each node trusts the lab CA (``/usr/local/share/ca-certificates/flagops-lab-ca.crt``).
- the hub itself (``hub.py``, run as a script) on https://172.30.0.1:8443 and
  https://127.0.0.1:8443, serving the lab model as ``flagops-lab/ERNIE-4.5-tiny-MoE``.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import docker
import docker.errors

from flagops.lab import LabError, Progress
from flagops.lab.paths import LabPaths

HUB_SCRIPT = Path(__file__).resolve().parent / "hub.py"
HUB_PORT = 8443
MODEL_ID = "flagops-lab/ERNIE-4.5-tiny-MoE"
MODEL_DIR = "ERNIE-4.5-tiny-MoE"
SDK = "modelscope==1.36.3"  # roles/weights/defaults/main.yml pins the same release
NODE_PYTHON = "3.11"  # Debian bookworm's python3 on the nodes
CA_ON_NODE = "/usr/local/share/ca-certificates/flagops-lab-ca.crt"


def hub_dir(paths: LabPaths) -> Path:
    return paths.root / "hub"


def token(paths: LabPaths) -> str:
    return (hub_dir(paths) / "token").read_text().strip()


def ensure_assets(paths: LabPaths, gateway: str, loopback: str, progress: Progress) -> None:
    """CA + certificate + token (kept once made), and the SDK wheels for the nodes."""
    sys.path.insert(0, str(HUB_SCRIPT.parent))
    try:
        import hub as hubmod  # the stdlib-only hub script
    finally:
        sys.path.pop(0)
    import secrets

    out = hub_dir(paths)
    try:
        hubmod.make_ca(out, [gateway, loopback])
    except RuntimeError as exc:
        raise LabError(f"lab hub CA: {exc}") from exc
    tok = out / "token"
    if not tok.is_file():
        tok.touch(mode=0o600)
        tok.write_text("lab-" + secrets.token_hex(16) + "\n")
    ensure_wheels(paths, progress)


def ensure_wheels(paths: LabPaths, progress: Progress) -> None:
    wheels = paths.published / "wheels"
    stamp = wheels / ".requirement"
    if stamp.is_file() and stamp.read_text().strip() == SDK and any(wheels.glob("modelscope-*.whl")):
        return
    wheels.mkdir(parents=True, exist_ok=True)
    progress(f"hub: downloading {SDK} and pip wheels for the nodes (python {NODE_PYTHON})")
    argv = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--only-binary=:all:",
            "--python-version", NODE_PYTHON, "--implementation", "cp", "--platform", "manylinux2014_x86_64",
            "--platform", "any", "-d", str(wheels), SDK, "pip"]
    res = subprocess.run(argv, capture_output=True, text=True)
    if res.returncode:
        raise LabError(f"pip download {SDK} failed:\n{res.stderr[-2000:]}")
    for w in wheels.glob("*.whl"):
        w.chmod(0o644)
    stamp.write_text(SDK + "\n")


def argv(paths: LabPaths, gateway: str, loopback: str) -> list[str]:
    out = hub_dir(paths)
    return [sys.executable, str(HUB_SCRIPT), "--listen", f"{gateway}:{HUB_PORT}", "--listen", f"{loopback}:{HUB_PORT}",
            "--model", f"{MODEL_ID}={paths.published / MODEL_DIR}", "--cert", str(out / "hub.crt"),
            "--key", str(out / "hub.key"), "--token-file", str(out / "token")]


def trust_ca(client: docker.DockerClient, paths: LabPaths, containers: list[str], progress: Progress) -> None:
    """Each node trusts the lab CA (system store); a no-op when it already holds this CA."""
    ca = (hub_dir(paths) / "ca.crt").read_text()
    for name in containers:
        try:
            node = client.containers.get(name)
        except docker.errors.NotFound:
            raise LabError(f"node container {name} is missing") from None
        rc, held = node.exec_run(["cat", CA_ON_NODE])
        if rc == 0 and held.decode() == ca:
            continue
        blob = io.BytesIO()
        with tarfile.open(fileobj=blob, mode="w") as tar:
            info = tarfile.TarInfo(Path(CA_ON_NODE).name)
            info.size, info.mode = len(ca.encode()), 0o644
            tar.addfile(info, io.BytesIO(ca.encode()))
        node.put_archive(str(Path(CA_ON_NODE).parent), blob.getvalue())
        rc, out = node.exec_run(["update-ca-certificates"])
        if rc != 0:
            raise LabError(f"{name}: update-ca-certificates failed: {out.decode(errors='replace')[-500:]}")
        rc, held = node.exec_run(["cat", CA_ON_NODE])
        if rc != 0 or held.decode() != ca:
            raise LabError(f"{name}: could not install the lab CA at {CA_ON_NODE}")
        progress(f"{name}: trusts the lab CA")
