"""The lab's FlagScale git repository, made from the flag-scale 0.8.0 sources.

PyPI has only the wheel of flag-scale 0.8.0. Its ``flag_scale/`` directory *is* the source tree
(``flagscale/``, ``examples/``, ``tools/``, ``tests/``, ``run.py``, ``setup.py``, ``version.py``);
it becomes the repository root, without ``third_party/`` (a 35 MB Megatron-LM copy that serving
never imports) and without byte-code. The wheel carries no ``pyproject.toml``, so one is added whose
line 3 is upstream's ``build-backend = "custom_build_backend.flagscale_build_backend"``: the
flagscale_source role comments that line out exactly as it must on the real checkout.

The commit is deterministic: fixed author, committer and dates, file modes from the wheel, and no
user/system git configuration, so the same wheel always gives the same sha (what the lab
release pins). The bare repository ``<git_root>/FlagScale.git`` gets it on ``main`` and, when the
repository has no such tag yet, as the tag ``v0.8.0`` (tags never move; an older recipe's commit
stays reachable as the tag ``lab-<sha12>``).

As upstream, ``third_party/vllm`` is a submodule: a ``.gitmodules`` entry (URL: the lab git
daemon's ``vllm.git``, see ``flagops.lab.vllm_repo``) and a gitlink to that repository's commit, so
FlagScale's own ``tools/patch/unpatch.py --backend=vllm`` clones it and applies its patches.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path

from flagops.lab import LabError, Progress, gitrepo
from flagops.lab.gitrepo import IDENTITY, _git, _head_of  # noqa: F401 - IDENTITY: the lab commit identity

VERSION = "0.8.0"
REPO_NAME = "FlagScale.git"
BRANCH = gitrepo.BRANCH
TAG = f"v{VERSION}"
RECIPE_VERSION = 2  # bump when the tree or the commit below changes
DROP_TOP = ("third_party",)  # top-level directories of the wheel's flag_scale/ left out
# the line numbers matter: the flagscale_source role comments out line 3
PYPROJECT = """\
[build-system]
requires = ["setuptools>=77.0", "wheel", "gitpython", "pyyaml", "cryptography", "pip"]
build-backend = "custom_build_backend.flagscale_build_backend"

# Added by flagops' lab: the flag-scale 0.8.0 wheel on PyPI carries no pyproject.toml. Line 3
# is upstream FlagScale's; that backend is not in the tree, so `pip install .` needs line 3
# commented out (setuptools then runs setup.py) and --no-build-isolation, as on a real checkout.
"""
SUBMODULE_PATH = "third_party/vllm"
GITMODULES = """\
[submodule "third_party/vllm"]
\tpath = third_party/vllm
\turl = {url}
"""


def _wheel_sha256() -> str:
    """The flag-scale hash pinned in the FlagOS image's lock (one source of truth)."""
    from flagops.lab.flagos_image import LOCK

    for line in LOCK.read_text().splitlines():
        if line.lower().startswith(f"flag-scale=={VERSION}"):
            return line.split("--hash=sha256:")[1].split()[0]
    raise LabError(f"{LOCK} pins no flag-scale=={VERSION}")


