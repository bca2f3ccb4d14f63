"""The lab's model: a tiny random-weight ERNIE-4.5 MoE, built inside the lab FlagOS image.

``ensure_model`` runs ``assets/flagos/build_tiny_model.py`` in a container of the image (it has
torch, transformers, tokenizers, safetensors), then writes ``manifest.json`` next to the files:

    {"name": "ERNIE-4.5-tiny-MoE", "files": [{"path": ..., "size": ..., "sha256": ...}, ...]}

The build is deterministic (fixed seeds, single-threaded tokenizer training), so the same image
always yields the same bytes and the same manifest. A key file beside the model directory
(script + image hash) makes a second call with nothing changed instant.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import docker
import docker.errors

from flagops.lab import LabError, Progress

NAME = "ERNIE-4.5-tiny-MoE"
SCRIPT = Path(__file__).resolve().parent / "assets" / "flagos" / "build_tiny_model.py"
PYTHON = "/opt/venvs/flagscale-inference/bin/python"
MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def make_manifest(model_dir: Path, name: str = NAME) -> dict:
    """The manifest of every regular file under ``model_dir`` (but itself), sorted by path."""
    files = []
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file() and p.name != MANIFEST):
        files.append(
            {"path": path.relative_to(model_dir).as_posix(), "size": path.stat().st_size, "sha256": sha256_file(path)}
        )
    return {"name": name, "files": files}


def verify_model(model_dir: Path) -> list[str]:
    """Problems found checking ``model_dir`` against its manifest (empty: it verifies)."""
    manifest_path = model_dir / MANIFEST
    if not manifest_path.is_file():
        return [f"{manifest_path} is missing"]
    manifest = json.loads(manifest_path.read_text())
    problems = []
    listed = set()
    for entry in manifest.get("files", []):
        path = model_dir / entry["path"]
        listed.add(entry["path"])
        if not path.is_file():
            problems.append(f"{entry['path']}: missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{entry['path']}: size {path.stat().st_size} != {entry['size']}")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{entry['path']}: sha256 mismatch")
    extra = {p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()} - listed - {MANIFEST}
    problems += [f"{p}: not in the manifest" for p in sorted(extra)]
    if manifest.get("name") != model_dir.name:
        problems.append(f"manifest name {manifest.get('name')!r} != directory {model_dir.name!r}")
    return problems


def model_key(client: docker.DockerClient, image: str) -> str:
    """What decides the model's bytes: the build script and the image's libraries."""
    img = client.images.get(image)
    flavour = img.labels.get("io.flagops.flagos.key") or img.id
    return hashlib.sha256(SCRIPT.read_bytes() + b"\0" + flavour.encode()).hexdigest()


def ensure_model(client: docker.DockerClient, image: str, out_dir: Path, progress: Progress) -> Path:
    """Build (or find) ``<out_dir>/ERNIE-4.5-tiny-MoE`` with its manifest; returns that directory.

    Args:
        client: docker SDK client of the engine that has ``image``.
        image: the lab FlagOS image (``ensure_image``'s tag).
        out_dir: where the model directory goes (the lab's model server publishes it).
        progress: receives one line per step.
    """
    out_dir = Path(out_dir).resolve()
    target = out_dir / NAME
    key_file = out_dir / f".{NAME}.key"
    key = model_key(client, image)
    if key_file.is_file() and key_file.read_text().strip() == key and not verify_model(target):
        progress(f"model {NAME}: cached ({_size(target)})")
        return target

    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / f".{NAME}.build"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    progress(f"model {NAME}: building in a container of {image}")
    try:
        client.containers.run(
            image,
            [PYTHON, "/build_tiny_model.py", f"/out/{NAME}"],
            remove=True,
            network_mode="none",
            user=f"{os.getuid()}:{os.getgid()}",
            environment={"HOME": "/tmp", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
            volumes={
                str(SCRIPT): {"bind": "/build_tiny_model.py", "mode": "ro"},
                str(work): {"bind": "/out", "mode": "rw"},
            },
            labels={"io.flagops.lab.build": "model"},
        )
    except docker.errors.ContainerError as exc:
        shutil.rmtree(work, ignore_errors=True)
        stderr = exc.stderr.decode(errors="replace")[-3000:] if exc.stderr else ""
        raise LabError(f"building {NAME} failed (exit {exc.exit_status}):\n{stderr}") from exc
    built = work / NAME
    for path in built.rglob("*"):
        if path.is_file():
            path.chmod(0o644)  # safetensors are written 0600; the model server must read them
    manifest = make_manifest(built)
    (built / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    (built / MANIFEST).chmod(0o644)
    if target.exists():
        shutil.rmtree(target)
    built.rename(target)
    shutil.rmtree(work, ignore_errors=True)
    key_file.write_text(key + "\n")
    progress(f"model {NAME}: {len(manifest['files'])} files, {_size(target)}")
    return target


def _size(model_dir: Path) -> str:
    total = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    return f"{total / 2**20:.1f} MiB"
