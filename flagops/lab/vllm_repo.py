"""The lab's vLLM git repository (FlagScale's ``third_party/vllm`` submodule), made from the PyPI sdist.

The flag-scale 0.8.0 wheel carries FlagScale's vLLM changes as 27 ``git apply`` patches
(``flagscale/backends/vllm/**.patch``). They apply cleanly to the **vLLM 0.11.0** sdist (and not
to the v0.9.1-era commit the 230dc1d8 pin records as its gitlink), so the lab's submodule is
vLLM 0.11.0: the sdist ``vllm-0.11.0.tar.gz`` (sha256 pinned below, found in PyPI's simple index (JSON),
cached under ``<lab>/cache/vllm/``, resumed with Range and hash-checked) becomes one deterministic
commit in ``<git_root>/vllm.git`` on ``main``, on ``master`` and as the tag ``v0.11.0``. (``master``:
GitPython's ``Submodule.update``, which unpatch.py calls, tracks ``master`` unless .gitmodules names a
branch; without it the clone's HEAD already equals the gitlink and GitPython leaves the work tree
empty. GitHub's vLLM has no ``master`` either, but there HEAD is newer than the gitlink, so GitPython
resets to it.) Everything in the sdist
is committed (``git add --force``: the sdist's own .gitignore names vllm/_version.py) except the
sdist's build metadata, ``PKG-INFO`` and ``vllm.egg-info/``.

The lab's FlagScale repository records this commit as its ``third_party/vllm`` gitlink, with a
``.gitmodules`` entry pointing at ``git://172.30.0.1/vllm.git``: FlagScale's own
``tools/patch/unpatch.py --backend=vllm`` then initialises the submodule from the lab exactly as
it would from GitHub.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from flagops.lab import LabError, Progress, gitrepo
from flagops.lab.gitrepo import _git, _head_of

VERSION = "0.11.0"
SDIST = f"vllm-{VERSION}.tar.gz"
SDIST_SHA256 = "f435a64c24e9c4178d657a76f8edd8548ddc444012f7d06a9f79ac3a6392bfae"
PYPI_SIMPLE = "https://pypi.org/simple/vllm/"  # PEP 691 JSON form of the simple index
UPSTREAM = "https://github.com/vllm-project/vllm.git"
REPO_NAME = "vllm.git"
BRANCH = gitrepo.BRANCH
TAG = f"v{VERSION}"
RECIPE_VERSION = 2  # bump when the tree or the commit below changes
DROP = ("PKG-INFO", "vllm.egg-info")  # sdist build metadata, not sources


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sdist_url() -> str:
    """The sdist's download URL from PyPI's simple index (checked against the pinned sha256)."""
    request = urllib.request.Request(PYPI_SIMPLE, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            data = json.load(resp)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise LabError(
            f"cannot read {PYPI_SIMPLE} ({exc}); put {SDIST} (sha256 {SDIST_SHA256}) into the lab cache's vllm/ folder"
        ) from None
    for item in data.get("files", []):
        if item.get("filename") == SDIST:
            if item.get("hashes", {}).get("sha256") != SDIST_SHA256:
                raise LabError(f"PyPI lists {SDIST} with sha256 {item.get('hashes')}, expected {SDIST_SHA256}")
            return item["url"]
    raise LabError(f"PyPI's {PYPI_SIMPLE} lists no {SDIST}")


def fetch_sdist(cache_dir: Path, progress: Progress, url: str | None = None) -> Path:
    """``<cache>/vllm/vllm-0.11.0.tar.gz``, downloaded (resumed from a ``.part``) and hash-checked."""
    dest = cache_dir / "vllm" / SDIST
    if dest.is_file() and _sha256(dest) == SDIST_SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(SDIST + ".part")
    url = url or _sdist_url()
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    started, last = time.monotonic(), 0.0
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            if have and resp.status != 206:  # server ignored Range: start over
                have = 0
            total = have + int(resp.headers.get("Content-Length") or 0)
            with open(part, "ab" if have else "wb") as out:
                done = have
                for block in iter(lambda: resp.read(1 << 20), b""):
                    out.write(block)
                    done += len(block)
                    now = time.monotonic()
                    if now - last >= 2 or done == total:
                        last = now
                        rate = (done - have) / max(now - started, 1e-6)
                        eta = (total - done) / rate if rate and total else 0
                        progress(
                            f"vLLM sdist: {done / 1e6:.1f}/{total / 1e6:.1f} MB, {rate / 1e6:.1f} MB/s, ETA {eta:.0f} s"
                        )
    except (urllib.error.URLError, OSError) as exc:
        raise LabError(f"download of {url} failed ({exc}); re-run to resume from {part}") from None
    found = _sha256(part)
    if found != SDIST_SHA256:
        part.unlink()
        raise LabError(f"{url}: sha256 {found}, expected {SDIST_SHA256} (partial file removed; re-run)")
    part.replace(dest)
    return dest


def unpack_tree(sdist: Path, dest: Path) -> int:
    """The sdist's ``vllm-0.11.0/`` as a source tree in ``dest``; returns the file count."""
    count = 0
    top = f"vllm-{VERSION}"
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            parts = member.name.split("/")
            if parts[0] != top or len(parts) < 2 or not (member.isfile() or member.issym()):
                continue
            rel = parts[1:]
            if rel[0] in DROP or ".." in rel:
                continue
            target = dest.joinpath(*rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            if member.issym():
                target.symlink_to(member.linkname)
            else:
                handle = archive.extractfile(member)
                assert handle is not None
                target.write_bytes(handle.read())
                target.chmod(0o755 if member.mode & 0o100 else 0o644)
            count += 1
    return count


def build_commit(sdist: Path, work: Path) -> str:
    files = unpack_tree(sdist, work)
    _git("init", "--quiet", f"--initial-branch={BRANCH}", cwd=work)
    _git("add", "--all", "--force", cwd=work)
    message = (
        f"vLLM {VERSION} sources (vllm {VERSION} sdist from PyPI)\n\n"
        f"{SDIST} (sha256 {SDIST_SHA256}), {files} files, without {', '.join(DROP)}.\n"
        f"Stands in for {UPSTREAM} as FlagScale's third_party/vllm. Made by flagops for its lab.\n"
    )
    _git("commit", "--quiet", "--no-gpg-sign", "--no-verify", "-m", message, cwd=work)
    return _git("rev-parse", "HEAD", cwd=work)


def ensure_repo(git_root: Path, cache_dir: Path, progress: Progress) -> str:
    """Create or refresh the bare repo ``<git_root>/vllm.git``; returns the commit sha."""
    git_root = Path(git_root)
    bare = git_root / REPO_NAME
    stamp = cache_dir / "vllm-repo.key"
    key = f"{RECIPE_VERSION}:{SDIST_SHA256}"
    if stamp.is_file() and bare.is_dir():
        recorded_key, _, sha = stamp.read_text().strip().partition(" ")
        if recorded_key == key and _head_of(bare) == sha:
            progress(f"vLLM repo {bare}: {BRANCH} at {sha[:12]} (cached)")
            return sha

    sdist = fetch_sdist(cache_dir, progress)
    with tempfile.TemporaryDirectory(prefix="vllm-src-") as tmp:
        work = Path(tmp)
        sha = build_commit(sdist, work)
        if not (bare / "HEAD").is_file():
            git_root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(bare, ignore_errors=True)
            _git("init", "--quiet", "--bare", f"--initial-branch={BRANCH}", str(bare))
        refs = [f"HEAD:refs/heads/{BRANCH}", "HEAD:refs/heads/master", f"HEAD:refs/tags/{TAG}"]
        _git("push", "--quiet", "--force", str(bare), *refs, cwd=work)
    _git("symbolic-ref", "HEAD", f"refs/heads/{BRANCH}", cwd=bare)
    # a submodule update fetches the gitlink's sha itself: let the daemon serve any reachable one
    _git("config", "uploadpack.allowReachableSHA1InWant", "true", cwd=bare)
    (bare / "git-daemon-export-ok").touch()
    _git("gc", "--quiet", "--prune=now", cwd=bare)
    cache_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(f"{key} {sha}\n")
    progress(f"vLLM repo {bare}: {BRANCH} at {sha[:12]}")
    return sha