def fetch_wheel(cache_dir: Path, progress: Progress) -> Path:
    """flag_scale-0.8.0-*.whl from the wheelhouse or via the host's pip, hash-checked."""
    from flagops.lab.flagos_image import _host_pip

    want = _wheel_sha256()
    for folder in (cache_dir / "wheelhouse", cache_dir / "flag-scale"):
        for path in sorted(folder.glob(f"flag_scale-{VERSION}-*.whl")):
            if hashlib.sha256(path.read_bytes()).hexdigest() == want:
                return path
    dest = cache_dir / "flag-scale"
    dest.mkdir(parents=True, exist_ok=True)
    progress(f"FlagScale repo: pip download flag-scale=={VERSION}")
    cmd = [*_host_pip(), "download", "--no-deps", "--disable-pip-version-check", "-d", str(dest)]
    proc = subprocess.run([*cmd, f"flag-scale=={VERSION}"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(f"pip download flag-scale=={VERSION} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    for path in sorted(dest.glob(f"flag_scale-{VERSION}-*.whl")):
        if hashlib.sha256(path.read_bytes()).hexdigest() == want:
            return path
    raise LabError(f"no flag_scale-{VERSION} wheel with sha256 {want} in {dest}")


def unpack_tree(wheel: Path, dest: Path) -> int:
    """Write the wheel's ``flag_scale/`` as a source tree into ``dest``; returns the file count."""
    count = 0
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            parts = info.filename.split("/")
            if parts[0] != "flag_scale" or info.is_dir() or len(parts) < 2:
                continue
            rel = parts[1:]
            if rel[0] in DROP_TOP or "__pycache__" in rel or rel[-1].endswith((".pyc", ".pyo")):
                continue
            target = dest.joinpath(*rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(info))
            mode = (info.external_attr >> 16) & 0o777
            target.chmod(0o755 if mode & 0o100 else 0o644)
            count += 1
    (dest / "pyproject.toml").write_text(PYPROJECT)
    return count + 1


def vllm_url() -> str:
    from flagops.lab.services import GATEWAY
    from flagops.lab.vllm_repo import REPO_NAME as VLLM_REPO

    return f"git://{GATEWAY}/{VLLM_REPO}"


def build_commit(wheel: Path, work: Path, vllm_commit: str) -> str:
    """A one-commit repository of the tree in ``work``; returns the (deterministic) sha."""
    files = unpack_tree(wheel, work)
    (work / ".gitmodules").write_text(GITMODULES.format(url=vllm_url()))
    _git("init", "--quiet", f"--initial-branch={BRANCH}", cwd=work)
    _git("add", "--all", cwd=work)
    _git("update-index", "--add", "--cacheinfo", f"160000,{vllm_commit},{SUBMODULE_PATH}", cwd=work)
    message = (
        f"FlagScale {VERSION} sources (flag-scale {VERSION} from PyPI)\n\n"
        f"The flag_scale/ tree of {wheel.name} (sha256 {_wheel_sha256()}), {files} files,\n"
        f"without {', '.join(DROP_TOP)}/ and byte-code, plus a pyproject.toml whose line 3 is\n"
        "upstream's build-backend line, and the submodule third_party/vllm\n"
        f"({vllm_url()} at {vllm_commit}). Made by flagops for its lab.\n"
    )
    _git("commit", "--quiet", "--no-gpg-sign", "--no-verify", "-m", message, cwd=work)
    return _git("rev-parse", "HEAD", cwd=work)


def ensure_repo(git_root: Path, cache_dir: Path, progress: Progress, vllm_commit: str | None = None) -> str:
    """Create or refresh the bare repo ``<git_root>/FlagScale.git``; returns the commit sha.

    Args:
        git_root: the git server's base path (the repository is ``FlagScale.git`` in it).
        cache_dir: where the flag-scale wheel is found (``wheelhouse/``) or downloaded.
        progress: receives one line per step.
        vllm_commit: the ``third_party/vllm`` gitlink (default: make or find the lab's vllm.git).
    """
    git_root = Path(git_root)
    if vllm_commit is None:
        from flagops.lab import vllm_repo

        vllm_commit = vllm_repo.ensure_repo(git_root, cache_dir, progress)
    bare = git_root / REPO_NAME
    stamp = cache_dir / "flagscale-repo.key"
    key = f"{RECIPE_VERSION}:{_wheel_sha256()}:{vllm_commit}:{vllm_url()}"
    if stamp.is_file() and bare.is_dir():
        recorded_key, _, sha = stamp.read_text().strip().partition(" ")
        if recorded_key == key and _head_of(bare) == sha:
            progress(f"FlagScale repo {bare}: {BRANCH} at {sha[:12]} (cached)")
            return sha

    wheel = fetch_wheel(cache_dir, progress)
    with tempfile.TemporaryDirectory(prefix="flagscale-src-") as tmp:
        work = Path(tmp)
        sha = build_commit(wheel, work, vllm_commit)
        if not (bare / "HEAD").is_file():
            git_root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(bare, ignore_errors=True)
            _git("init", "--quiet", "--bare", f"--initial-branch={BRANCH}", str(bare))
        previous = _head_of(bare)
        if previous and previous != sha:
            # an older recipe's commit stays clonable (inventories that still pin it keep working)
            _git("tag", "--force", f"lab-{previous[:12]}", previous, cwd=bare)
        refs = [f"HEAD:refs/heads/{BRANCH}"]
        if not _has_ref(bare, f"refs/tags/{TAG}"):
            # a tag never moves: clones that fetched it would refuse the fetch ("would clobber
            # existing tag"); a lab made before a recipe change keeps v0.8.0 where it was
            refs.append(f"HEAD:refs/tags/{TAG}")
        _git("push", "--quiet", "--force", str(bare), *refs, cwd=work)
    _git("symbolic-ref", "HEAD", f"refs/heads/{BRANCH}", cwd=bare)
    (bare / "git-daemon-export-ok").touch()
    _git("gc", "--quiet", "--prune=now", cwd=bare)
    cache_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(f"{key} {sha}\n")
    progress(f"FlagScale repo {bare}: {BRANCH} at {sha[:12]}")
    return sha


def _has_ref(bare: Path, ref: str) -> bool:
    try:
        _git("rev-parse", "--verify", "--quiet", ref, cwd=bare)
    except LabError:
        return False
    return True


