"""Debian base images built with mmdebstrap and `docker import` (Docker Hub is unreachable).

The image is its own cache: it carries the label ``io.flagops.rootfs.key``, a hash of
(suite, variant, packages, script version), so a second call with the same inputs
finds it and only (re)tags it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections import deque
from pathlib import Path

import docker
from docker.utils import parse_repository_tag

from flagops.lab import LabError, Progress
from flagops.lab.engine import ensure_apt_packages

SCRIPT_VERSION = 1  # bump when the mmdebstrap recipe below changes
SUITE = "bookworm"
VARIANT = "minbase"
KEY_LABEL = "io.flagops.rootfs.key"
APT_SOURCES = Path("/etc/apt")

# Documentation and translations are dead weight in a lab image.
_DPKG_EXCLUDES = (
    "/usr/share/doc/*",
    "/usr/share/man/*",
    "/usr/share/info/*",
    "/usr/share/locale/*",
)


def rootfs_key(suite: str, variant: str, packages: list[str]) -> str:
    """The cache key of a rootfs: sha256 over its inputs (package order does not matter)."""
    spec = {
        "v": SCRIPT_VERSION,
        "suite": suite,
        "variant": variant,
        "packages": sorted(set(packages)),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def host_mirrors(suite: str, apt_dir: Path = APT_SOURCES) -> list[str]:
    """``deb URI SUITE COMPONENTS`` lines for ``suite`` and ``suite-*`` from the host's apt sources.

    Reads ``sources.list``, ``sources.list.d/*.list`` and deb822 ``*.sources``, so the
    build uses whatever mirror (or snapshot) the host is configured for.
    """
    entries: list[tuple[str, str, str]] = []
    files = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]
    for path in files:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = line.split("#", 1)[0].split()
            if len(words) < 4 or words[0] != "deb":
                continue
            if words[1].startswith("["):  # options: deb [arch=... signed-by=...] URI ...
                while words and not words[0].endswith("]"):
                    words.pop(0)
                words = ["deb", *words[1:]]
            if len(words) >= 4:
                entries.append((words[1], words[2], " ".join(words[3:])))
    for path in sorted((apt_dir / "sources.list.d").glob("*.sources")):
        for stanza in path.read_text().split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if ":" in line and not line.startswith(("#", " ")):
                    name, value = line.split(":", 1)
                    fields[name.strip().lower()] = value.strip()
            if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes") == "no":
                continue
            for uri in fields.get("uris", "").split():
                for s in fields.get("suites", "").split():
                    entries.append((uri, s, fields.get("components", "main")))
    wanted = [f"deb {uri} {s} {comps}" for uri, s, comps in entries if s == suite or s.startswith(suite + "-")]
    return list(dict.fromkeys(wanted))


def find_image(client: docker.DockerClient, key: str) -> docker.models.images.Image | None:
    """The image imported for ``key``, if the engine has one.

    Images built FROM it inherit the label, so only a one-layer image (the import) counts.
    """
    for image in client.images.list(filters={"label": f"{KEY_LABEL}={key}"}):
        if len(image.attrs.get("RootFS", {}).get("Layers", [])) == 1:
            return image
    return None


def build_base_image(
    client: docker.DockerClient,
    tag: str,
    packages: list[str],
    cache_dir: Path,
    progress: Progress,
    *,
    suite: str = SUITE,
    variant: str = VARIANT,
) -> str:
    """Build (or reuse) a Debian ``suite`` image with ``packages`` and tag it ``tag``.

    Args:
        client: docker SDK client of the engine that gets the image.
        tag: ``repo:tag`` to give the image (re-applied on a cache hit).
        packages: Debian packages installed on top of the variant (no recommends).
        cache_dir: scratch space for the rootfs tarball; the tarball is deleted after import.
        progress: receives one line per step.

    Returns:
        The image id.

    Raises:
        LabError: mmdebstrap failed (the last lines of its output are in the message).
    """
    key = rootfs_key(suite, variant, packages)
    repo, version = parse_repository_tag(tag)
    found = find_image(client, key)
    if found is not None:
        if tag not in found.tags:
            found.tag(repo, version or "latest")
        progress(f"base image {tag}: cached ({key[:12]})")
        return found.id

    ensure_apt_packages(["mmdebstrap"], progress)
    mirrors = host_mirrors(suite)
    if not mirrors:
        raise LabError(f"no apt source for {suite} in {APT_SOURCES}; need a Debian {suite} mirror")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tarball = cache_dir / f"rootfs-{key[:16]}.tar"
    cmd = [
        "mmdebstrap",
        f"--variant={variant}",
        '--aptopt=APT::Install-Recommends "false"',
        *(f"--dpkgopt=path-exclude={p}" for p in _DPKG_EXCLUDES),
        f"--include={','.join(sorted(set(packages)))}",
        suite,
        str(tarball),
        *mirrors,
    ]
    progress(f"base image {tag}: mmdebstrap {suite}/{variant} + {len(set(packages))} packages")
    try:
        _run_streaming(cmd, progress)
        progress(f"base image {tag}: docker import ({tarball.stat().st_size // 2**20} MiB)")
        changes = [
            f"LABEL {KEY_LABEL}={key}",
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            'CMD ["/bin/bash"]',
        ]
        out = client.api.import_image_from_file(str(tarball), repository=repo, tag=version or "latest", changes=changes)
    finally:
        tarball.unlink(missing_ok=True)
    image = find_image(client, key)
    if image is None:
        raise LabError(f"docker import of {tarball.name} produced no image: {out!r}")
    return image.id


def _run_streaming(cmd: list[str], progress: Progress) -> None:
    """Run ``cmd``, pass its ``I:``/``W:``/``E:`` lines to ``progress``; raise with the tail."""
    tail: deque[str] = deque(maxlen=30)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            if line.startswith(("I: ", "W: ", "E: ")):
                progress("  " + line)
    if proc.returncode != 0:
        raise LabError(f"{cmd[0]} exited {proc.returncode}:\n" + "\n".join(tail))
